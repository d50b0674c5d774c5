"""Fault injection on the trainer (issue 12): each failure a user met either stops with a clear error naming the
key, file or holder, or resumes exactly. The data side is tests/test_faults_data.py.

This file (slow): a tiny SFT (the model of tests/test_trainer.py) runs to completion once, then is crashed before
its first checkpoint, has its disk fill during a metrics write, is killed (-9) in a subprocess during a checkpoint
save, has files of its newest checkpoint deleted, and gets an exploding learning rate; each run is compared with the
complete one.
"""

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from ekipl_jax.train import state_checkpoint as checkpoint_lib
from ekipl_jax.train import loop, trainer
from ekipl_jax.train import metrics as metrics_lib
from ekipl_jax.train import workdir as workdir_lib
from test_faults_metrics import _full_disk_open

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
  """A tiny SFT run (4 steps, checkpoints at 2 and 4) that never failed; later runs start from its init folder and
  share a persistent compilation cache (each run builds its step function anew)."""
  from test_trainer import tiny_config

  root = str(tmp_path_factory.mktemp("faults"))
  old = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_compilation_cache_dir", os.path.join(root, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  try:
    cfg = tiny_config(root)
    cfg.stage, cfg.data.eval_splits, cfg.workdir = "sft", (), os.path.join(root, "ref")
    out = trainer.run(cfg)
    yield {"root": root, "cfg": cfg, "metrics": out["metrics"], "weights": _weights(out["hf"])}
  finally:
    jax.config.update("jax_compilation_cache_dir", old[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])


def _from_ref(ref, name: str):
  cfg = copy.deepcopy(ref["cfg"])
  cfg.workdir, cfg.model.init_from = os.path.join(ref["root"], name), os.path.join(ref["root"], "ref", "init")
  return cfg


def _weights(folder):
  from safetensors.numpy import load_file

  return load_file(os.path.join(folder, "model.safetensors"))


def _same_run(ref, out):
  """Metrics (less timings) and exported weights equal to the run that never failed."""
  strip = lambda lines: [{k: v for k, v in l.items() if not k.startswith("time/")} for l in lines]
  assert strip(out["metrics"]) == [pytest.approx(l, rel=1e-6, abs=1e-6) for l in strip(ref["metrics"])]
  w = _weights(out["hf"])
  assert set(w) == set(ref["weights"])
  for k in w:
    np.testing.assert_array_equal(w[k], ref["weights"][k], err_msg=k)


@pytest.mark.slow
def test_crash_before_first_checkpoint_then_disk_full_then_resume(ref, monkeypatch, capsys):
  cfg = _from_ref(ref, "crashes")
  save = checkpoint_lib.Checkpointer.save

  def crash_at_first_save(self, step, *a, **k):  # the line of step 1 is written, its checkpoint is not
    if step == 1:
      raise RuntimeError("injected crash before the first checkpoint")
    return save(self, step, *a, **k)

  monkeypatch.setattr(checkpoint_lib.Checkpointer, "save", crash_at_first_save)
  with pytest.raises(RuntimeError, match="injected crash"):
    trainer.run(cfg)
  assert [l["step"] for l in metrics_lib.read_jsonl(os.path.join(cfg.workdir, "metrics.jsonl"))] == [1]
  monkeypatch.undo()
  # Rerun; the disk fills while step 3's line is written: half a line lands in the file.
  monkeypatch.setattr(metrics_lib, "open", _full_disk_open(lambda t: t.startswith('{"step": 3,')), raising=False)
  with pytest.raises(OSError, match=r"writing .*crashes/metrics.jsonl: No space left on device"):
    trainer.run(cfg)
  assert "starting at step 0, dropped 1 metric lines of an earlier run" in capsys.readouterr().out
  monkeypatch.undo()
  out = trainer.run(cfg)
  printed = capsys.readouterr().out
  assert "metrics.jsonl:3: dropped a torn last line" in printed
  assert f"[sft] resumed from {cfg.workdir}/checkpoints at step 2" in printed
  assert [l["step"] for l in out["metrics"]] == [1, 2, 3, 4]  # not 1, 1, 2, 3, 4
  _same_run(ref, out)


def _with(cfg, **kv):
  cfg = copy.deepcopy(cfg)
  cfg.update(kv)
  return cfg


_KILLER = textwrap.dedent("""
    import os, signal, sys
    root, workdir, repo, cache = sys.argv[1:5]
    sys.path[:0] = [repo, os.path.join(repo, "tests")]
    import jax
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    from ekipl_jax.train import state_checkpoint, trainer
    from test_trainer import tiny_config
    save = state_checkpoint.Checkpointer.save

    def save_then_die(self, step, *a, **k):  # kill -9 while the checkpoint of step 4 is being written
      out = save(self, step, *a, **k)
      if step == 4:
        os.kill(os.getpid(), signal.SIGKILL)
      return out

    state_checkpoint.Checkpointer.save = save_then_die
    cfg = tiny_config(root)  # as _from_ref builds it
    cfg.stage, cfg.data.eval_splits, cfg.workdir = "sft", (), workdir
    cfg.model.init_from = os.path.join(root, "ref", "init")
    trainer.run(cfg)
    """)


