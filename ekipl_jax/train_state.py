"""The train state SFT and RL share (optax-level: step counter, params, optimizer state) and the batch placement.

Neutral on purpose: train/sft.py and rl/update.py both build on it, so SFT does not import the RL update step.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ekipl_jax import sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # train_step calls (batches consumed)
  params: Any
  opt_state: Any
  skipped_steps: jax.Array  # updates skipped because the loss or gradient was not finite


def adam_mu_dtype(name: str | None) -> jnp.dtype | None:
  """AdamW's first-moment dtype from a config string (sft.mu_dtype, rl.optimizer.mu_dtype): None / "" / "float32"
  keep the params' dtype (optax's default), "bfloat16" stores m in bfloat16."""
  if name in (None, "", "float32"):
    return None
  if name == "bfloat16":
    return jnp.bfloat16
  raise ValueError(f"mu_dtype must be float32 or bfloat16, got {name!r}")


def init_state(params: Any, optimizer: optax.GradientTransformation) -> TrainState:
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=optimizer.init(params),
      skipped_steps=jnp.zeros((), jnp.int32),
  )


def shard_batch(batch: Any, mesh: jax.sharding.Mesh) -> Any:
  """Global arrays, leading axis on the logical "batch" axis (ekipl_jax.sharding rules: data x fsdp). Every process
  passes the same global batch (host numpy) and keeps only its own devices' slices. batch: any pytree of arrays."""

  def one(x):
    x = np.asarray(x)
    s = sharding.logical_sharding(("batch",) + (None,) * (x.ndim - 1), mesh, shape=x.shape)
    return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

  return jax.tree.map(one, batch)
