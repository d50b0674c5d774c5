"""Group-relative advantages (host-side numpy): A_i = (r_i - mean(r_group)) / (std + eps).

std is the unbiased one by default (cfg.adv_ddof = 1): TRL's GRPOTrainer, which Reason-RFT builds on, uses
torch's `.std(dim=1)`, whose default is Bessel-corrected. A group with <= ddof rows has std 0.
Options:
  cfg.adv_std        'group' per-group std | 'batch' one std over the whole batch (mean stays per group) | 'none'
                     (Dr. GRPO, and LUFFY: mean only)
  cfg.adv_stats_from 'all' | 'policy': mean and std from the group's policy rows only (LUFFY grpo_split); a group
                     without policy rows falls back to all its rows.
"""

import numpy as np


def _std(x: np.ndarray, ddof: int) -> float:
  return float(np.std(x, ddof=ddof)) if len(x) > ddof else 0.0


def compute(rewards_B, group_B, sources_B, cfg) -> np.ndarray:
  """A_B (float32) for rows grouped by group_B (e.g. prompt_index of the kept rows); sources_B: 0 = policy."""
  r_B = np.asarray(rewards_B, np.float64)
  group_B, sources_B = np.asarray(group_B), np.asarray(sources_B)
  stats_B = (sources_B == 0) if cfg.adv_stats_from == "policy" else np.ones_like(r_B, bool)
  if cfg.adv_stats_from not in ("all", "policy"):
    raise ValueError(f"unknown adv_stats_from {cfg.adv_stats_from!r}")
  A_B = np.zeros_like(r_B)
  std_B = np.ones_like(r_B)
  for g in np.unique(group_B):
    rows = group_B == g
    ref = rows & stats_B if (rows & stats_B).any() else rows
    A_B[rows] = r_B[rows] - r_B[ref].mean()
    std_B[rows] = _std(r_B[ref], cfg.adv_ddof)
  if cfg.adv_std == "group":
    A_B = A_B / (std_B + cfg.adv_eps)
  elif cfg.adv_std == "batch":
    A_B = A_B / (_std(r_B[stats_B] if stats_B.any() else r_B, cfg.adv_ddof) + cfg.adv_eps)
  elif cfg.adv_std != "none":
    raise ValueError(f"unknown adv_std {cfg.adv_std!r}")
  return A_B.astype(np.float32)
