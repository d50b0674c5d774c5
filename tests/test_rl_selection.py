"""EKIPL selection and advantages: expected values worked out by hand / with numpy."""

import numpy as np
import pytest

from ekipl_jax.rl import advantages, config, selection


def _cfg(**kw):
  c = config.default()
  c.group_size = 4
  c.update(kw)
  return c


# Two prompts, pool of 8 each: 4 policy rows, then 2 rows of external model 1, then 2 of model 2.
SOURCES = np.array([0, 0, 0, 0, 1, 1, 2, 2] * 2)
REWARDS = np.array([1, 0, 2, 0, 2, 1, 0, 2, 1, 1, 1, 1, 1, 1, 1, 1], np.float64)
ACCURACY = np.array([1, 0, 1, 0, 1, 1, 0, 1, 0, 1, 0, 0, 1, 1, 1, 1], np.float64)
PROMPT = np.repeat([7, 3], 8)  # prompt ids need not be sorted: groups follow first appearance


def test_ekipl_top_g_and_ties():
  keep, _ = selection.select(REWARDS, SOURCES, PROMPT, _cfg())
  # prompt 7: reward 2 at rows 2 (policy), 4, 7 (external); then reward 1: row 0 (policy) beats row 5 (external).
  # prompt 3: all rewards equal: the policy rows win.
  np.testing.assert_array_equal(keep, [0, 2, 4, 7, 8, 9, 10, 11])


def test_ekipl_tie_policy_before_external_regardless_of_position():
  keep, _ = selection.select([1.0, 1.0, 1.0, 0.0], [1, 0, 1, 0], [0, 0, 0, 0], _cfg(group_size=2))
  np.testing.assert_array_equal(keep, [0, 1])  # row 1 (policy) first, then row 0 (external, lower index than 2)


def test_none_all_replace():
  keep, m = selection.select(REWARDS, SOURCES, PROMPT, _cfg(selection="none"))
  np.testing.assert_array_equal(keep, [0, 1, 2, 3, 8, 9, 10, 11])
  assert m["source_ratio/external"] == 0.0
  keep, m = selection.select(REWARDS, SOURCES, PROMPT, _cfg(selection="all"))
  np.testing.assert_array_equal(keep, np.arange(16))
  assert m["source_ratio/external"] == 0.5
  keep, m = selection.select(REWARDS, SOURCES, PROMPT, _cfg(selection="replace", num_replace=1))
  np.testing.assert_array_equal(keep, [0, 1, 2, 4, 8, 9, 10, 12])
  assert m["source_ratio/external"] == 0.25 and m["source_ratio/model_2"] == 0.0


def test_kept_rows_per_prompt_follow_the_rule():
  """G as selection.py's rules keep it (the rows select() returned above): 'all' the pool of 8, others group_size 4;
  train/validate.py sizes the update batch with it."""
  from configs import base
  from ekipl_jax.train import validate

  assert [selection.kept_per_prompt(n, 4, 8) for n in ("ekipl", "none", "all", "replace")] == [4, 4, 8, 4]
  assert selection.keeps_pool("all") and not selection.keeps_pool("ekipl")
  c = base.get_config()
  c.stage, c.aux.sources, c.rl.selection, c.rl.group_size = "rl", ("a",), "all", 0  # group_size unused by 'all'
  c.rl.num_policy_samples, c.rl.num_external_per_model, c.rl.batch_prompts, c.rl.micro_batches = 6, 2, 1, 1
  validate.config(c)
  c.rl.selection = "ekipl"
  with pytest.raises(ValueError, match="config key rl.group_size: must be an integer >= 2, got 0"):
    validate.config(c)


def test_source_metrics():
  _, m = selection.select(REWARDS, SOURCES, PROMPT, _cfg(), accuracy_R=ACCURACY)
  # kept rows 0,2,4,7 | 8,9,10,11 -> sources 0,0,1,2 | 0,0,0,0
  assert m["source_ratio/external"] == 0.25
  assert m["source_ratio/model_1"] == 0.125 and m["source_ratio/model_2"] == 0.125
  assert m["kept/reward_mean/policy"] == pytest.approx(7 / 6)  # 1,2,1,1,1,1
  assert m["kept/reward_mean/external"] == 2.0
  assert m["kept/solved/policy"] == pytest.approx(3 / 6)  # acc of rows 0,2,8,9,10,11: 1,1,0,1,0,0
  assert m["kept/solved/external"] == 1.0
  assert m["pool/reward_mean/policy"] == pytest.approx(7 / 8)
  assert m["pool/reward_mean/external"] == pytest.approx(9 / 8)
  assert m["pool/solved/policy"] == pytest.approx(3 / 8)
  assert m["pool/solved/external"] == pytest.approx(7 / 8)
  assert m["zero_var_groups"] == 0.5  # prompt 3 kept rewards are all 1


