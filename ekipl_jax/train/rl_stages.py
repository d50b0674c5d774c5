"""One GRPO / Vision-EKIPL step as pure stages, and the thin driver the trainer calls (rl_step):

  sample      prompts --sampler--> N policy samples per prompt
  assemble    + K stored responses of each external model = the pool (sampling/groups.py: Groups)
  reward      r_R of every pool row (rewards.py)
  select      G kept rows per prompt (rl/selection.py)
  advantages  A of the kept rows (rl/advantages.py)
  update      the kept rows as an UpdateBatch (rl/batch.py) -> the jit update step (rl/update.py)

Each stage is a function of its inputs (no context object, nothing kept between calls), so tests/test_rl_learns.py
and notebooks/quickstart.ipynb call the same stages. Everything random derives from (seed, step); the examples of
step s are a function of (seed, s). Legend: B prompts, N policy samples per prompt, G kept rows per prompt, R pool
rows, K kept rows (all prompts), P prompt tokens, C completion tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ekipl_jax import rewards as rewards_lib
from ekipl_jax import sampling, sharding
from ekipl_jax.data import processor as processor_lib
from ekipl_jax.models import packed
from ekipl_jax.rl import advantages as advantages_lib
from ekipl_jax.rl import batch as rl_batch
from ekipl_jax.rl import selection, update
from ekipl_jax.sampling import groups as groups_lib
from ekipl_jax.sampling.config import SamplingConfig  # noqa: F401 (rl_stages.SamplingConfig: notebook, tests)
from ekipl_jax.train import batching


@dataclasses.dataclass(frozen=True)
class Prompts:
  """One step's B prompts as processor.prompt_batch left-pads them, with their example ids and images."""

  ids_BP: np.ndarray  # int32, left padded
  mask_BP: np.ndarray  # int32
  example_ids: tuple[str, ...]
  pixel_values: Optional[np.ndarray] = None  # the batch's image patches, images in prompt order (None: text only)
  image_grid_thw: Optional[np.ndarray] = None  # [images, 3]
  images_per_prompt: tuple[int, ...] = ()  # how many images each prompt has

  @classmethod
  def from_batch(cls, pb: dict, examples: Sequence[dict]) -> Prompts:
    return cls(
        pb["input_ids"],
        pb["attention_mask"],
        tuple(ex["id"] for ex in examples),
        pb["pixel_values"],
        pb["image_grid_thw"],
        tuple(len(ex["images"]) for ex in examples),
    )


def codec_for(proc) -> groups_lib.Codec:
  """How the policy's processor reads and writes completions (external texts end with its EOS, <|im_end|>)."""
  return groups_lib.Codec(
      tokenize=lambda t: processor_lib.encode_completion(proc, t),
      detokenize=lambda ids: proc.tokenizer.decode(ids, skip_special_tokens=True),
      end_ids=(proc.eos_token_id,),
      eos_token_ids=(proc.eos_token_id,),
      pad_id=proc.pad_token_id,
  )


# --- The stages. ---


def sample(model, params, prompts: Prompts, sc: SamplingConfig, rng: jax.Array) -> sampling.SampleOutput:
  """N policy samples per prompt (jit prefill + decode over a KV cache), as host numpy on every process."""
  out = sc.generate(
      model,
      params,
      prompts.ids_BP,
      prompts.mask_BP,
      prompts.pixel_values,
      prompts.image_grid_thw,
      rng=rng,
      prompt_buckets=(prompts.ids_BP.shape[1],),  # the prompts are padded already
  )
  return jax.tree.map(sharding.to_host, out)  # multi-host: every process sees every row


def assemble(
    prompts: Prompts,
    out,
    store,
    codec: groups_lib.Codec,
    rcfg,
    source_names: Sequence[str] = (),
    tokenizer_name: Optional[str] = None,
) -> groups_lib.Groups:
  """The pool: each prompt's N policy rows, then K = rcfg.num_external_per_model stored responses of each source."""
  return groups_lib.assemble(
      prompts.ids_BP,
      prompts.mask_BP,
      prompts.example_ids,
      out,
      store,
      codec,
      source_names=tuple(source_names),
      k_per_source=rcfg.num_external_per_model,
      tokenizer_name=tokenizer_name,
  )


