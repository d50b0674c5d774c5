"""One GRPO / Vision-EKIPL step, end to end on the host side:

  prompts --sampler--> N policy samples --groups--> + K stored responses of each external model (the pool)
    --rewards--> r --selection--> G kept rows per prompt --advantages--> A --update step--> new params

Everything random derives from (seed, step); the examples of step s are a function of (seed, s).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import numpy as np

from ekipl_jax import rewards as rewards_lib
from ekipl_jax import sampling, sharding
from ekipl_jax.data import processor as processor_lib
from ekipl_jax.models import packed
from ekipl_jax.rl import advantages, selection, update
from ekipl_jax.rl import batch as rl_batch
from ekipl_jax.sampling import groups as groups_lib
from ekipl_jax.train import batching
from ekipl_jax.train import data as data_lib


@dataclasses.dataclass
class RLContext:
  cfg: Any
  model: Any
  proc: Any
  train_src: Any
  store: Any  # AuxStore or None (plain GRPO)
  mesh: Any
  train_step: Any  # update.make_train_step(...) for this prompt length
  ref_params: Any = None  # frozen reference policy (only when beta > 0)
  last_group_text: str = ""


def logprob_temperature(rcfg) -> float:
  """T of the loss's log-probs (config key rl.logprob_temperature; None: rl.sampling.temperature)."""
  return rcfg.sampling.temperature if rcfg.logprob_temperature is None else rcfg.logprob_temperature


def make_logprob_fn(model, P: int, chunk: int, temperature: float = 1.0):
  """log pi_theta of the completion tokens under softmax(logits / T) (T: logprob_temperature). With T the sampling
  temperature (as TRL's GRPO scores them) pi_old of a policy row equals what the sampler drew from."""
  return lambda params, mb: packed.row_logprobs(
      model, params, mb, targets_from=P, chunk_size=chunk, temperature=temperature
  )


@functools.lru_cache(maxsize=8)
def _ref_fn(model, P: int, chunk: int, temperature: float):
  return jax.jit(lambda params, b: make_logprob_fn(model, P, chunk, temperature)(params, b)[0])


def build_step(model, cfg, optimizer, state_sharding=None):
  """update step per prompt bucket P (the completion span starts at P); jit caches each. state_sharding pins the
  updated state's placement (trainer.state_sharding) so that it never drifts between steps."""
  cache = {}

  def get(P: int):
    if P not in cache:
      cache[P] = update.make_train_step(
          make_logprob_fn(model, P, cfg.model.logprob_chunk, logprob_temperature(cfg.rl)),
          optimizer,
          cfg.rl,
          state_sharding=state_sharding,
      )
    return cache[P]

  return get