@pytest.mark.slow
def test_kill_9_during_a_checkpoint_save_then_resume_exactly(ref, capsys):
  cfg = _from_ref(ref, "killed")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  p = subprocess.run(
      [sys.executable, "-c", _KILLER, ref["root"], cfg.workdir, ROOT, jax.config.jax_compilation_cache_dir],
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
  assert [l["step"] for l in metrics_lib.read_jsonl(os.path.join(cfg.workdir, "metrics.jsonl"))] == [1, 2, 3, 4]
  out = trainer.run(cfg)
  printed = capsys.readouterr().out
  # The lock of the killed process is taken over; the run resumes from the last complete checkpoint (2, or 4 when
  # the background write finished before the kill) and ends as the run that was never killed.
  assert f"taking over the lock of {cfg.workdir}" in printed
  assert f"[sft] resumed from {cfg.workdir}/checkpoints at step " in printed
  _same_run(ref, out)


@pytest.mark.slow
def test_corrupt_newest_checkpoint_resumes_from_the_previous_one(ref, capsys):
  cfg = copy.deepcopy(ref["cfg"])
  cfg.workdir = os.path.join(ref["root"], "corrupt")
  shutil.copytree(ref["cfg"].workdir, cfg.workdir)
  shutil.rmtree(os.path.join(cfg.workdir, "checkpoints", "4", "meta"))
  shutil.rmtree(os.path.join(cfg.workdir, "hf"))
  out = trainer.run(cfg)
  printed = capsys.readouterr().out
  assert f"[checkpoint] step 4 in {cfg.workdir}/checkpoints is unreadable (KeyError" in printed
  assert f"[sft] resumed from {cfg.workdir}/checkpoints at step 2" in printed
  assert "Traceback" not in printed
  _same_run(ref, out)
  # The finished run again, with another learning rate: refused before anything is loaded.
  changed = copy.deepcopy(cfg)
  changed.sft.lr = 0.1
  with pytest.raises(workdir_lib.ConfigChanged, match=re.escape(f"1 keys differ:\n  sft.lr: {cfg.sft.lr!r} -> 0.1")):
    trainer.run(changed)
  # Every checkpoint unreadable: experiments/train.py stops with one clear error, not pages of orbax's shutdown
  # tracebacks (an uncaught error at that point prints about 900 lines).
  for step in os.listdir(os.path.join(cfg.workdir, "checkpoints")):
    shutil.rmtree(os.path.join(cfg.workdir, "checkpoints", step, "meta"))
  config_py = os.path.join(ref["root"], "tiny_sft_config.py")
  with open(config_py, "w") as f:
    f.write(_TINY_SFT_CONFIG)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE, env.get("PYTHONPATH", "")])
  p = subprocess.run(
      [sys.executable, os.path.join(ROOT, "experiments", "train.py"), f"--config={config_py}:{ref['root']},corrupt"],
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert p.returncode != 0
  assert f"NoReadableCheckpoint: no checkpoint in {cfg.workdir}/checkpoints could be restored (steps [4, 2]" in p.stderr
  assert len(p.stderr.splitlines()) < 100, p.stderr[-5000:]


_TINY_SFT_CONFIG = """
import os
from test_trainer import tiny_config


def get_config(arg):  # "ROOT,NAME": the config of test_faults_runs.ref with workdir ROOT/NAME
  root, name = arg.split(",")
  c = tiny_config(root)
  c.stage, c.data.eval_splits, c.workdir = "sft", (), os.path.join(root, name)
  return c
"""


@pytest.mark.slow
def test_exploding_sft_stops_after_consecutive_skips_with_nan_visible(ref):
  cfg = _from_ref(ref, "explode")
  cfg.sft.lr, cfg.max_consecutive_skips = 1e30, 2
  with pytest.raises(
      loop.NonFiniteUpdates, match=r"step 4: the last 2 steps skipped their update .*max_consecutive_skips=2"
  ):
    trainer.run(cfg)
  lines = [json.loads(l) for l in open(os.path.join(cfg.workdir, "metrics.jsonl"))]  # strict JSON, NaN visible
  assert [(l["step"], l["loss"], l["skipped"]) for l in lines[2:]] == [(3, "nan", 1.0), (4, "nan", 1.0)]
  assert not os.path.exists(os.path.join(cfg.workdir, "hf"))  # nothing exported
