"""Fault injection on the trainer (issue 12): each failure a user met either stops with a clear error naming the
key, file or holder, or resumes exactly. The data side is tests/test_faults_data.py.

This file: config validation before anything loads (each error names the key), and the shipped configs pass it.
"""

import os

import pytest

from configs import base, demo, paper
from ekipl_jax.train import trainer, validate


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