def reward(g: groups_lib.Groups, examples: Sequence[dict], rcfg) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """(r_R: the weighted total of rcfg.rewards, each registered reward's values by name) of every pool row."""
  return rewards_lib.compute_rewards(tuple(map(tuple, rcfg.rewards)), g.texts, [examples[b] for b in g.prompt_index_R])


def select(g: groups_lib.Groups, r_R: np.ndarray, per: dict[str, np.ndarray], rcfg) -> tuple[np.ndarray, dict]:
  """(keep_K: pool rows kept, G per prompt, prompt-major; selection and source metrics)."""
  return selection.select(r_R, g.source_R, g.prompt_index_R, rcfg, per.get("accuracy"))


def advantages(g: groups_lib.Groups, r_R: np.ndarray, keep_K: np.ndarray, rcfg) -> np.ndarray:
  """A_K of the kept rows, group-relative within each prompt's kept group."""
  return advantages_lib.compute(r_R[keep_K], g.prompt_index_R[keep_K], g.source_R[keep_K], rcfg)


def update_batch(
    model, prompts: Prompts, g: groups_lib.Groups, keep_K: np.ndarray, A_K: np.ndarray, *, sampler_logp: bool = True
) -> rl_batch.UpdateBatch:
  """The kept rows as a host UpdateBatch (each row carries its own images). sampler_logp: attach the sampler's
  log-probs for the health-check metric (only meaningful when the loss's temperature is the sampler's)."""
  pv, grid = groups_lib.repeat_images(
      prompts.pixel_values, prompts.image_grid_thw, prompts.images_per_prompt, g.prompt_index_R[keep_K]
  )
  rows = batching.rows_batch(
      model,
      g.prompt_ids_RP[keep_K],
      g.prompt_mask_RP[keep_K],
      g.completion_ids_RC[keep_K],
      g.completion_mask_RC[keep_K],
      pv,
      grid,
      [prompts.images_per_prompt[b] for b in g.prompt_index_R[keep_K]] if prompts.images_per_prompt else (),
  )
  is_external_K = g.source_R[keep_K] > 0
  return rl_batch.from_rows(
      rows,
      A_R=A_K,
      is_external_R=is_external_K,
      behaviour_logp_RC=g.behaviour_logp_RC[keep_K],
      has_behaviour_R=g.has_behaviour_R[keep_K] & is_external_K,
      sampler_logp_RC=g.sampler_logp_RC[keep_K] if sampler_logp else None,
  )


def step_metrics(g: groups_lib.Groups, r_R: np.ndarray, per: dict[str, np.ndarray], keep_K: np.ndarray) -> dict:
  """Host metrics of one step's pool: rewards (kept, pool, the policy's own), completion lengths, truncation."""
  policy_R = g.source_R == 0
  lengths = g.completion_mask_RC[policy_R].sum(1)  # the sampler's lengths, EOS included
  metrics = {
      **g.metrics,
      "reward/mean": float(r_R[keep_K].mean()),
      "reward/pool_mean": float(r_R.mean()),
      "reward/policy_mean": float(r_R[policy_R].mean()),
      "tokens": float(lengths.sum()),
      "completion/policy_mean_length": float(lengths.mean()),
      "completion/truncated": float(g.truncated_R[policy_R].mean()),
  }
  for name, v in per.items():
    metrics[f"reward/{name}"] = float(v[policy_R].mean())  # the policy's own score on its samples
  return metrics


def group_text(g: groups_lib.Groups, keep_K: np.ndarray, r_R: np.ndarray, A_K: np.ndarray, b: int = 0) -> str:
  """One prompt's pool as Markdown: source, kept or not, reward, advantage, completion (for TensorBoard text)."""
  adv = {int(i): float(a) for i, a in zip(keep_K, A_K)}
  lines = ["| source | kept | reward | advantage | completion |", "|---|---|---|---|---|"]
  for i in np.flatnonzero(g.prompt_index_R == b):
    text = g.texts[i].replace("\n", " ").replace("|", "/")[:300]
    a = f"{adv[int(i)]:+.3f}" if int(i) in adv else ""
    kept = "yes" if int(i) in adv else "no"
    lines.append(f"| {g.source_names[g.source_R[i]]} | {kept} | {r_R[i]:.2f} | {a} | {text} |")
  return "\n".join(lines)


# --- The update step and the driver. ---


