"""Metrics: one JSONL line per logged step (the file a test or a plot reads) and TensorBoard scalars and texts."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import jax
import numpy as np


def to_python(metrics: Mapping[str, Any]) -> dict[str, float]:
  """Device scalars -> Python floats (one host transfer for the whole dict)."""
  host = jax.device_get(dict(metrics))
  return {k: float(np.asarray(v)) for k, v in host.items() if np.ndim(v) == 0}


class MetricWriter:
  """Writes `workdir/metrics.jsonl` and TensorBoard events; only process 0 writes."""

  def __init__(self, workdir: str, *, tensorboard: bool = True, prefix: str = ""):
    self.enabled = jax.process_index() == 0
    self.prefix = prefix
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      if tensorboard:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

        self._tb = SummaryWriter(os.path.join(workdir, "tb"))

  def truncate_after(self, step: int) -> None:
    """On resume: drop lines logged after the checkpoint so the file reads as one uninterrupted run."""
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      keep = [line for line in f if json.loads(line).get("step", 0) <= step]
    with open(self.path, "w") as f:
      f.writelines(keep)

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    # NaN marks "no such rows this step" (e.g. external metrics in plain GRPO): left out of the logs.
    values = {f"{self.prefix}{k}": float(v) for k, v in values.items() if not math.isnan(float(v))}
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), **values}) + "\n")
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(k, v, step)

  def text(self, step: int, tag: str, body: str) -> None:
    """TensorBoard text and `workdir/samples.md` (readable without TensorBoard)."""
    if not self.enabled:
      return
    if self._tb is not None:
      self._tb.add_text(f"{self.prefix}{tag}", body, step)
    with open(os.path.join(os.path.dirname(self.path), "samples.md"), "a") as f:
      f.write(f"## step {step}: {self.prefix}{tag}\n\n{body}\n\n")

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
