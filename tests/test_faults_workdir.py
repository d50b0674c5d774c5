"""Fault injection on the trainer (issue 12): each failure a user met either stops with a clear error naming the
key, file or holder, or resumes exactly. The data side is tests/test_faults_data.py.

This file: the workdir lock against a live and a killed holder; config changes on resume (refused unless asked,
the old config.json kept).
"""

import copy
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from configs import demo
from ekipl_jax.train import trainer
from ekipl_jax.train import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
