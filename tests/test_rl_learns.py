"""End to end, the RL machinery raises the expected reward of a tiny random policy on a learnable task.

The stages of train/rl_stages.py (the ones rl_step runs) on a text-only tiny Qwen2-VL: sample (N samples per prompt) ->
assemble (+ a stored external response for EKIPL) -> reward -> select -> advantages -> update_batch -> the update
step with the trainer's log-prob function. The reward (registered as "target_fraction") is computed from the
completion text: the fraction of the C completion slots that hold the TARGET token (an EOS ends the completion and
leaves the remaining slots empty). A random policy scores ~1 / V; the policy that always emits TARGET scores 1.

The expected reward is measured before and after training on the same prompts with the same sampling key and many
samples, so the margin asserted is far beyond sampling noise (std of one measurement < 0.02). With the advantage's
sign flipped in rl/advantages.py both cases fail (the expected reward falls to ~0.00).
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ekipl_jax import models
from ekipl_jax import rewards as rewards_lib
from ekipl_jax.rl import config, update
from ekipl_jax.sampling import groups as groups_lib
from ekipl_jax.data.aux_store import AuxResponse
from ekipl_jax.train import rl_stages
from hf_fixtures import tiny_config_dict

V, EOS, PAD, TARGET = 32, 2, 0, 7  # vocabulary, end of completion, padding, the rewarded token
B, P, C, N = 4, 6, 6, 8  # prompts per step, prompt tokens, completion slots, policy samples (= kept group size G)
STEPS = 12  # RL steps
EVAL_SAMPLES = 64  # samples per prompt when measuring the expected reward


def tiny_policy(seed: int = 0):
  cfg = tiny_config_dict("qwen2_vl")
  cfg["text_config"] = dict(cfg["text_config"], vocab_size=V, eos_token_id=EOS)
  cfg.update(image_token_id=V - 4, video_token_id=V - 3, vision_start_token_id=V - 2, vision_end_token_id=V - 1)
  return models.init(cfg, jax.random.key(seed), dtype=jnp.float32, with_vision=False)


def prompts() -> tuple[np.ndarray, np.ndarray]:
  """B left-padded prompts of ordinary tokens (ids 3 .. V - 5)."""
  rng = np.random.default_rng(0)
  ids_BP = rng.integers(3, V - 4, (B, P)).astype(np.int32)
  mask_BP = np.ones((B, P), np.int32)
  mask_BP[1, :2] = 0
  ids_BP[1, :2] = PAD
  return ids_BP, mask_BP


def tokenize(text: str) -> list[int]:
  return [int(w) for w in text.split()]


def detokenize(ids) -> str:
  return " ".join(str(int(i)) for i in ids)


def reward(text: str, example: dict) -> float:
  return sum(int(w) == TARGET for w in text.split()) / C


if "target_fraction" not in rewards_lib.REWARDS:
  rewards_lib.register_reward("target_fraction")(reward)

CODEC = groups_lib.Codec(tokenize, detokenize, end_ids=(EOS,), eos_token_ids=(EOS,), pad_id=PAD)
EXAMPLES = [{"id": str(b)} for b in range(B)]


class PerfectStore:
  """The aux store interface groups.assemble reads: one external response per prompt, TARGET in C - 1 slots."""

  def get(self, example_id: str) -> list[AuxResponse]:
    return [AuxResponse(id=example_id, source="oracle", text=detokenize([TARGET] * (C - 1)))]


def rl_cfg(selection_mode: str):
  c = config.default()
  c.update(dict(selection=selection_mode, group_size=N, num_policy_samples=N, beta=0.0))
  c.rewards = (("target_fraction", 1.0),)
  c.sampling = ml_collections.ConfigDict(dict(max_new_tokens=C, temperature=1.0, top_p=1.0, top_k=0))
  c.optimizer.lr = 1e-2
  return c


def expected_reward(model, params, prompts: rl_stages.Prompts, cfg) -> float:
  sc = rl_stages.SamplingConfig(EVAL_SAMPLES, C, temperature=1.0, eos_token_ids=(EOS,), pad_token_id=PAD)
  out = rl_stages.sample(model, params, prompts, sc, jax.random.key(123))
  g = rl_stages.assemble(prompts, out, None, CODEC, cfg)
  return float(np.mean(rl_stages.reward(g, EXAMPLES, cfg)[0]))


def rl_step(model, train_step, state, cfg, store, prompts: rl_stages.Prompts, step: int):
  """One GRPO / EKIPL step: train/rl_stages.py's run_step, as rl_step runs it, minus the dataset and the processor."""
  rng = jax.random.fold_in(jax.random.key(0), step)
  sources = ("oracle",) if store else ()
  state, metrics, _ = rl_stages.run_step(
      model, state, train_step, prompts, EXAMPLES, store, CODEC, cfg, rng, source_names=sources
  )
  return state, metrics["reward/policy_mean"]


def train(selection_mode: str, store) -> tuple[float, float, list[float]]:
  """(expected reward before, after STEPS steps, the sampled policy reward of each step)."""
  model, params = tiny_policy()
  ids_BP, mask_BP = prompts()
  prompts_ = rl_stages.Prompts(ids_BP, mask_BP, tuple(ex["id"] for ex in EXAMPLES))
  cfg = rl_cfg(selection_mode)
  optimizer = update.make_optimizer(cfg.optimizer)
  train_step = update.make_train_step(rl_stages.make_logprob_fn(model, P, chunk=8), optimizer, cfg)
  before = expected_reward(model, params, prompts_, cfg)
  state = update.init_state(params, optimizer)
  curve = []
  for step in range(STEPS):
    state, r = rl_step(model, train_step, state, cfg, store, prompts_, step)
    curve.append(r)
  return before, expected_reward(model, state.params, prompts_, cfg), curve


@pytest.mark.parametrize("selection_mode,store", [("none", None), ("ekipl", PerfectStore())], ids=["grpo", "ekipl"])
def test_rl_raises_expected_reward(selection_mode, store):
  before, after, curve = train(selection_mode, store)
  assert before < 0.1, before
  assert after > before + 0.3, (before, after, curve)
  assert np.mean(curve[-3:]) > np.mean(curve[:3]) + 0.2, curve
