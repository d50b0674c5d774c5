"""Metrics: one JSONL line per logged step (the file a test or a plot reads) and TensorBoard scalars and texts.

Non-finite values stay visible and the file stays valid JSON: NaN, inf and -inf are written as the strings "nan",
"inf" and "-inf" (float() reads them back; read_jsonl does). A NaN either means "no such rows this step" (e.g. the
external-row statistics of plain GRPO) or a diverged value (loss, grad_norm): the trainer stops after
config.max_consecutive_skips non-finite updates in a row (loop.py).

Crash safety: each line is one append; a run killed mid-write leaves at most a torn last line, which read_jsonl and
truncate_after drop with a warning. truncate_after rewrites the file through a temporary file and a rename, so a
crash during it leaves the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import math
import os
import re
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
    self._tb_dir = os.path.join(workdir, "tb") if tensorboard else None
    self._purge_step = None  # TensorBoard hides the events of steps >= this one (written before a resume)
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)

  def _tensorboard(self):
    if self._tb is None and self._tb_dir is not None:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

      self._tb = SummaryWriter(self._tb_dir, purge_step=self._purge_step)
    return self._tb

  def truncate_after(self, step: int) -> int:
    """On resume: drop lines logged after the checkpoint (all of them, step -1, on a fresh start) so the file reads
    as one uninterrupted run. Returns how many lines were dropped."""
    if not self.enabled or not os.path.exists(self.path):
      return 0
    lines = read_jsonl(self.path, parse=False)
    keep = [line for line, d in lines if d.get("step", 0) <= step]
    with open(self.path, "rb") as f:
      intact = f.read().endswith(b"\n") or not lines
    if len(keep) != len(lines) or not intact:
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(line + "\n" for line in keep)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, self.path)
    self._purge_step = step + 1
    _truncate_samples(os.path.join(os.path.dirname(self.path), "samples.md"), step)
    return len(lines) - len(keep)

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    values = {f"{self.prefix}{k}": float(v) for k, v in values.items()}
    line = json.dumps({"step": int(step), **{k: _json_float(v) for k, v in values.items()}}, allow_nan=False)
    try:
      with open(self.path, "a") as f:
        f.write(line + "\n")
    except OSError as e:
      raise OSError(e.errno, f"writing {self.path}: {e.strerror}") from e
    if self._tensorboard() is not None:
      for k, v in values.items():
        if math.isfinite(v):  # tensorboardX prints a warning per non-finite value; metrics.jsonl shows them
          self._tb.add_scalar(k, v, step)

  def text(self, step: int, tag: str, body: str) -> None:
    """TensorBoard text and `workdir/samples.md` (readable without TensorBoard)."""
    if not self.enabled:
      return
    if self._tensorboard() is not None:
      self._tb.add_text(f"{self.prefix}{tag}", body, step)
    with open(os.path.join(os.path.dirname(self.path), "samples.md"), "a") as f:
      f.write(f"## step {step}: {self.prefix}{tag}\n\n{body}\n\n")

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _truncate_samples(path: str, step: int) -> None:
  """samples.md without the sections of steps after `step` (atomically, as metrics.jsonl)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    text = f.read()
  parts = re.split(r"(?m)^(?=## step \d+: )", text)
  keep = [p for p in parts if not (m := re.match(r"## step (\d+): ", p)) or int(m.group(1)) <= step]
  if len(keep) != len(parts):
    with open(path + ".tmp", "w") as f:
      f.write("".join(keep))
    os.replace(path + ".tmp", path)


_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _json_float(v: float) -> float | str:
  return v if math.isfinite(v) else ("nan" if math.isnan(v) else "inf" if v > 0 else "-inf")


def read_jsonl(path: str, *, parse: bool = True) -> list:
  """The metric lines of path, "nan" / "inf" / "-inf" as floats. A torn last line (a run killed mid-write) is dropped
  with a warning; any other bad line is an error naming the file and line. parse=False: (raw line, dict) pairs."""
  with open(path) as f:
    raw = [line.rstrip("\n") for line in f]
  out = []
  for i, line in enumerate(raw):
    if not line.strip():
      continue
    try:
      d = json.loads(line)
    except ValueError as e:
      if i == len(raw) - 1:
        print(f"warning: {path}:{i + 1}: dropped a torn last line (a run stopped mid-write): {line[:80]!r}")
        break
      raise ValueError(f"{path}:{i + 1}: not a JSON metric line ({e}): {line[:80]!r}") from None
    d = {k: _NONFINITE.get(v, v) if isinstance(v, str) else v for k, v in d.items()}
    out.append((line, d) if not parse else d)
  return out
