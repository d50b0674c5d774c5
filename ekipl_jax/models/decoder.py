"""Qwen2 decoder (GQA with q/k/v bias, RMSNorm, SwiGLU, M-RoPE) with an optional KV cache.

Legend: B batch, T new tokens, S key slots (= T without a cache, = cache length with one), D width, H query heads,
K kv heads, G = H / K, Dh head dim, F mlp width, L layers.

Attention puts q, k, v head-major ([B, K, (G,) T, Dh]) before the two einsums: the [T, S] scores and probabilities
then need no transposes in either pass (with [B, T, H, Dh] operands XLA on CPU inserts copies of them, measured at a
fifth of the update step's time; see docs/BENCHMARKS.md). For the same reason a layer's KV cache buffer is
head-major, [B, K, S, Dh]: with [B, S, K, Dh] XLA copies (transposes) every layer's cache twice per decode step.

Parameter names mirror transformers (`layers_i.self_attn.q_proj.kernel` <-> `layers.i.self_attn.q_proj.weight`);
each parameter declares its logical axes once through `nn.with_logical_partitioning`.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ekipl_jax.models.config import QwenVLConfig
from ekipl_jax.models.rope import apply_rotary

Dtype = Any
_init = nn.initializers.normal(0.02)


def dot_f32(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """lax.dot_general accumulating in float32 whatever the operands' dtype (the result is float32)."""
  del preferred_element_type
  return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision, preferred_element_type=jnp.float32)


def _canonical(dimension_numbers):
  (lc, rc), (lb, rb) = dimension_numbers
  return (tuple(lc), tuple(rc)), (tuple(lb), tuple(rb))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dot_lean(lhs, rhs, dimension_numbers):
  return jax.lax.dot_general(lhs, rhs, dimension_numbers, preferred_element_type=jnp.float32)


def _dot_lean_fwd(lhs, rhs, dimension_numbers):
  return _dot_lean(lhs, rhs, dimension_numbers), (lhs, rhs)


def _dot_lean_bwd(dimension_numbers, residuals, ct):
  lhs, rhs = residuals
  dt = jnp.result_type(lhs, rhs)
  dot = functools.partial(jax.lax.dot_general, dimension_numbers=dimension_numbers, preferred_element_type=dt)
  _, vjp = jax.vjp(dot, lhs, rhs)
  d_lhs, d_rhs = vjp(ct.astype(dt))
  return d_lhs.astype(lhs.dtype), d_rhs.astype(rhs.dtype)


_dot_lean.defvjp(_dot_lean_fwd, _dot_lean_bwd)


