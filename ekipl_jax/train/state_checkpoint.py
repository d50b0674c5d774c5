"""Orbax checkpoints of the whole run: the train state (params, optimizer state, step and skip counters) and a JSON
`meta` item (the step, the count of consecutive skipped updates, and the data iterator's state:
train/input_pipeline.py).

Exact resume: no RNG state is saved, because none is needed: everything random in a run is derived from
(seed, step) and the data order from (seed, step), so restoring the state, the step and the data iterator written
here continues a killed run bit for bit.

A checkpoint is written to a temporary folder and renamed when complete (orbax), so a run killed mid-save leaves
the previous checkpoints intact; the temporary folder is removed when the next run opens the folder. A checkpoint
that is complete on disk but unreadable (a file deleted or damaged later) is reported in one line, moved to
`<checkpoints>.unreadable/`, and the next older one (`keep` are kept) is restored instead (restore_latest).
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp


class NoReadableCheckpoint(RuntimeError):
  """Every checkpoint of the folder failed to restore."""


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` with two items: `state` (a pytree) and `meta` (JSON)."""

  def __init__(self, directory: str, *, every: int, keep: int = 2, async_save: bool = True):
    self.every = every
    self.directory = directory if "://" in directory else os.path.abspath(directory)  # gs://... stays a bucket path
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=max(1, every),
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # a save cut short by a kill leaves a temporary folder
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
      raise FileNotFoundError(f"no checkpoint under {self.directory}")
    abstract = jax.tree.map(_abstract, state_like)
    out = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
    )
    return out["state"], dict(out["meta"])

  def restore_latest(self, state_like: Any, barrier=lambda name: None) -> tuple[Any, dict] | None:
    """The newest checkpoint that restores, or None when there is none. Each unreadable newer one is reported in one
    line and moved aside (by process 0; `barrier(name)` makes every process wait for that), so that the run saves
    that step anew. Raises NoReadableCheckpoint when every checkpoint fails."""
    steps = sorted(self.manager.all_steps(), reverse=True)
    bad = []
    for step in steps:
      try:
        out = self.restore(state_like, step)
      except Exception as e:  # pylint: disable=broad-except  (orbax / tensorstore raise many kinds)
        first = (str(e).strip().splitlines() or [""])[0].split(" [tensorstore_spec")[0][:300]
        print(f"[checkpoint] step {step} in {self.directory} is unreadable ({type(e).__name__}: {first})")
        bad.append(step)
        continue
      if bad:
        self._set_aside(bad, barrier)
        print(f"[checkpoint] using step {step} instead; unreadable steps {bad} moved to {self.directory}.unreadable")
      return out
    if steps:
      raise NoReadableCheckpoint(
          f"no checkpoint in {self.directory} could be restored (steps {steps}, each reported above): "
          "remove the folder to start afresh"
      )
    return None

  def _set_aside(self, steps: list[int], barrier) -> None:
    if jax.process_index() == 0:
      dest = f"{self.directory}.unreadable"
      os.makedirs(dest, exist_ok=True)
      for step in steps:
        os.rename(
            os.path.join(self.directory, str(step)), os.path.join(dest, f"{step}.{time.strftime('%Y%m%dT%H%M%S')}")
        )
    barrier("checkpoint_set_aside")
    self.manager.reload()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _abstract(x: Any) -> Any:
  if isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  return x
