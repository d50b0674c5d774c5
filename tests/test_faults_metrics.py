"""Fault injection on the trainer (issue 12): each failure a user met either stops with a clear error naming the
key, file or holder, or resumes exactly. The data side is tests/test_faults_data.py.

This file: metrics.jsonl with NaN / inf values, torn last lines, atomic truncation and a full disk.
"""

import errno
import json
import os

import numpy as np
import pytest

from ekipl_jax.train import metrics as metrics_lib


def test_metrics_keep_nan_and_inf_as_valid_json(tmp_path):
  w = metrics_lib.MetricWriter(str(tmp_path), tensorboard=False)
  w.scalars(1, {"loss": float("nan"), "grad_norm": float("inf"), "x": -float("inf"), "ok": 2.0})
  raw = open(w.path).read()
  assert json.loads(raw) == {"step": 1, "loss": "nan", "grad_norm": "inf", "x": "-inf", "ok": 2.0}  # strict JSON
  (line,) = metrics_lib.read_jsonl(w.path)
  assert np.isnan(line["loss"]) and line["grad_norm"] == np.inf and line["x"] == -np.inf and line["ok"] == 2.0


def test_torn_last_line_is_dropped_with_a_warning_and_truncation_is_atomic(tmp_path, monkeypatch, capsys):
  w = metrics_lib.MetricWriter(str(tmp_path), tensorboard=False)
  for s in (1, 2, 3):
    w.scalars(s, {"loss": float(s)})
  with open(w.path, "a") as f:
    f.write('{"step": 4, "loss": 0.12')  # killed mid-write
  assert [l["step"] for l in metrics_lib.read_jsonl(w.path)] == [1, 2, 3]
  assert f"{w.path}:4: dropped a torn last line" in capsys.readouterr().out
  before = open(w.path).read()

  def crash(*a):  # the process dies between writing the temporary file and the rename
    raise OSError(errno.EIO, "injected")

  monkeypatch.setattr(os, "replace", crash)
  with pytest.raises(OSError):
    w.truncate_after(2)
  assert open(w.path).read() == before  # the file was not rewritten in place
  monkeypatch.undo()
  assert w.truncate_after(2) == 1
  assert open(w.path).read() == '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 2.0}\n'
  with open(w.path, "a") as f:
    f.write("garbage\n{}\n")
  with pytest.raises(ValueError, match=r"metrics.jsonl:3: not a JSON metric line"):  # not the last line: an error
    metrics_lib.read_jsonl(w.path)


def test_disk_full_during_a_metrics_write_names_the_file(tmp_path, monkeypatch):
  w = metrics_lib.MetricWriter(str(tmp_path), tensorboard=False)
  monkeypatch.setattr(metrics_lib, "open", _full_disk_open(lambda text: True), raising=False)
  with pytest.raises(OSError, match=f"writing {w.path}: No space left on device"):
    w.scalars(1, {"loss": 1.0})


def _full_disk_open(when):
  """open() whose text-mode writes matching `when` write half their text, then fail with ENOSPC."""

  class Full:

    def __init__(self, f):
      self.f = f

    def write(self, text):
      if when(text):
        self.f.write(text[: len(text) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
      return self.f.write(text)

    def __enter__(self):
      return self

    def __exit__(self, *a):
      self.f.close()

    def __iter__(self):
      return iter(self.f)

    def __getattr__(self, name):
      return getattr(self.f, name)

  return lambda *a, **k: Full(open(*a, **k))
