"""Data for the trainer: TFDS data sources (random access), a deterministic resumable order, and the row layout.

The order of training examples is a function of (seed, epoch) alone, and step s reads positions
[s * batch, (s + 1) * batch) of that endless order, so a run resumed at step s reads exactly what it would have read.
Every process reads the same global batch (the update step keeps each device's slice).
"""

from __future__ import annotations

import functools
import os
from typing import Sequence

import numpy as np
import tensorflow_datasets as tfds

from ekipl_jax.data import builders, synthetic


def _expand(path: str) -> str:
  return os.path.abspath(os.path.expanduser(path))


def prepare(dcfg) -> tfds.core.DatasetBuilder:
  """Builds (once) the TFDS dataset that the config names; a later call just opens it."""
  if dcfg.builder == "synthetic_reasoning":
    blind, miss = str(dcfg.get("teacher_blind", "")), float(dcfg.get("teacher_miss_rate", 0.0))
    teacher = f"_blind-{blind.replace(' ', '-')}-{miss:g}" if blind and miss > 0 else ""
    ood_min, ood_max = int(dcfg.get("ood_min_objects", 0)), int(dcfg.get("ood_max_objects", 9))
    teacher += f"_ood{ood_min}-{ood_max}" if (ood_min, ood_max) != (0, 9) else ""
    kinds = tuple(dcfg.get("question_kinds", ())) or synthetic.QUESTION_KINDS
    teacher += "" if kinds == synthetic.QUESTION_KINDS else "_q-" + "-".join(kinds)
    scfg = builders.SyntheticConfig(
        name=f"s{dcfg.get('synthetic_seed', 0)}_n{dcfg.num_train}_t{dcfg.num_test}_px{dcfg.image_size}{teacher}",
        seed=int(dcfg.get("synthetic_seed", 0)),
        teacher_blind=blind,
        teacher_miss_rate=miss,
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


def indices_for_step(n: int, seed: int, step: int, batch: int, limit: int = 0) -> list[int]:
  """The examples of step `step`: positions step*batch .. step*batch + batch - 1 of the endless shuffled order
  (over the first `limit` examples when limit > 0)."""
  n_eff = min(n, limit) if limit > 0 else n
  out = []
  for pos in range(step * batch, (step + 1) * batch):
    epoch, i = divmod(pos, n_eff)
    out.append(int(order(n_eff, seed, epoch)[i]))
  return out


def read(src, indices: Sequence[int]) -> list[dict]:
  return list(builders.iterate(src, indices))


def first(src, n: int) -> list[dict]:
  """The first n examples of a split in file order (n <= 0: all): the evaluation set."""
  return read(src, range(len(src) if n <= 0 else min(n, len(src))))
