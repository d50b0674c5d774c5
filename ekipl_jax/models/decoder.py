"""Qwen2 decoder (GQA with q/k/v bias, RMSNorm, SwiGLU, M-RoPE) with an optional KV cache.

Legend: B batch, T new tokens, S key slots (= T without a cache, = cache length with one), D width, H query heads,
K kv heads, G = H / K, Dh head dim, F mlp width, L layers.

Attention without a cache (the update step, log-probs) puts q, k, v head-major ([B, K, (G,) T, Dh]) before the
two einsums: the [T, S] scores and probabilities then need no transposes in either pass (on CPU XLA otherwise inserts
copies of them: a fifth of the update step's time before this; see docs/BENCHMARKS.md). The cached path (sampler)
keeps the cache layout.

Parameter names mirror transformers (`layers_i.self_attn.q_proj.kernel` <-> `layers.i.self_attn.q_proj.weight`);
each parameter declares its logical axes once through `nn.with_logical_partitioning`.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ekipl_jax.models.config import QwenVLConfig
from ekipl_jax.models.rope import apply_rotary

Dtype = Any
_init = nn.initializers.normal(0.02)


def dense(features: int, axes: tuple[str, str], bias: bool, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.Dense:
    return nn.Dense(features, use_bias=bias, dtype=dtype, param_dtype=param_dtype, name=name,
                    kernel_init=nn.with_logical_partitioning(_init, axes),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[1:]))


class RMSNorm(nn.Module):
    eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BTD):
        scale_D = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
                             (x_BTD.shape[-1],), self.param_dtype)
        x32 = x_BTD.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale_D.astype(self.dtype) * x32.astype(self.dtype)


class Attention(nn.Module):
    config: QwenVLConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BTD, cos_BTDh, sin_BTDh, mask_BTS, k_cache_BSKDh=None, v_cache_BSKDh=None, cache_index=None):
        c = self.config
        H, K, Dh = c.num_heads, c.num_kv_heads, c.head_dim
        B, T, _ = x_BTD.shape
        q = dense(H * Dh, ("embed", "heads"), True, self.dtype, self.param_dtype, "q_proj")(x_BTD)
        k = dense(K * Dh, ("embed", "kv_heads"), True, self.dtype, self.param_dtype, "k_proj")(x_BTD)
        v = dense(K * Dh, ("embed", "kv_heads"), True, self.dtype, self.param_dtype, "v_proj")(x_BTD)
        q_BTHDh = apply_rotary(q.reshape(B, T, H, Dh), cos_BTDh, sin_BTDh)
        k_BTKDh = apply_rotary(k.reshape(B, T, K, Dh), cos_BTDh, sin_BTDh)
        v_BTKDh = v.reshape(B, T, K, Dh)
        if k_cache_BSKDh is not None:
            at = (0, cache_index, 0, 0)
            k_BSKDh = jax.lax.dynamic_update_slice(k_cache_BSKDh, k_BTKDh.astype(k_cache_BSKDh.dtype), at)
            v_BSKDh = jax.lax.dynamic_update_slice(v_cache_BSKDh, v_BTKDh.astype(v_cache_BSKDh.dtype), at)
        else:
            k_BSKDh, v_BSKDh = k_BTKDh, v_BTKDh
        q_BTKGDh = q_BTHDh.reshape(B, T, K, H // K, Dh)
        k_BSKDh, v_BSKDh = k_BSKDh.astype(self.dtype), v_BSKDh.astype(self.dtype)
        if k_cache_BSKDh is None:  # training / scoring: head-major operands, so no [T, S]-sized transposes (below)
            q_, k_, v_ = (q_BTKGDh.transpose(0, 2, 3, 1, 4), k_BSKDh.transpose(0, 2, 1, 3),
                          v_BSKDh.transpose(0, 2, 1, 3))
            eq_scores, eq_out = "bkgtd,bksd->bkgts", "bkgts,bksd->bkgtd"
        else:
            q_, k_, v_ = q_BTKGDh, k_BSKDh, v_BSKDh
            eq_scores, eq_out = "btkgd,bskd->bkgts", "bkgts,bskd->btkgd"
        scores_BKGTS = jnp.einsum(eq_scores, q_, k_, preferred_element_type=jnp.float32) * (Dh ** -0.5)
        scores_BKGTS = jnp.where(mask_BTS[:, None, None], scores_BKGTS, jnp.finfo(jnp.float32).min)
        probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(self.dtype)
        out = jnp.einsum(eq_out, probs_BKGTS, v_)
        out_BTKGDh = out.transpose(0, 3, 1, 2, 4) if k_cache_BSKDh is None else out
        out_BTD = dense(c.hidden_size, ("heads", "embed"), False, self.dtype, self.param_dtype, "o_proj")(
            out_BTKGDh.reshape(B, T, H * Dh))
        if k_cache_BSKDh is None:
            return out_BTD, None, None
        return out_BTD, k_BSKDh, v_BSKDh


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
        h_BTD, k_cache, v_cache = Attention(c, dt, pdt, name="self_attn")(h_BTD, cos_BTDh, sin_BTDh, mask_BTS,
                                                                        k_cache, v_cache, cache_index)
        x_BTD = x_BTD + h_BTD
        h_BTD = MLP(c, dt, pdt, name="mlp")(RMSNorm(c.rms_norm_eps, dt, pdt, name="post_attention_layernorm")(x_BTD))
        return x_BTD + h_BTD, k_cache, v_cache


def attention_mask(key_mask_BS, T: int, cache_index=None):
    """mask_BTS: query t (at slot cache_index + t, or t without a cache) sees key s iff s <= its slot and key_mask."""
    S = key_mask_BS.shape[1]
    first = 0 if cache_index is None else cache_index
    causal_TS = jnp.arange(S)[None, :] <= (first + jnp.arange(T))[:, None]
    return jnp.logical_and(causal_TS[None], key_mask_BS.astype(bool)[:, None, :])
