"""End to end, the RL machinery raises the expected reward of a tiny random policy on a learnable task.

The real path of train/rl.py on a text-only tiny Qwen2-VL: sampling.generate (N samples per prompt) -> groups.assemble
(+ a stored external response for EKIPL) -> reward -> selection.select -> advantages.compute ->
batching.rows_batch -> update.make_train_step with the trainer's log-prob function. The reward is computed from the
completion text: the fraction of the C completion slots that hold the TARGET token (an EOS ends the completion and
leaves the remaining slots empty). A random policy scores ~1 / V; the policy that always emits TARGET scores 1.

The expected reward is measured before and after training on the same prompts with the same sampling key and many
samples, so the margin asserted is far beyond sampling noise (std of one measurement < 0.02). With the advantage's
sign flipped in rl/advantages.py both cases fail (the expected reward falls to ~0.00).
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ekipl_jax import models, sampling
from ekipl_jax.rl import advantages, config, selection, update
from ekipl_jax.rl import batch as rl_batch
from ekipl_jax.sampling import groups as groups_lib
from ekipl_jax.sampling.aux_store import AuxResponse
from ekipl_jax.train import batching
from ekipl_jax.train import rl as train_rl
from hf_fixtures import tiny_config_dict

V, EOS, PAD, TARGET = 32, 2, 0, 7  # vocabulary, end of completion, padding, the rewarded token
B, P, C, G = 4, 6, 6, 8  # prompts per step, prompt tokens, completion slots, group size
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


def reward(text: str) -> float:
  return sum(int(w) == TARGET for w in text.split()) / C


class PerfectStore:
  """The aux store interface groups.assemble reads: one external response per prompt, TARGET in C - 1 slots."""

  def get(self, example_id: str) -> list[AuxResponse]:
    return [AuxResponse(id=example_id, source="oracle", text=detokenize([TARGET] * (C - 1)))]


def rl_cfg(selection_mode: str):
  c = config.default()
  c.update(dict(selection=selection_mode, group_size=G, num_policy_samples=G, beta=0.0))
  c.optimizer.lr = 1e-2
  return c


def sample(model, params, ids_BP, mask_BP, n: int, rng):
  return sampling.generate(
      model,
      params,
      ids_BP,
      mask_BP,
      max_new_tokens=C,
      temperature=1.0,
      eos_token_ids=[EOS],
      rng=rng,
      num_samples=n,
      pad_token_id=PAD,
      prompt_buckets=(P,),
  )


def expected_reward(model, params, ids_BP, mask_BP) -> float:
  out = sample(model, params, ids_BP, mask_BP, EVAL_SAMPLES, jax.random.key(123))
  g = groups_lib.assemble(
      ids_BP,
      mask_BP,
      [str(b) for b in range(B)],
      out,
      None,
      tokenize=tokenize,
      detokenize=detokenize,
      end_ids=[EOS],
      eos_token_ids=[EOS],
      source_names=(),
      k_per_source=0,
      pad_id=PAD,
  )
  return float(np.mean([reward(t) for t in g.texts]))


def rl_step(model, train_step, state, cfg, store, ids_BP, mask_BP, step: int):
  """One GRPO / EKIPL step as train/rl.py does it, minus the dataset and the processor."""
  rng = jax.random.fold_in(jax.random.key(0), step)
  out = sample(model, state.params, ids_BP, mask_BP, cfg.num_policy_samples, rng)
  g = groups_lib.assemble(
      ids_BP,
      mask_BP,
      [str(b) for b in range(B)],
      out,
      store,
      tokenize=tokenize,
      detokenize=detokenize,
      end_ids=[EOS],
      eos_token_ids=[EOS],
      source_names=("oracle",) if store else (),
      k_per_source=1,
      pad_id=PAD,
  )
  r_R = np.array([reward(t) for t in g.texts])
  keep, _ = selection.select(r_R, g.source_R, g.prompt_index_R, cfg)
  A_K = advantages.compute(r_R[keep], g.prompt_index_R[keep], g.source_R[keep], cfg)
  rows = batching.rows_batch(
      model, g.prompt_ids_RP[keep], g.prompt_mask_RP[keep], g.completion_ids_RC[keep], g.completion_mask_RC[keep]
  )
  batch = rl_batch.from_rows(rows, A_R=A_K, is_external_R=g.source_R[keep] > 0)
  state, _ = train_step(state, jax.tree.map(jnp.asarray, batch))
  return state, float(r_R[g.source_R == 0].mean())


def train(selection_mode: str, store) -> tuple[float, float, list[float]]:
  """(expected reward before, after STEPS steps, the sampled policy reward of each step)."""
  model, params = tiny_policy()
  ids_BP, mask_BP = prompts()
  cfg = rl_cfg(selection_mode)
  optimizer = update.make_optimizer(cfg.optimizer)
  train_step = update.make_train_step(train_rl.make_logprob_fn(model, P, chunk=8), optimizer, cfg)
  before = expected_reward(model, params, ids_BP, mask_BP)
  state = update.init_state(params, optimizer)
  curve = []
  for step in range(STEPS):
    state, r = rl_step(model, train_step, state, cfg, store, ids_BP, mask_BP, step)
    curve.append(r)
  return before, expected_reward(model, state.params, ids_BP, mask_BP), curve


@pytest.mark.parametrize("selection_mode,store", [("none", None), ("ekipl", PerfectStore())], ids=["grpo", "ekipl"])
def test_rl_raises_expected_reward(selection_mode, store):
  before, after, curve = train(selection_mode, store)
  assert before < 0.1, before
  assert after > before + 0.3, (before, after, curve)
  assert np.mean(curve[-3:]) > np.mean(curve[:3]) + 0.2, curve