def rl_step(ctx: RLContext, state: update.TrainState, step: int) -> tuple[update.TrainState, dict]:
  cfg, proc, rcfg = ctx.cfg, ctx.proc, ctx.cfg.rl
  rng = jax.random.fold_in(jax.random.key(cfg.seed), step)
  idx = data_lib.indices_for_step(len(ctx.train_src), cfg.seed, step, rcfg.batch_prompts)
  examples = data_lib.read(ctx.train_src, idx)
  templates = cfg.data.prompt_templates.to_dict() or None
  pb = processor_lib.prompt_batch(proc, examples, cfg.data.prompt_buckets, templates)
  P = pb["input_ids"].shape[1]

  # 1. N policy samples per prompt (jit, KV cache); 2. the pool: + K stored responses per external model.
  out = sampling.generate(
      ctx.model,
      state.params,
      pb["input_ids"],
      pb["attention_mask"],
      pb["pixel_values"],
      pb["image_grid_thw"],
      max_new_tokens=rcfg.sampling.max_new_tokens,
      temperature=rcfg.sampling.temperature,
      top_p=rcfg.sampling.top_p,
      top_k=rcfg.sampling.top_k,
      eos_token_ids=[proc.eos_token_id],
      rng=rng,
      num_samples=rcfg.num_policy_samples,
      pad_token_id=proc.pad_token_id,
      prompt_buckets=(P,),
  )
  out = jax.tree.map(sharding.to_host, out)  # multi-host: every process sees every row
  g = groups_lib.assemble(
      pb["input_ids"],
      pb["attention_mask"],
      [ex["id"] for ex in examples],
      out,
      ctx.store,
      tokenize=lambda t: processor_lib.encode_completion(proc, t),
      end_ids=[proc.eos_token_id],
      detokenize=lambda ids: proc.tokenizer.decode(ids, skip_special_tokens=True),
      eos_token_ids=[proc.eos_token_id],
      source_names=tuple(cfg.aux.sources),
      k_per_source=rcfg.num_external_per_model,
      pad_id=proc.pad_token_id,
      tokenizer_name=cfg.aux.behaviour_tokenizer or None,
  )

  # 3. rewards r_i; 4. selection of G rows per prompt; 5. advantages A_i over the kept group.
  row_examples = [examples[b] for b in g.prompt_index_R]
  r_R, per = rewards_lib.compute_rewards(tuple(map(tuple, rcfg.rewards)), g.texts, row_examples)
  acc_R = per.get("accuracy")
  keep, sel_metrics = selection.select(r_R, g.source_R, g.prompt_index_R, rcfg, acc_R)
  A_K = advantages.compute(r_R[keep], g.prompt_index_R[keep], g.source_R[keep], rcfg)

  # 6. the update on the kept rows (each row carries its own images).
  images_per_prompt = [len(ex["images"]) for ex in examples]
  pv, grid = groups_lib.repeat_images(
      pb["pixel_values"], pb["image_grid_thw"], images_per_prompt, g.prompt_index_R[keep]
  )
  rows = batching.rows_batch(
      ctx.model,
      g.prompt_ids_RP[keep],
      g.prompt_mask_RP[keep],
      g.completion_ids_RC[keep],
      g.completion_mask_RC[keep],
      pv,
      grid,
      [images_per_prompt[b] for b in g.prompt_index_R[keep]],
  )
  same_t = logprob_temperature(rcfg) == rcfg.sampling.temperature  # the sampler's log-probs are at its temperature
  batch = rl_batch.from_rows(
      rows,
      A_R=A_K,
      is_external_R=(g.source_R[keep] > 0),
      behaviour_logp_RC=g.behaviour_logp_RC[keep],
      has_behaviour_R=g.has_behaviour_R[keep] & (g.source_R[keep] > 0),
      sampler_logp_RC=_sampler_logp(out, g, keep) if same_t else None,
  )
  batch = update.shard_batch(batch, ctx.mesh)
  if rcfg.beta != 0:
    ref_fn = _ref_fn(ctx.model, P, cfg.model.logprob_chunk, logprob_temperature(rcfg))
    batch = batch.replace(ref_logp_RC=ref_fn(ctx.ref_params, batch.inputs))
  state, m = ctx.train_step(P)(state, batch)

  kept_src = g.source_R[keep]
  metrics = {
      **m,
      **sel_metrics,
      **g.metrics,
      "reward/mean": float(r_R[keep].mean()),
      "reward/pool_mean": float(r_R.mean()),
      "reward/policy_mean": float(r_R[g.source_R == 0].mean()),
      "tokens": float(np.asarray(out.lengths).sum()),
      "completion/policy_mean_length": float(np.asarray(out.lengths).mean()),
      "completion/truncated": float(g.truncated_R[g.source_R == 0].mean()),
  }
  for name, v in per.items():
    metrics[f"reward/{name}"] = float(v[g.source_R == 0].mean())  # the policy's own score on its samples
  ctx.last_group_text = group_text(g, keep, r_R, A_K, kept_src, b=0)
  return state, metrics


def _sampler_logp(out, g, keep: np.ndarray) -> np.ndarray:
  """The sampler's temperature-scaled log-probs for the kept policy rows (0 for external rows)."""
  plogp_NC = np.asarray(out.policy_logprobs, np.float32)
  G = plogp_NC.shape[0] // (int(g.prompt_index_R.max()) + 1)
  rows = np.zeros((len(keep), plogp_NC.shape[1]), np.float32)
  for j, r in enumerate(keep):
    if g.source_R[r] == 0:  # policy rows come first in each prompt's pool, in sampler order
      b = g.prompt_index_R[r]
      rows[j] = plogp_NC[b * G + (r - np.flatnonzero(g.prompt_index_R == b)[0])]
  return rows


def group_text(g, keep: np.ndarray, r_R: np.ndarray, A_K: np.ndarray, kept_src: np.ndarray, b: int) -> str:
  """One prompt's pool as Markdown: source, kept or not, reward, advantage, completion (for TensorBoard text)."""
  adv = {int(i): float(a) for i, a in zip(keep, A_K)}
  lines = ["| source | kept | reward | advantage | completion |", "|---|---|---|---|---|"]
  for i in np.flatnonzero(g.prompt_index_R == b):
    text = g.texts[i].replace("\n", " ").replace("|", "/")[:300]
    a = f"{adv[int(i)]:+.3f}" if int(i) in adv else ""
    lines.append(
        f"| {g.source_names[g.source_R[i]]} | {'yes' if int(i) in adv else 'no'} | {r_R[i]:.2f} | {a} | " f"{text} |"
    )
  return "\n".join(lines)


def eval_examples(cfg, builder, splits: Sequence[str]) -> dict[str, list[dict]]:
  return {s: data_lib.first(data_lib.source(builder, s), cfg.eval.num_examples) for s in splits}
