"""One check of an experiment config before anything is loaded: every range and name the trainer relies on, each error
naming its config key (`ValueError("config key rl.group_size: ...")`).

  validate.config(cfg)                  # static: ranges, names, group arithmetic (trainer.run calls it first)
  validate.mesh(cfg, jax.device_count())  # the mesh against the devices (after jax.distributed starts)

Temperature 0: greedy decoding in evaluation (`eval.temperature`, the sampler's argmax); refused for RL sampling
(`rl.sampling.temperature`): a greedy policy draws N copies of one completion (every advantage 0), and the loss's
log-probs of softmax(logits / 0) are not finite, so every update would be skipped.
"""

from __future__ import annotations

import math
import sys
from typing import Any

from ekipl_jax import rewards
from ekipl_jax.rl import advantages, loss
from ekipl_jax.rl import selection as selection_lib

STAGES = ("sft", "rl", "eval")
SELECTIONS = selection_lib.RULES.names  # the registered selection rules (rl/selection.py)
DTYPES = ("float32", "bfloat16")


def _fail(key: str, msg: str) -> None:
  raise ValueError(f"config key {key}: {msg}")


def _get(cfg, key: str) -> Any:
  node = cfg
  for part in key.split("."):
    node = node[part]
  return node


def _number(cfg, key: str) -> float:
  v = _get(cfg, key)
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
    _fail(key, f"must be a finite number, got {v!r}")
  return v


def _int(cfg, key: str, lo: int) -> int:
  v = _get(cfg, key)
  if isinstance(v, bool) or not isinstance(v, int) or v < lo:
    _fail(key, f"must be an integer >= {lo}, got {v!r}")
  return v


def _positive(cfg, key: str) -> float:
  v = _number(cfg, key)
  if v <= 0:
    _fail(key, f"must be > 0, got {v!r}")
  return v