def dot_f32_lean_grads(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """dot_f32 whose backward dots write the operands' cotangents in the operands' dtype directly. Autodiff of dot_f32
  computes each cotangent in float32 and then rounds it to the operand's dtype: for the unembedding's [V, D] weight in
  bfloat16 that is a float32 copy of the whole table per chip beside the bfloat16 one (1.2 GB for Qwen2.5-VL-3B, the
  peak of its update step on v5e-8; docs/TPU_PLAN.md). A bfloat16-output dot accumulates in float32 and rounds once
  (TPU, GPU; XLA CPU computes bf16 dots in float32), so the cotangents are the same numbers, provided the forward
  output is itself rounded to the operands' dtype, as QwenVL.unembed does (its cotangent is then exact in it)."""
  del precision, preferred_element_type
  return _dot_lean(lhs, rhs, _canonical(dimension_numbers))


class Dense(nn.Dense):
  """nn.Dense (same parameters) whose matmul accumulates in float32 and whose output is rounded once to `dtype`.
  What TPU and GPU GEMMs do for bfloat16 anyway; on CPU it also selects XLA's fast bf16 x bf16 -> f32 kernels (a
  bf16-output dot runs there as slowly as a float32 one: the bench model sampled slower in bf16 than in f32)."""

  dot_general: Any = dot_f32

  def __call__(self, inputs):
    return super().__call__(inputs).astype(self.dtype)


def dense(features: int, axes: tuple[str, str], bias: bool, dtype: Dtype, param_dtype: Dtype, name: str) -> Dense:
  return Dense(
      features,
      use_bias=bias,
      dtype=dtype,
      param_dtype=param_dtype,
      name=name,
      kernel_init=nn.with_logical_partitioning(_init, axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[1:]),
  )


class RMSNorm(nn.Module):
  """x / rms(x) (in float32) * scale, over the last axis (the decoder's norms and Qwen2.5-VL's vision norms)."""

  eps: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  axis: str = "embed"  # logical axis of the scale ("vision_embed" in the vision tower)

  @nn.compact
  def __call__(self, x_BTD):
    scale_D = self.param(
        "scale",
        nn.with_logical_partitioning(nn.initializers.ones_init(), (self.axis,)),
        (x_BTD.shape[-1],),
        self.param_dtype,
    )
    x32 = x_BTD.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    scale = scale_D.astype(self.dtype).reshape((1,) * (x_BTD.ndim - 1) + (-1,))  # explicit rank (strict promotion)
    return scale * x32.astype(self.dtype)


class Attention(nn.Module):
  config: QwenVLConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BTD, cos_BTDh, sin_BTDh, mask_BTS, k_cache_BKSDh=None, v_cache_BKSDh=None, cache_index=None):
    """out_BTD, and with a cache (this layer's head-major buffers) the caches with the T new keys / values
    written at slots cache_index .. cache_index+T-1 (None, None without one)."""
    c = self.config
    H, K, Dh = c.num_heads, c.num_kv_heads, c.head_dim
    B, T, _ = x_BTD.shape
    q = dense(H * Dh, ("embed", "heads"), True, self.dtype, self.param_dtype, "q_proj")(x_BTD)
    k = dense(K * Dh, ("embed", "kv_heads"), True, self.dtype, self.param_dtype, "k_proj")(x_BTD)
    v = dense(K * Dh, ("embed", "kv_heads"), True, self.dtype, self.param_dtype, "v_proj")(x_BTD)
    q_BTHDh = apply_rotary(q.reshape(B, T, H, Dh), cos_BTDh, sin_BTDh)
    k_BKTDh = apply_rotary(k.reshape(B, T, K, Dh), cos_BTDh, sin_BTDh).transpose(0, 2, 1, 3)
    v_BKTDh = v.reshape(B, T, K, Dh).transpose(0, 2, 1, 3)
    if k_cache_BKSDh is not None:
      k_BKSDh = k_cache_BKSDh = write_cache(k_cache_BKSDh, k_BKTDh, cache_index)
      v_BKSDh = v_cache_BKSDh = write_cache(v_cache_BKSDh, v_BKTDh, cache_index)
    else:
      k_BKSDh, v_BKSDh = k_BKTDh, v_BKTDh
    q_BKGTDh = q_BTHDh.reshape(B, T, K, H // K, Dh).transpose(0, 2, 3, 1, 4)
    attend = _attend if k_cache_BKSDh is None else _attend_cached
    out_BKGTDh = attend(q_BKGTDh, k_BKSDh.astype(self.dtype), v_BKSDh.astype(self.dtype), mask_BTS, self.dtype)
    out_BTD = dense(c.hidden_size, ("heads", "embed"), False, self.dtype, self.param_dtype, "o_proj")(
        out_BKGTDh.transpose(0, 3, 1, 2, 4).reshape(B, T, H * Dh)
    )
    return out_BTD, k_cache_BKSDh, v_cache_BKSDh


def write_cache(cache_BKSDh, new_BKTDh, cache_index):
  """The T new keys (or values) at slots cache_index .. cache_index+T-1; in place when the buffer is donated.
  A 16-bit float cache is written as its bits: XLA:CPU otherwise upcasts a bf16 dynamic-update-slice to float32,
  i.e. converts and rewrites the whole buffer on every decode step (free bitcasts elsewhere)."""
  new_BKTDh, start = new_BKTDh.astype(cache_BKSDh.dtype), (0, 0, cache_index, 0)
  if jnp.dtype(cache_BKSDh.dtype).itemsize != 2:
    return jax.lax.dynamic_update_slice(cache_BKSDh, new_BKTDh, start)
  bits = lambda x: jax.lax.bitcast_convert_type(x, jnp.uint16)
  return jax.lax.bitcast_convert_type(
      jax.lax.dynamic_update_slice(bits(cache_BKSDh), bits(new_BKTDh), start), cache_BKSDh.dtype
  )


def _attend(q_BKGTDh, k_BKSDh, v_BKSDh, mask_BTS, dtype):
  """Softmax attention on head-major operands (no cache): the two einsums are plain batched GEMMs over (b, k),
  with no transposes of the [T, S] scores inserted around them by XLA on CPU."""
  Dh = q_BKGTDh.shape[-1]
  scores_BKGTS = jnp.einsum("bkgtd,bksd->bkgts", q_BKGTDh, k_BKSDh, preferred_element_type=jnp.float32) * (Dh**-0.5)
  scores_BKGTS = jnp.where(mask_BTS[:, None, None], scores_BKGTS, jnp.finfo(jnp.float32).min)
  probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(dtype)
  return jnp.einsum("bkgts,bksd->bkgtd", probs_BKGTS, v_BKSDh, preferred_element_type=jnp.float32).astype(dtype)


def _attend_cached(q_BKGTDh, k_BKSDh, v_BKSDh, mask_BTS, dtype):
  """`_attend` against the cache, with the scores computed keys-major ([.., S, (G, T)]: the keys are the GEMM's
  left operand as they lie; as the right operand XLA's CPU GEMM repacks them on every decode step), then moved
  (small) to [.., (G, T), S] for the softmax and the second einsum."""
  Dh = q_BKGTDh.shape[-1]
  scores_BKSGT = jnp.einsum("bksd,bkgtd->bksgt", k_BKSDh, q_BKGTDh, preferred_element_type=jnp.float32)
  scores_BKGTS = scores_BKSGT.transpose(0, 1, 3, 4, 2) * (Dh**-0.5)
  scores_BKGTS = jnp.where(mask_BTS[:, None, None], scores_BKGTS, jnp.finfo(jnp.float32).min)
  probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(dtype)
  return jnp.einsum("bkgts,bksd->bkgtd", probs_BKGTS, v_BKSDh, preferred_element_type=jnp.float32).astype(dtype)


class MLP(nn.Module):
  config: QwenVLConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BTD):
    c, dt, pdt = self.config, self.dtype, self.param_dtype
    gate_BTF = dense(c.intermediate_size, ("embed", "mlp"), False, dt, pdt, "gate_proj")(x_BTD)
    up_BTF = dense(c.intermediate_size, ("embed", "mlp"), False, dt, pdt, "up_proj")(x_BTD)
    return dense(c.hidden_size, ("mlp", "embed"), False, dt, pdt, "down_proj")(nn.silu(gate_BTF) * up_BTF)