def test_too_small_pool_raises():
  with pytest.raises(ValueError):
    selection.select(REWARDS, SOURCES, PROMPT, _cfg(selection="none", group_size=5))


def test_advantages_group_unbiased_std():
  A = advantages.compute([1, 0, 0, 1, 2, 2, 2, 2], [0] * 4 + [1] * 4, [0] * 8, _cfg())
  s = np.sqrt(1 / 3)  # unbiased std of [1, 0, 0, 1]
  np.testing.assert_allclose(A, np.array([1, -1, -1, 1, 0, 0, 0, 0]) * 0.5 / (s + 1e-4), rtol=1e-6)


def test_advantages_variants_vs_numpy():
  rng = np.random.default_rng(0)
  r = rng.normal(size=12)
  g = np.repeat([0, 1, 2], 4)
  src = np.tile([0, 0, 1, 2], 3)
  rg = r.reshape(3, 4)
  np.testing.assert_allclose(
      advantages.compute(r, g, src, _cfg(adv_std="none")), (rg - rg.mean(1, keepdims=True)).ravel(), rtol=1e-5
  )
  np.testing.assert_allclose(
      advantages.compute(r, g, src, _cfg(adv_std="batch")),
      ((rg - rg.mean(1, keepdims=True)) / (r.std(ddof=1) + 1e-4)).ravel(),
      rtol=1e-5,
  )
  np.testing.assert_allclose(
      advantages.compute(r, g, src, _cfg(adv_ddof=0)),
      ((rg - rg.mean(1, keepdims=True)) / (rg.std(1, keepdims=True) + 1e-4)).ravel(),
      rtol=1e-5,
  )
  pol = rg[:, :2]  # grpo_split: mean and std of the policy rows only
  np.testing.assert_allclose(
      advantages.compute(r, g, src, _cfg(adv_stats_from="policy")),
      ((rg - pol.mean(1, keepdims=True)) / (pol.std(1, ddof=1, keepdims=True) + 1e-4)).ravel(),
      rtol=1e-5,
  )


def test_advantages_policy_stats_luffy_zero_std_and_single_row():
  """adv_stats_from='policy' follows LUFFY's grpo_split (by hand, eps = 1e-4):
  group 0: policy rewards [0, 0] (std 0 -> 1), external 2: A = [0, 0, 2] / (1 + eps) (was 2 / eps = 20000);
  group 1: one policy row (reward 1): mean 0, std 1, external [2, 0]: A = [1, 2, 0] / (1 + eps)."""
  r = [0, 0, 2, 1, 2, 0]
  A = advantages.compute(r, [0, 0, 0, 1, 1, 1], [0, 0, 1, 0, 1, 2], _cfg(adv_stats_from="policy"))
  np.testing.assert_allclose(A, np.array([0, 0, 2, 1, 2, 0]) / (1 + 1e-4), rtol=1e-6)
  # 'batch': the policy rows' std over the batch (rewards 0, 0, 1: unbiased std 1/sqrt(3)), means per group as above.
  A = advantages.compute(r, [0, 0, 0, 1, 1, 1], [0, 0, 1, 0, 1, 2], _cfg(adv_stats_from="policy", adv_std="batch"))
  np.testing.assert_allclose(A, np.array([0, 0, 2, 1, 2, 0]) / (np.sqrt(1 / 3) + 1e-4), rtol=1e-6)
  # 'all' is unchanged: group 0 mean 2/3, std of [0, 0, 2] = 2/sqrt(3).
  A = advantages.compute(r[:3], [0, 0, 0], [0, 0, 1], _cfg())
  np.testing.assert_allclose(A, (np.array([0, 0, 2]) - 2 / 3) / (2 / np.sqrt(3) + 1e-4), rtol=1e-6)


def test_registries_feed_the_config_lists_and_take_a_new_rule():
  from configs import ablations

  assert ablations.SELECTIONS == selection.RULES.names == ("ekipl", "none", "all", "replace")
  assert ablations.TREATMENTS == ("paper", "luffy", "importance", "importance_tis", "rlplus")
  assert not selection.reads_store("none") and selection.reads_store("ekipl")
  with pytest.raises(ValueError, match="config key rl.selection: unknown value 'top'"):
    selection.select(REWARDS, SOURCES, PROMPT, _cfg(selection="top"))
  with pytest.raises(ValueError, match="config key rl.adv_std: unknown value 'max'"):
    advantages.compute([1.0, 0.0], [0, 0], [0, 0], _cfg(adv_std="max"))

  @selection.RULES.register("last_g")  # a new rule is one function and one decorator
  def _last_g(rows, rewards_R, sources_R, cfg):
    return rows[-cfg.group_size :]

  try:
    keep, _ = selection.select(REWARDS, SOURCES, PROMPT, _cfg(selection="last_g"))
    np.testing.assert_array_equal(keep, [4, 5, 6, 7, 12, 13, 14, 15])
  finally:
    del selection.RULES["last_g"], selection.RULES.info["last_g"]