def _in_range(cfg, key: str, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> float:
  v = _number(cfg, key)
  if (v <= lo if lo_open else v < lo) or (v >= hi if hi_open else v > hi):
    _fail(key, f"must be in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}, got {v!r}")
  return v


def _one_of(cfg, key: str, names) -> str:
  v = _get(cfg, key)
  if v not in names:
    _fail(key, f"unknown value {v!r} (one of {' | '.join(names)})")
  return v


def _sampling(cfg, prefix: str, *, greedy_ok: bool) -> None:
  t = _number(cfg, f"{prefix}.temperature")
  if t < 0 or (t == 0 and not greedy_ok):
    why = (
        "0 (greedy) is refused for RL: the N samples of a prompt would be one completion repeated (every advantage "
        "0) and the log-probs of softmax(logits / 0) are not finite (every update skipped); use e.g. 0.9"
    )
    _fail(f"{prefix}.temperature", f"must be > 0, got {t!r}" if t < 0 else why)
  _in_range(cfg, f"{prefix}.top_p", 0.0, 1.0, lo_open=True)
  _int(cfg, f"{prefix}.top_k", 0)
  _int(cfg, f"{prefix}.max_new_tokens", 1)


def config(cfg) -> None:
  """Raises ValueError naming the first bad key. Only what the config's stage uses is checked."""
  stage = _one_of(cfg, "stage", STAGES)
  _int(cfg, "log_every", 1)
  _int(cfg, "checkpoint.every", 1)
  _int(cfg, "checkpoint.keep", 1)
  _int(cfg, "max_consecutive_skips", 0)
  _one_of(cfg, "model.param_dtype", DTYPES)
  _one_of(cfg, "model.compute_dtype", DTYPES)
  _int(cfg, "model.logprob_chunk", 1)
  shape = tuple(cfg.mesh.shape)
  if len(shape) != 3 or shape.count(-1) > 1 or any(not isinstance(s, int) or (s < 1 and s != -1) for s in shape):
    _fail("mesh.shape", f"(data, fsdp, tensor) sizes >= 1, at most one -1, got {shape}")
  buckets = tuple(cfg.data.prompt_buckets)
  if not buckets or any(not isinstance(b, int) or b < 1 for b in buckets):
    _fail("data.prompt_buckets", f"positive prompt lengths, got {buckets}")
  if _positive(cfg, "data.min_pixels") > _positive(cfg, "data.max_pixels"):
    _fail("data.min_pixels", f"{cfg.data.min_pixels} is above data.max_pixels {cfg.data.max_pixels}")
  if cfg.data.eval_splits or stage == "eval":
    _sampling(cfg, "eval", greedy_ok=True)
    _int(cfg, "eval.every", 0)
    _int(cfg, "eval.num_examples", 0)
    _int(cfg, "eval.batch_size", 1)
    if _int(cfg, "eval.pass_k", 1) > 1 and cfg.eval.temperature == 0:
      _fail("eval.pass_k", f"{cfg.eval.pass_k} samples of greedy decoding (eval.temperature 0) are all the same")
  if stage == "sft":
    _sft(cfg)
  if stage == "rl":
    _rl(cfg)


def _sft(cfg) -> None:
  _int(cfg, "sft.steps", 0)
  _int(cfg, "sft.num_examples", 1)
  rows = _int(cfg, "sft.batch_size", 1)
  k = _int(cfg, "sft.micro_batches", 1)
  if rows % k:
    _fail("sft.micro_batches", f"{k} does not divide the batch sft.batch_size = {rows} rows")
  _positive(cfg, "sft.lr")
  _int(cfg, "sft.warmup_steps", 0)
  if _number(cfg, "sft.weight_decay") < 0:
    _fail("sft.weight_decay", f"must be >= 0, got {cfg.sft.weight_decay!r}")
  _positive(cfg, "sft.grad_clip")
  _one_of(cfg, "sft.mu_dtype", DTYPES)
  _int(cfg, "sft.max_completion", 1)


def _rl(cfg) -> None:
  r = cfg.rl
  _int(cfg, "rl.steps", 1)
  _int(cfg, "rl.batch_prompts", 1)
  N = _int(cfg, "rl.num_policy_samples", 1)
  K = _int(cfg, "rl.num_external_per_model", 0)
  selection = _one_of(cfg, "rl.selection", SELECTIONS)
  M = len(cfg.aux.sources)
  if not selection_lib.keeps_pool(selection):  # 'all' keeps the whole pool: G = N + M*K
    _int(cfg, "rl.group_size", 2)  # one row has no group to be compared with: its advantage is 0
  G = selection_lib.kept_per_prompt(selection, r.group_size, N + M * K)
  if selection_lib.reads_store(selection) and M * K == 0:
    _fail("aux.sources" if M == 0 else "rl.num_external_per_model", f"selection {selection!r} needs external rows")
  if selection == "none" and N < G:
    _fail("rl.num_policy_samples", f"selection 'none' keeps G={G} policy rows of N={N}: need N >= G")
  if selection == "ekipl" and N + M * K < G:
    _fail("rl.group_size", f"G={G} exceeds the pool N + M*K = {N} + {M}*{K} (selection 'ekipl' keeps G of it)")
  if selection == "replace":
    k = _int(cfg, "rl.num_replace", 1)
    if k >= G or k > M * K or N < G - k:
      _fail("rl.num_replace", f"{k} external rows replace policy rows: need k < G={G}, k <= M*K={M * K}, N >= G - k")
  if len(set(cfg.aux.sources)) != M:
    _fail("aux.sources", f"names repeat: {tuple(cfg.aux.sources)}")
  _one_of(cfg, "rl.external_treatment", loss.TREATMENTS)
  _one_of(cfg, "rl.aggregation", loss.AGGREGATIONS)
  _one_of(cfg, "rl.kl_estimator", loss.KL_ESTIMATORS)
  _one_of(cfg, "rl.adv_std", advantages.STD_MODES)
  _one_of(cfg, "rl.adv_stats_from", advantages.STATS_FROM)
  _in_range(cfg, "rl.eps_low", 0.0, 1.0, hi_open=True)
  if _number(cfg, "rl.eps_high") < 0:
    _fail("rl.eps_high", f"must be >= 0, got {r.eps_high!r}")
  if r.dual_clip is not None and _number(cfg, "rl.dual_clip") <= 1:
    _fail("rl.dual_clip", f"must be > 1 (or None), got {r.dual_clip!r}")
  if _number(cfg, "rl.beta") < 0:
    _fail("rl.beta", f"must be >= 0, got {r.beta!r}")
  if _number(cfg, "rl.adv_eps") < 0:
    _fail("rl.adv_eps", f"must be >= 0, got {r.adv_eps!r}")
  _one_of(cfg, "rl.adv_ddof", (0, 1))
  _int(cfg, "rl.mu", 1)
  k = _int(cfg, "rl.micro_batches", 1)
  rows = r.batch_prompts * G
  if rows % k:
    _fail("rl.micro_batches", f"{k} does not divide the update batch rl.batch_prompts * G = {rows} rows")
  if r.get("logprob_temperature") is not None:
    _positive(cfg, "rl.logprob_temperature")
  o = "rl.optimizer"
  _positive(cfg, f"{o}.lr")
  _one_of(cfg, f"{o}.schedule", ("constant", "cosine"))
  _int(cfg, f"{o}.warmup_steps", 0)
  _int(cfg, f"{o}.total_steps", 1)
  _in_range(cfg, f"{o}.b1", 0.0, 1.0, hi_open=True)
  _in_range(cfg, f"{o}.b2", 0.0, 1.0, hi_open=True)
  _positive(cfg, f"{o}.eps")
  if _number(cfg, f"{o}.weight_decay") < 0:
    _fail(f"{o}.weight_decay", f"must be >= 0, got {r.optimizer.weight_decay!r}")
  if r.optimizer.grad_clip is not None:
    _number(cfg, f"{o}.grad_clip")
  _one_of(cfg, f"{o}.mu_dtype", DTYPES)
  _sampling(cfg, "rl.sampling", greedy_ok=False)
  for i, pair in enumerate(r.rewards):
    if len(pair) != 2 or pair[0] not in rewards.REWARDS or not math.isfinite(float(pair[1])):
      _fail(
          f"rl.rewards[{i}]",
          f"(registered reward, finite weight), got {tuple(pair)!r}; known: {sorted(rewards.REWARDS)}",
      )


def mesh(cfg, num_devices: int) -> None:
  """The mesh shape against the devices; a warning (not an error) for batches that do not divide over the batch
  devices (data x fsdp): sharding.py then replicates the batch, which runs but repeats the work on every device."""
  shape = [int(s) for s in cfg.mesh.shape]
  fixed = math.prod(s for s in shape if s != -1)
  if num_devices % fixed or (-1 not in shape and fixed != num_devices):
    _fail("mesh.shape", f"{tuple(shape)} does not fit the {num_devices} devices of this run")
  if -1 in shape:
    shape[shape.index(-1)] = num_devices // fixed
  batch_devices = shape[0] * shape[1]
  rows = {}
  if cfg.stage == "sft":
    rows["sft.batch_size / sft.micro_batches"] = cfg.sft.batch_size // cfg.sft.micro_batches
  if cfg.stage == "rl":
    M = len(cfg.aux.sources)
    pool = cfg.rl.num_policy_samples + M * cfg.rl.num_external_per_model
    G = selection_lib.kept_per_prompt(cfg.rl.selection, cfg.rl.group_size, pool)
    rows["rl.batch_prompts * rl.group_size / rl.micro_batches"] = cfg.rl.batch_prompts * G // cfg.rl.micro_batches
    rows["rl.batch_prompts * rl.num_policy_samples"] = cfg.rl.batch_prompts * cfg.rl.num_policy_samples
  for key, n in rows.items():
    if n % batch_devices:
      print(
          f"warning: config {key} = {n} rows do not divide over the {batch_devices} batch devices of mesh.shape "
          f"{tuple(cfg.mesh.shape)}: the batch is replicated (every device computes every row)",
          file=sys.stderr,
      )