class DecoderLayer(nn.Module):
  config: QwenVLConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BTD, cos_BTDh, sin_BTDh, mask_BTS, k_cache=None, v_cache=None, cache_index=None):
    c, dt, pdt = self.config, self.dtype, self.param_dtype
    h_BTD = RMSNorm(c.rms_norm_eps, dt, pdt, name="input_layernorm")(x_BTD)
    h_BTD, k_cache, v_cache = Attention(c, dt, pdt, name="self_attn")(
        h_BTD, cos_BTDh, sin_BTDh, mask_BTS, k_cache, v_cache, cache_index
    )
    x_BTD = x_BTD + h_BTD
    h_BTD = MLP(c, dt, pdt, name="mlp")(RMSNorm(c.rms_norm_eps, dt, pdt, name="post_attention_layernorm")(x_BTD))
    return x_BTD + h_BTD, k_cache, v_cache


def attention_mask(key_mask_BS, T: int, cache_index=None):
  """mask_BTS: query t (at slot cache_index + t, or t without a cache) sees key s iff s <= its slot and key_mask."""
  S = key_mask_BS.shape[1]
  first = 0 if cache_index is None else cache_index
  causal_TS = jnp.arange(S)[None, :] <= (first + jnp.arange(T))[:, None]
  return jnp.logical_and(causal_TS[None], key_mask_BS.astype(bool)[:, None, :])