def logprob_temperature(rcfg) -> float:
  """T of the loss's log-probs (config key rl.logprob_temperature; None: rl.sampling.temperature)."""
  return rcfg.sampling.temperature if rcfg.logprob_temperature is None else rcfg.logprob_temperature


def make_logprob_fn(model, P: int, chunk: int, temperature: float = 1.0):
  """log pi_theta of the completion tokens under softmax(logits / T) (T: logprob_temperature), from the batch's
  row inputs. With T the sampling temperature (as TRL's GRPO scores them) pi_old of a policy row equals what the
  sampler drew from."""
  return lambda params, inputs: packed.row_logprobs(
      model, params, inputs, targets_from=P, chunk_size=chunk, temperature=temperature
  )


@functools.lru_cache(maxsize=8)
def _ref_fn(model, P: int, chunk: int, temperature: float):
  return jax.jit(lambda params, inputs: make_logprob_fn(model, P, chunk, temperature)(params, inputs)[0])


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


@dataclasses.dataclass
class RLContext:
  """What the driver needs besides the train state (fixed for the run)."""

  cfg: Any
  model: Any
  proc: Any
  train_batches: Any  # input_pipeline.StepBatches: (examples, processor.prompt_batch) of each step, prefetched
  store: Any  # AuxStore or None (plain GRPO)
  mesh: Any
  train_step: Any  # build_step(...): the update step for a prompt length
  ref_params: Any = None  # frozen reference policy (only when beta > 0)


def run_step(
    model,
    state: update.TrainState,
    train_step,
    prompts: Prompts,
    examples: Sequence[dict],
    store,
    codec: groups_lib.Codec,
    rcfg,
    rng: jax.Array,
    *,
    source_names: Sequence[str] = (),
    tokenizer_name: Optional[str] = None,
    mesh=None,
    ref_logp_fn: Optional[Callable] = None,
) -> tuple[update.TrainState, dict, str]:
  """The stages in order on one step's prompts: (new state, metrics, the first prompt's group as Markdown).
  train_step: the update step for these prompts' length P; mesh: shard the batch over it (None: one device);
  ref_logp_fn: inputs -> the reference's log-probs (needed when rcfg.beta != 0)."""
  sc = SamplingConfig.from_config(rcfg, codec.eos_token_ids, codec.pad_id)
  out = sample(model, state.params, prompts, sc, rng)
  g = assemble(prompts, out, store, codec, rcfg, source_names, tokenizer_name)
  r_R, per = reward(g, examples, rcfg)
  keep_K, sel_metrics = select(g, r_R, per, rcfg)
  A_K = advantages(g, r_R, keep_K, rcfg)
  same_t = logprob_temperature(rcfg) == rcfg.sampling.temperature  # the sampler's log-probs are at its temperature
  batch = update_batch(model, prompts, g, keep_K, A_K, sampler_logp=same_t)
  batch = jax.tree.map(jnp.asarray, batch) if mesh is None else update.shard_batch(batch, mesh)
  if rcfg.beta != 0:
    batch = batch.replace(ref_logp_RC=ref_logp_fn(batch.inputs))
  state, m = train_step(state, batch)
  metrics = {**m, **sel_metrics, **step_metrics(g, r_R, per, keep_K)}
  return state, metrics, group_text(g, keep_K, r_R, A_K, b=0)


def rl_step(ctx: RLContext, state: update.TrainState, step: int) -> tuple[update.TrainState, dict, str]:
  """The trainer's step: step's prompts from the input pipeline, then run_step (returns its triple)."""
  cfg = ctx.cfg
  examples, pb = ctx.train_batches.batch_for(step)  # read, tokenized and image-processed ahead (grain)
  prompts = Prompts.from_batch(pb, examples)
  P = prompts.ids_BP.shape[1]
  ref_fn = _ref_fn(ctx.model, P, cfg.model.logprob_chunk, logprob_temperature(cfg.rl))
  return run_step(
      ctx.model,
      state,
      ctx.train_step(P),
      prompts,
      examples,
      ctx.store,
      codec_for(ctx.proc),
      cfg.rl,
      jax.random.fold_in(jax.random.key(cfg.seed), step),
      source_names=cfg.aux.sources,
      tokenizer_name=cfg.aux.behaviour_tokenizer or None,
      mesh=ctx.mesh,
      ref_logp_fn=functools.partial(ref_fn, ctx.ref_params),
  )
