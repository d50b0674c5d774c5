"""The trainer end to end on a tiny config: SFT, then RL (EKIPL, with an auxiliary store), each killed after a
checkpoint and resumed, must end with exactly the metrics and parameters of a run that was never killed."""

import copy
import json
import os

import numpy as np
import pytest

from configs import demo
from ekipl_jax.data import synthetic
from ekipl_jax.data import aux_store
from ekipl_jax.train import input_pipeline as data_lib
from ekipl_jax.train import loop, trainer

pytestmark = pytest.mark.slow


def tiny_config(root: str):
  c = demo.get_config()
  c.data.data_dir = os.path.join(root, "tfds")
  c.data.num_train, c.data.num_test, c.data.image_size = 48, 6, 84
  c.data.min_pixels = c.data.max_pixels = 84 * 84
  c.data.prompt_buckets = (128, 256)
  c.model.vocab_size = 400
  c.model.arch.update(
      hidden_size=32,
      num_hidden_layers=1,
      num_attention_heads=2,
      num_key_value_heads=1,
      intermediate_size=48,
      vision_hidden_size=16,
      vision_num_heads=2,
      vision_intermediate_size=24,
      vision_depth=2,
      vision_window_size=56,
      mrope_section=(2, 3, 3),
  )
  c.sft.steps, c.sft.batch_size, c.sft.num_examples, c.sft.max_completion = 4, 4, 16, 256
  c.rl.steps, c.rl.batch_prompts = 4, 2
  c.rl.group_size, c.rl.num_policy_samples, c.rl.num_external_per_model = 3, 2, 1
  c.rl.sampling.max_new_tokens = 12
  c.eval.every, c.eval.num_examples, c.eval.batch_size, c.eval.max_new_tokens = 2, 3, 3, 8
  c.checkpoint.every = 2
  return c


def _run(cfg, workdir, fail_at=-1):
  cfg = copy.deepcopy(cfg)
  cfg.workdir, cfg.fail_at_step = workdir, fail_at
  return trainer.run(cfg)


def _same(a: list[dict], b: list[dict]):
  assert [l["step"] for l in a] == [l["step"] for l in b]
  for la, lb in zip(a, b):
    keys = set(la) - {"time/step_s", "time/tokens_per_s"}
    assert keys == set(lb) - {"time/step_s", "time/tokens_per_s"}
    for k in keys:
      assert la[k] == pytest.approx(lb[k], rel=1e-6, abs=1e-6), (la["step"], k)


def test_sft_then_ekipl_resume_exactly(tmp_path):
  cfg = tiny_config(str(tmp_path))
  cfg.stage = "sft"
  cfg.data.eval_splits = ()
  full = _run(cfg, str(tmp_path / "sft_full"))
  with pytest.raises(loop.InjectedFailure):
    _run(cfg, str(tmp_path / "sft_killed"), fail_at=3)
  resumed = _run(cfg, str(tmp_path / "sft_killed"))
  _same(full["metrics"], resumed["metrics"])
  assert [l["step"] for l in full["metrics"]] == [1, 2, 3, 4]

  # External responses for the training ids: a perfect scripted solver.
  builder = data_lib.prepare(cfg.data)
  store = str(tmp_path / "aux")
  with aux_store.AuxStoreWriter(store) as w:
    for ex in data_lib.first(data_lib.source(builder, "train"), 0):
      cot, ans = synthetic.solve(*_scene(ex))
      w.append(aux_store.AuxResponse(id=ex["id"], source="solver_strong", text=synthetic.format_response(cot, ans)))

  rl_cfg = tiny_config(str(tmp_path))
  rl_cfg.stage, rl_cfg.model.init_from, rl_cfg.aux.store = "rl", full["hf"], store
  rl_cfg.aux.sources = ("solver_strong",)
  full_rl = _run(rl_cfg, str(tmp_path / "rl_full"))
  with pytest.raises(loop.InjectedFailure):
    _run(rl_cfg, str(tmp_path / "rl_killed"), fail_at=3)
  resumed_rl = _run(rl_cfg, str(tmp_path / "rl_killed"))
  _same(full_rl["metrics"], resumed_rl["metrics"])
  # Eval lines at steps 0, 2 and 4 and one line per step; the external solver entered the groups.
  steps = [l["step"] for l in full_rl["metrics"]]
  assert steps == [0, 1, 2, 3, 4]
  assert all("eval/test_id/accuracy" in l for l in full_rl["metrics"] if l["step"] in (0, 2, 4))
  assert all(l["groups/external_rows"] == 2.0 for l in full_rl["metrics"] if l["step"] > 0)
  # The trainer scores the policy's own tokens exactly as the sampler drew them (health check of both code paths).
  assert all(l["sampler_logp_diff_max"] < 1e-3 for l in full_rl["metrics"] if l["step"] > 0)
  # One group's completions, policy and external side by side with rewards and advantages, are logged as text.
  samples = open(os.path.join(str(tmp_path / "rl_full"), "samples.md")).read()
  assert "| solver_strong | " in samples and "| policy | " in samples and "advantage" in samples
  # The trained policy folder is written and reloads.
  for f in ("config.json", "model.safetensors", "tokenizer.json"):
    assert os.path.exists(os.path.join(resumed_rl["hf"], f))
  a = _weights(full_rl["hf"])
  b = _weights(resumed_rl["hf"])
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def test_unknown_stage_and_missing_store_are_config_errors(tmp_path):
  cfg = tiny_config(str(tmp_path))
  cfg.stage = "pretrain"
  with pytest.raises(ValueError, match="config key stage"):
    _run(cfg, str(tmp_path / "x"))
  cfg.stage, cfg.rl.selection, cfg.aux.store = "rl", "ekipl", ""
  with pytest.raises(ValueError, match="config key aux.store"):
    _run(cfg, str(tmp_path / "y"))


def _scene(ex):
  meta = json.loads(ex["metadata"])
  return meta["objects"], meta["question"]


def _weights(folder):
  from safetensors.numpy import load_file

  return load_file(os.path.join(folder, "model.safetensors"))
