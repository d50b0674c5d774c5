"""Orbax checkpoints of the whole run: train state (params, optimizer state, step), RNG and data position.

Exact resume: everything random in a run is derived from (seed, step) and the data order from (seed, position), so
restoring the state and the position written here continues a killed run bit for bit.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` with two items: `state` (a pytree) and `meta` (JSON)."""

  def __init__(self, directory: str, *, every: int, keep: int = 2, async_save: bool = True):
    self.every = every
    self.manager = ocp.CheckpointManager(
        directory if "://" in directory else os.path.abspath(directory),  # gs://... stays a bucket path
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=max(1, every), max_to_keep=keep, create=True, enable_async_checkpointing=async_save
        ),
        item_names=("state", "meta"),
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
    saved = self.manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force
    )
    return bool(saved)

  def restore(self, state_like: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restores into the shapes, dtypes and shardings of `state_like` (arrays or ShapeDtypeStructs)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint under {self.manager.directory}")
    abstract = jax.tree.map(_abstract, state_like)
    out = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
    )
    return out["state"], dict(out["meta"])

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _abstract(x: Any) -> Any:
  if isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  return x
