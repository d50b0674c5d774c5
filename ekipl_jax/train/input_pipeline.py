"""Data for the trainer: TFDS data sources (random access) and the training input pipeline on grain.

The order of training examples is a function of (seed, epoch) alone: epoch e is the permutation
np.random.default_rng([seed, e]).permutation(n), and step s reads positions [s * batch, (s + 1) * batch) of that
endless order. `step_dataset` writes this as a grain MapDataset whose element s is step s's examples and their
prepared batch (read from TFDS, tokenized, images processed, rows packed), and `StepBatches` iterates it with grain's
prefetch: all of that runs in a background thread, `prefetch` steps ahead of the step that uses it. The iterator's
state (the next step) is saved in the checkpoint's `meta` item (train/loop.py), so a run resumed at step s reads
exactly what it would have read. Every process reads the same global batch (the update step keeps each device's
slice).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Sequence

import grain
import numpy as np
import tensorflow_datasets as tfds

from ekipl_jax.data import builders, synthetic


def _expand(path: str) -> str:
  return os.path.abspath(os.path.expanduser(path))


def prepare(dcfg) -> tfds.core.DatasetBuilder:
  """Builds (once) the TFDS dataset that the config names; a later call just opens it."""
  if dcfg.builder == "synthetic_reasoning":
    blind, miss = str(dcfg.get("teacher_blind", "")), float(dcfg.get("teacher_miss_rate", 0.0))
    ood_min, ood_max = int(dcfg.get("ood_min_objects", 0)), int(dcfg.get("ood_max_objects", 9))
    kinds = tuple(dcfg.get("question_kinds", ())) or synthetic.QUESTION_KINDS
    # The dataset's name carries every generator setting that differs from the default data.
    flaw = str(dcfg.get("teacher_flaw", "miss"))
    suffix = f"_blind-{blind.replace(' ', '-')}-{miss:g}" if blind and miss > 0 else ""
    suffix += f"-{flaw}" if suffix and flaw != "miss" else ""
    suffix += f"_ood{ood_min}-{ood_max}" if (ood_min, ood_max) != (0, 9) else ""
    held = str(dcfg.get("ood_held_out", "some"))
    suffix += f"_oodheld-{held}" if held != "some" else ""
    suffix += "" if kinds == synthetic.QUESTION_KINDS else "_q-" + "-".join(kinds)
    scfg = builders.SyntheticConfig(
        name=f"s{dcfg.get('synthetic_seed', 0)}_n{dcfg.num_train}_t{dcfg.num_test}_px{dcfg.image_size}{suffix}",
        seed=int(dcfg.get("synthetic_seed", 0)),
        teacher_blind=blind,
        teacher_miss_rate=miss,
        teacher_flaw=flaw,
        ood_held_out=held,
        ood_min_objects=ood_min,
        ood_max_objects=ood_max,
        question_kinds=kinds,
        num_train=int(dcfg.num_train),
        num_test_id=int(dcfg.num_test),
        num_test_ood=int(dcfg.num_test),
        image_size=int(dcfg.image_size),
    )
    return builders.prepare_synthetic(_expand(dcfg.data_dir), scfg)
  if dcfg.builder == "reason_rft_cot":
    if not dcfg.manual_dir:
      raise ValueError("config key data.manual_dir: the local Reason-RFT-CoT-Dataset folder is required")
    return builders.prepare_reason_rft(
        _expand(dcfg.manual_dir), _expand(dcfg.data_dir), dcfg.builder_config or dcfg.task
    )
  raise ValueError(f"config key data.builder: unknown builder {dcfg.builder!r}")


def source(builder: tfds.core.DatasetBuilder, split: str):
  if split not in builder.info.splits:
    raise ValueError(f"split {split!r} not in {builder.name} (has {sorted(builder.info.splits)})")
  return builder.as_data_source(split=split)


@functools.lru_cache(maxsize=4)
def order(n: int, seed: int, epoch: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(n)


def index_at(position: int, n: int, seed: int) -> int:
  """The example at `position` of the endless order over n examples (epoch position // n, its own permutation)."""
  epoch, i = divmod(int(position), n)
  return int(order(n, seed, epoch)[i])


def step_dataset(
    src, seed: int, batch: int, steps: int, limit: int = 0, prepare: Callable[[list[dict]], Any] | None = None
) -> grain.MapDataset:
  """grain MapDataset whose element s is (examples of step s, prepare(examples) or None): positions
  s * batch .. (s + 1) * batch - 1 of the endless shuffled order over the first `limit` examples (all when 0)."""
  n = min(len(src), limit) if limit > 0 else len(src)
  ds = grain.MapDataset.range(steps * batch).map(functools.partial(index_at, n=n, seed=seed))
  ds = ds.batch(batch, batch_fn=list).map(functools.partial(read, src))
  return ds.map(functools.partial(_with_prepared, prepare))


def _with_prepared(prepare, examples: list[dict]) -> tuple[list[dict], Any]:
  return examples, (prepare(examples) if prepare is not None else None)


class StepBatches:
  """The training input iterator over a `step_dataset`: grain prefetches `prefetch` steps ahead in `threads`
  background threads (TFDS reads, tokenization, image processing and row packing happen there, while the step
  runs). get_state() / restore() are what the checkpoint's meta keeps: {"next_index": the next step}."""

  def __init__(self, ds: grain.MapDataset, prefetch: int = 2, threads: int = 1):
    self._iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch))
    self._it = None  # started by restore() or the first batch_for(), at the step the run starts from

  def _iter(self):
    if self._it is None:
      self._it = iter(self._iter_ds)
    return self._it

  def get_state(self) -> dict:
    return dict(self._iter().get_state())

  def restore(self, state: dict | None, step: int) -> None:
    """Continues from a checkpoint's saved state (None: a checkpoint without one, or a fresh run) at `step`."""
    state = dict(state) if state else {"next_index": step}
    if state.get("next_index") != step:
      raise ValueError(f"the checkpoint's data iterator state {state} does not continue at its step {step}")
    self._iter().set_state(state)

  def batch_for(self, step: int):
    """(examples, prepared batch) of `step`; steps are read in order (the iterator holds the position)."""
    at = self._iter().get_state().get("next_index")
    if at != step:
      raise RuntimeError(f"the data iterator is at step {at}, asked for step {step} (steps are read in order)")
    return next(self._it)


def read(src, indices: Sequence[int]) -> list[dict]:
  return list(builders.iterate(src, indices))


def first(src, n: int) -> list[dict]:
  """The first n examples of a split in file order (n <= 0: all): the evaluation set."""
  return read(src, range(len(src) if n <= 0 else min(n, len(src))))
