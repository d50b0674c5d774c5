"""The policy: Qwen2-VL / Qwen2.5-VL in Flax (see docs/DESIGN.md, "Policy").

model, params = models.load_pretrained(path, dtype=jnp.float32, mesh=None, compute_dtype=None, remat=False)
model, params = models.init(hf_config_dict_or_QwenVLConfig, rng, dtype=...)
logits_BTV = model.apply(params, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None)
models.save_pretrained(model, params, out_dir, processor_dir=None)
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ekipl_jax import sharding
from ekipl_jax.models.hf_checkpoint import abstract_params, build, load_pretrained, param_shardings, save_pretrained
from ekipl_jax.models.config import QwenVLConfig, as_config
from ekipl_jax.models.logprobs import token_logprobs
from ekipl_jax.models.model import QwenVL, dummy_inputs, init_cache, rope_index


def init(
    config,
    rng: jax.Array,
    dtype=jnp.float32,
    compute_dtype=None,
    remat: bool = False,
    mesh=None,
    rules: sharding.Rules = sharding.RULES,
    with_vision: bool | None = None,
) -> tuple[QwenVL, dict]:
  """A freshly initialised policy (normal(0.02) weights, unit norms, zero biases), placed on `mesh` if given."""
  model = build(as_config(config), dtype, compute_dtype, remat, mesh, rules, with_vision)
  shardings = param_shardings(model, mesh, rules) if mesh is not None else None
  init_fn = lambda r: nn.unbox(model.init(r, **dummy_inputs(model)))
  params = jax.jit(init_fn, out_shardings=shardings)(rng)
  return model, params


def frozen_copy(params: dict, compute_dtype) -> dict:
  """A copy of `params` for a frozen policy that is only run forward (the RL reference), in a new buffer per leaf,
  each placed like its source: matrices (kernels, embeddings; all but a sliver of the bytes) in `compute_dtype`,
  vectors (biases, norm scales) as they are. The forward pass casts every matrix to the compute dtype before using
  it, so the copy gives bit-identical outputs to `params` under that compute dtype (LayerNorm keeps float32 scales
  in its arithmetic: vectors stay) with half the bytes when params are float32 and compute bfloat16. Given
  ShapeDtypeStructs (with shardings), returns the copy's as ShapeDtypeStructs."""

  dtype = lambda x: compute_dtype if x.ndim >= 2 else x.dtype
  if all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params)):  # abstract (experiments/aot.py)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype(x), sharding=x.sharding), params)

  def one(x):  # jnp.copy: jit would hand back an unchanged input itself, not a new buffer
    return jnp.copy(x.astype(dtype(x)))

  shardings = jax.tree.map(lambda x: x.sharding, params)
  return jax.jit(lambda p: jax.tree.map(one, p), out_shardings=shardings)(params)


__all__ = [
    "frozen_copy",
    "QwenVL",
    "QwenVLConfig",
    "init",
    "init_cache",
    "load_pretrained",
    "save_pretrained",
    "token_logprobs",
    "rope_index",
    "abstract_params",
    "param_shardings",
]
