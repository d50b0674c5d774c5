"""Fault injection on the trainer: each failure a user met (issue 12) either stops with a clear error naming the key,
file or holder, or resumes exactly (metrics and weights equal to a run that never failed).

Fast tests (no model): config validation, the workdir lock against a live and a killed holder, metrics.jsonl with
NaN values and torn lines, checkpoints with deleted files, config changes on resume. Slow tests run a tiny SFT (the
model of tests/test_trainer.py) to completion once, then crash it before its first checkpoint, fill the disk during
a metrics write, kill -9 a subprocess during a checkpoint save, delete files of its newest checkpoint, explode the
learning rate; each compared with the complete run.
"""

import copy
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base, demo, paper
from ekipl_jax.train import state_checkpoint as checkpoint_lib
from ekipl_jax.train import loop, trainer, validate
from ekipl_jax.train import metrics as metrics_lib
from ekipl_jax.train import workdir as workdir_lib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


# ------------------------------------------------------------------------------------------ config validation


def _rl_config():
  c = demo.get_config()
  c.stage = "rl"
  c.aux.store = "/nonexistent/store"  # never opened: validation comes first
  return c


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("rl.group_size", 0, "config key rl.group_size: must be an integer >= 2, got 0"),
        ("rl.sampling.max_new_tokens", 0, "config key rl.sampling.max_new_tokens: must be an integer >= 1, got 0"),
        ("rl.sampling.temperature", 0.0, "config key rl.sampling.temperature: 0 (greedy) is refused for RL"),
        ("rl.sampling.top_p", 2.0, "config key rl.sampling.top_p: must be in (0.0, 1.0], got 2.0"),
        ("rl.sampling.top_k", -1, "config key rl.sampling.top_k: must be an integer >= 0, got -1"),
        ("rl.optimizer.lr", -1e-6, "config key rl.optimizer.lr: must be > 0, got -1e-06"),
        ("rl.optimizer.lr", float("nan"), "config key rl.optimizer.lr: must be a finite number, got nan"),
        ("rl.steps", 0, "config key rl.steps: must be an integer >= 1, got 0"),
        ("rl.num_policy_samples", 0, "config key rl.num_policy_samples: must be an integer >= 1, got 0"),
        ("rl.num_external_per_model", -1, "config key rl.num_external_per_model: must be an integer >= 0, got -1"),
        ("rl.micro_batches", 3, "config key rl.micro_batches: 3 does not divide the update batch"),
        ("rl.selection", "top", "config key rl.selection: unknown value 'top'"),
        ("rl.external_treatment", "magic", "config key rl.external_treatment: unknown value 'magic'"),
        ("rl.group_size", 30, "config key rl.group_size: G=30 exceeds the pool N + M*K"),
        ("eval.top_p", 0.0, "config key eval.top_p: must be in (0.0, 1.0], got 0.0"),
        ("checkpoint.every", 0, "config key checkpoint.every: must be an integer >= 1, got 0"),
        ("stage", "pretrain", "config key stage: unknown value 'pretrain'"),
    ],
)
def test_bad_config_values_are_refused_naming_the_key(key, value, message):
  c = _rl_config()
  parent, leaf = c, key.split(".")
  for part in leaf[:-1]:
    parent = parent[part]
  parent[leaf[-1]] = value
  with pytest.raises(ValueError) as e:
    validate.config(c)
  assert str(e.value).startswith(message), str(e.value)


def test_group_arithmetic_and_sft_keys():
  c = _rl_config()
  c.rl.selection, c.rl.num_policy_samples, c.rl.group_size = "none", 4, 8  # GRPO keeps G of N policy rows
  with pytest.raises(
      ValueError, match="config key rl.num_policy_samples: selection 'none' keeps G=8 policy rows of N=4"
  ):
    validate.config(c)
  c = _rl_config()
  c.aux.sources = ()
  with pytest.raises(ValueError, match="config key aux.sources: selection 'ekipl' needs external rows"):
    validate.config(c)
  c = demo.get_config()
  c.stage, c.sft.lr = "sft", 0.0
  with pytest.raises(ValueError, match="config key sft.lr: must be > 0, got 0.0"):
    validate.config(c)


