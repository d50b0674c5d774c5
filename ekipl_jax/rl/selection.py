"""EKIPL group formation (host-side numpy): which pool rows of each prompt enter the update, and source metrics.

Pool layout (sampling/groups.py): per prompt, N policy rows (source 0) then K rows of each of the M external models
(source 1..M). Arrays are pool-row aligned: rewards_R, sources_R, prompt_index_R (R = pool rows).

Registered rules (RULES, cfg.selection); each keeps G = cfg.group_size rows of one prompt's pool:
  'ekipl'   keep the top G rows by reward. Tie rule: higher reward first, then policy before external, then lower
            position in the pool (so the result never depends on sort stability).
  'none'    plain GRPO: the first G policy rows (reads no external store: reads_store=False).
  'all'     the whole pool of each prompt (group size N + M*K).
  'replace' LUFFY: the first G - k policy rows and the first k external rows (pool order, reward-blind).
Kept rows are returned prompt-major (prompts in order of first appearance), each group in pool order.
"""

from typing import Any

import numpy as np

from ekipl_jax.rl.registry import Registry

RULES = Registry("rl.selection")  # (rows, rewards_R, sources_R, cfg) -> kept pool rows; info: reads_store, keeps_pool


def reads_store(name: str) -> bool:
  """Whether selection rule `name` uses external rows (so the run needs an auxiliary store)."""
  RULES.lookup(name)
  return RULES.info[name].get("reads_store", True)


def keeps_pool(name: str) -> bool:
  """Whether rule `name` keeps each prompt's whole pool (N + M*K rows) rather than cfg.group_size of it."""
  RULES.lookup(name)
  return RULES.info[name].get("keeps_pool", False)


def kept_per_prompt(name: str, group_size: int, pool_size: int) -> int:
  """G, the rows rule `name` keeps per prompt: `group_size` (config key rl.group_size), or the pool's `pool_size`."""
  return pool_size if keeps_pool(name) else group_size


def _group_rows(prompt_index_R: np.ndarray) -> list[np.ndarray]:
  """Pool row indices of each prompt, prompts in order of first appearance, rows in pool order."""
  _, first = np.unique(prompt_index_R, return_index=True)
  return [np.flatnonzero(prompt_index_R == prompt_index_R[f]) for f in np.sort(first)]


def _split(rows: np.ndarray, sources_R) -> tuple[np.ndarray, np.ndarray]:
  return rows[sources_R[rows] == 0], rows[sources_R[rows] > 0]


@RULES.register("ekipl")
def _ekipl(rows: np.ndarray, rewards_R, sources_R, cfg) -> np.ndarray:
  G = cfg.group_size
  if len(rows) < G:
    raise ValueError(f"selection 'ekipl' needs a pool of >= G={G} rows per prompt, got {len(rows)}")
  # np.lexsort: last key is primary. Primary: -reward; then is_external; then pool position.
  order = np.lexsort((rows, sources_R[rows] > 0, -rewards_R[rows]))
  return np.sort(rows[order[:G]])


@RULES.register("none", reads_store=False)
def _none(rows: np.ndarray, rewards_R, sources_R, cfg) -> np.ndarray:
  G, (policy, _) = cfg.group_size, _split(rows, sources_R)
  if len(policy) < G:
    raise ValueError(f"selection 'none' needs >= G={G} policy rows per prompt, got {len(policy)}")
  return policy[:G]


@RULES.register("all", keeps_pool=True)
def _all(rows: np.ndarray, rewards_R, sources_R, cfg) -> np.ndarray:
  return rows


@RULES.register("replace")
def _replace(rows: np.ndarray, rewards_R, sources_R, cfg) -> np.ndarray:
  G, k, (policy, external) = cfg.group_size, cfg.num_replace, _split(rows, sources_R)
  if len(policy) < G - k or len(external) < k:
    raise ValueError(f"selection 'replace' needs {G - k} policy and {k} external rows per prompt")
  return np.concatenate([policy[: G - k], external[:k]])


def _masked_mean(x: np.ndarray, m: np.ndarray) -> float:
  return float(x[m].mean()) if m.any() else float("nan")


def source_metrics(keep_idx: np.ndarray, rewards_R, sources_R, prompt_index_R, accuracy_R=None) -> dict[str, float]:
  """Action-source ratio (overall and per external model), reward / solved rate by source, zero-variance groups."""
  src_K, r_K = sources_R[keep_idx], rewards_R[keep_idx]
  num_models = int(sources_R.max()) if len(sources_R) else 0
  out = {"source_ratio/external": float((src_K > 0).mean())}
  for m in range(1, num_models + 1):
    out[f"source_ratio/model_{m}"] = float((src_K == m).mean())
  for where, idx in (("kept", keep_idx), ("pool", np.arange(len(rewards_R)))):
    src, r = sources_R[idx], rewards_R[idx]
    for name, m in (("policy", src == 0), ("external", src > 0)):
      out[f"{where}/reward_mean/{name}"] = _masked_mean(r, m)
      if accuracy_R is not None:
        out[f"{where}/solved/{name}"] = _masked_mean((accuracy_R[idx] == 1).astype(np.float64), m)
  groups = _group_rows(prompt_index_R[keep_idx])
  out["zero_var_groups"] = float(np.mean([np.all(r_K[g] == r_K[g][0]) for g in groups])) if groups else float("nan")
  return out


def select(rewards_R, sources_R, prompt_index_R, cfg, accuracy_R=None) -> tuple[np.ndarray, dict[str, Any]]:
  """Returns (keep_idx: pool row indices, prompt-major, metrics). cfg: group_size, selection, num_replace."""
  rewards_R = np.asarray(rewards_R, np.float64)
  sources_R = np.asarray(sources_R, np.int64)
  prompt_index_R = np.asarray(prompt_index_R)
  acc = None if accuracy_R is None else np.asarray(accuracy_R, np.float64)
  rule = RULES.lookup(cfg.selection)
  keep = [rule(rows, rewards_R, sources_R, cfg) for rows in _group_rows(prompt_index_R)]
  keep_idx = np.concatenate(keep).astype(np.int64) if keep else np.zeros((0,), np.int64)
  return keep_idx, source_metrics(keep_idx, rewards_R, sources_R, prompt_index_R, acc)
