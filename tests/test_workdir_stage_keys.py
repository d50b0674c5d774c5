"""A stage's resume ignores the config sections it never reads (train/workdir.py STAGE_FREE_PREFIXES)."""

import copy

import pytest

from configs import demo
from ekipl_jax.train import workdir as workdir_lib


def test_sft_resume_ignores_rl_and_aux_keys_but_not_its_own(tmp_path):
  wd = str(tmp_path)
  c = demo.get_config()
  c.stage = "sft"
  workdir_lib.write_config(wd, c, keep_old=False)
  c2 = copy.deepcopy(c)
  c2.rl.optimizer.lr, c2.rl.steps, c2.aux.store = 1.0, 7, "/elsewhere"  # never read by SFT
  assert workdir_lib.check_config(wd, c2) == {}
  c2.sft.lr = 0.5
  with pytest.raises(workdir_lib.ConfigChanged, match="1 keys differ"):
    workdir_lib.check_config(wd, c2)


def test_rl_resume_ignores_sft_keys_and_a_stage_change_is_seen(tmp_path):
  wd = str(tmp_path)
  c = demo.get_config()
  c.stage = "rl"
  workdir_lib.write_config(wd, c, keep_old=False)
  c2 = copy.deepcopy(c)
  c2.sft.steps = 1
  assert workdir_lib.check_config(wd, c2) == {}
  c2.rl.steps = c.rl.steps + 1
  assert set(workdir_lib.config_diff(c.to_dict(), c2.to_dict())) == {"rl.steps"}
  c3 = copy.deepcopy(c)
  c3.stage, c3.sft.steps = "sft", 1  # another stage: every key counts
  assert set(workdir_lib.config_diff(c.to_dict(), c3.to_dict())) == {"stage", "sft.steps"}