def test_temperature_zero_is_greedy_in_evaluation():
  """eval.temperature 0 is accepted and is the sampler's argmax (its documented greedy mode)."""
  from ekipl_jax.sampling import sample

  c = _rl_config()
  c.eval.temperature = 0.0
  validate.config(c)
  assert sample.SamplingParams(0.0, 0.9, 50).greedy
  c.eval.pass_k = 4  # k greedy samples are one sample k times
  with pytest.raises(ValueError, match="config key eval.pass_k"):
    validate.config(c)


def test_shipped_configs_validate():
  for v in paper.VARIANTS:
    validate.config(paper.get_config(v))
  for stage in ("sft", "rl"):
    c = demo.get_config()
    c.stage = stage
    validate.config(c)
  c = base.get_config()
  c.rl.selection = "none"
  validate.config(c)


def test_mesh_is_checked_against_the_devices(capsys):
  c = _rl_config()
  c.mesh.shape = (3, 1, 1)
  with pytest.raises(ValueError, match=r"config key mesh.shape: \(3, 1, 1\) does not fit the 8 devices"):
    validate.mesh(c, 8)
  c.mesh.shape = (-1, 1, 1)
  c.rl.batch_prompts, c.rl.group_size = 1, 6  # 6 update rows over 8 devices: replicated, with a warning
  validate.mesh(c, 8)
  assert "rl.batch_prompts * rl.group_size / rl.micro_batches = 6 rows do not divide" in capsys.readouterr().err


def test_trainer_refuses_bad_config_before_loading_anything(tmp_path):
  c = demo.get_config()
  c.stage, c.workdir, c.data.data_dir = "sft", str(tmp_path / "run"), str(tmp_path / "tfds")
  c.sft.batch_size = 0
  with pytest.raises(ValueError, match="config key sft.batch_size"):
    trainer.run(c)
  assert not os.path.exists(c.workdir) and not os.path.exists(c.data.data_dir)


# ------------------------------------------------------------------------------------------ workdir lock


_HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[2])
    from ekipl_jax.train import workdir
    with workdir.lock(sys.argv[1]):
      print("locked", flush=True)
      time.sleep(600)
    """)


def test_second_run_in_a_workdir_is_refused_and_a_dead_holders_lock_taken_over(tmp_path, capsys):
  wd = str(tmp_path / "run")
  holder = subprocess.Popen([sys.executable, "-c", _HOLDER, wd, ROOT], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    c = demo.get_config()
    c.stage, c.workdir, c.data.data_dir = "sft", wd, str(tmp_path / "tfds")
    with pytest.raises(workdir_lib.WorkdirBusy, match=f"in use by another run \\(pid {holder.pid} on "):
      trainer.run(c)
    assert not os.path.exists(c.data.data_dir)  # refused before anything was loaded or written
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  with workdir_lib.lock(wd):
    assert f"taking over the lock of {wd}: its holder (pid {holder.pid} on" in capsys.readouterr().out
  with workdir_lib.lock(wd):  # a normal end leaves nothing to take over
    assert "taking over" not in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ metrics.jsonl


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


# ------------------------------------------------------------------------------------------ checkpoints


def _three_checkpoints(d):
  state = {"a": jnp.arange(4.0), "b": jnp.ones((2, 3))}
  c = checkpoint_lib.Checkpointer(d, every=1, keep=3)
  for s in (1, 2, 3):
    c.save(s, jax.tree.map(lambda x: x * s, state), {"step": s})
  c.close()
  return state


def _delete_data_files(step_dir):
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    if os.path.basename(root) == "d":
      for f in files:
        os.remove(os.path.join(root, f))


@pytest.mark.parametrize("damage", ["meta", "manifest", "data"])
def test_unreadable_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage, capsys):
  d = str(tmp_path / "ck")
  state = _three_checkpoints(d)
  if damage == "meta":
    shutil.rmtree(os.path.join(d, "3", "meta"))
  elif damage == "manifest":
    os.remove(os.path.join(d, "3", "state", "manifest.ocdbt"))
  else:
    _delete_data_files(os.path.join(d, "3"))
  c = checkpoint_lib.Checkpointer(d, every=1, keep=3)
  restored, meta = c.restore_latest(state)
  out = capsys.readouterr().out.splitlines()
  assert meta == {"step": 2} and np.array_equal(restored["a"], np.arange(4.0) * 2)
  assert out[0].startswith(f"[checkpoint] step 3 in {d} is unreadable (") and len(out) == 2, out
  assert out[1] == f"[checkpoint] using step 2 instead; unreadable steps [3] moved to {d}.unreadable"
  c.save(3, jax.tree.map(lambda x: x * 30, state), {"step": 3})  # the step is saved anew
  c.close()
  assert checkpoint_lib.Checkpointer(d, every=1, keep=3).restore(state)[1] == {"step": 3}
  assert len(os.listdir(d + ".unreadable")) == 1


def test_no_readable_checkpoint_is_one_clear_error(tmp_path):
  d = str(tmp_path / "ck")
  state = _three_checkpoints(d)
  for s in (1, 2, 3):
    shutil.rmtree(os.path.join(d, str(s), "meta"))
  c = checkpoint_lib.Checkpointer(d, every=1, keep=3)
  with pytest.raises(
      checkpoint_lib.NoReadableCheckpoint, match=r"no checkpoint in .* could be restored \(steps \[3, 2, 1\]"
  ):
    c.restore_latest(state)
  c.close()


def _loop_config(**kv):
  import ml_collections

  c = dict(checkpoint=dict(every=1, keep=2), log_every=1, fail_at_step=-1, max_consecutive_skips=3)
  return ml_collections.ConfigDict({**c, **kv})


def test_consecutive_skips_stop_the_loop_and_survive_a_resume(tmp_path):
  """The loop of both stages: an RL step reports `skipped` as the SFT step does (rl/update.py). Steps 2.. skip their
  update; the run is killed before step 4 and resumed: the count of consecutive skips (2) comes back from the
  checkpoint, so the third skip in a row (step 4) stops the run, as it stops one that was never killed."""
  state = {"w": jnp.zeros(3)}
  step_fn = lambda st, i: (st, {"loss": jnp.nan if i >= 1 else 1.0, "skipped": float(i >= 1)})
  wd = str(tmp_path)
  with pytest.raises(loop.InjectedFailure):
    loop.run_loop("rl", _loop_config(fail_at_step=3), wd, state, 10, step_fn, None, 0)
  with pytest.raises(loop.NonFiniteUpdates, match=r"\[rl\] step 4: the last 3 steps skipped their update .*loss nan"):
    loop.run_loop("rl", _loop_config(), wd, state, 10, step_fn, None, 0)
  lines = metrics_lib.read_jsonl(os.path.join(wd, "metrics.jsonl"))
  assert [l["step"] for l in lines] == [1, 2, 3, 4] and np.isnan(lines[-1]["loss"])
  assert loop.run_loop("rl", _loop_config(max_consecutive_skips=0), str(tmp_path / "b"), state, 5, step_fn, None, 0)


# ------------------------------------------------------------------------------------------ config on resume


def test_resume_with_a_changed_config_is_refused_unless_asked(tmp_path, capsys):
  wd = str(tmp_path)
  c = demo.get_config()
  workdir_lib.write_config(wd, c, keep_old=False)
  c2 = copy.deepcopy(c)
  c2.fail_at_step, c2.mesh.process_id = 3, 1  # launch keys: no difference
  assert workdir_lib.check_config(wd, c2) == {}
  c2.rl.optimizer.lr, c2.rl.group_size = 1e-3, 4
  with pytest.raises(workdir_lib.ConfigChanged) as e:
    workdir_lib.check_config(wd, c2)
  assert "2 keys differ" in str(e.value) and "rl.group_size: 8 -> 4" in str(e.value)
  assert f"rl.optimizer.lr: {c.rl.optimizer.lr!r} -> 0.001" in str(e.value) and "--config.resume_changed=True" in str(
      e.value
  )
  c2.resume_changed = True
  assert set(workdir_lib.check_config(wd, c2)) == {"rl.optimizer.lr", "rl.group_size"}
  assert "rl.group_size: 8 -> 4" in capsys.readouterr().err
  workdir_lib.write_config(wd, c2, keep_old=True)
  (old,) = [f for f in os.listdir(wd) if f.startswith("config.") and f != "config.json"]
  assert (
      json.load(open(os.path.join(wd, old)))["rl"]["optimizer"]["lr"] == c.rl.optimizer.lr
  )  # old kept, not overwritten
  assert json.load(open(os.path.join(wd, "config.json")))["rl"]["optimizer"]["lr"] == 1e-3


# ------------------------------------------------------------------------------------------ tiny runs (slow)


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
  # tracebacks (about 900 lines before).
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


def get_config(arg):  # "ROOT,NAME": the config of test_faults.ref with workdir ROOT/NAME
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
