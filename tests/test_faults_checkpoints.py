"""Fault injection on the trainer (issue 12): each failure a user met either stops with a clear error naming the
key, file or holder, or resumes exactly. The data side is tests/test_faults_data.py.

This file: orbax checkpoints with deleted files (the newest unreadable: the previous one is used; none readable:
one clear error), and the count of consecutive skipped updates surviving a resume.
"""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ekipl_jax.train import state_checkpoint as checkpoint_lib
from ekipl_jax.train import loop
from ekipl_jax.train import metrics as metrics_lib


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
