"""Group-relative advantages (host-side numpy): A_i = (r_i - mean(r_group)) / (std + eps).

std is the unbiased one by default (cfg.adv_ddof = 1): TRL's GRPOTrainer, which Reason-RFT builds on, uses
torch's `.std(dim=1)`, whose default is Bessel-corrected. A group with <= ddof rows has std 0.
Options:
  cfg.adv_std        'group' per-group std | 'batch' one std over the whole batch (mean stays per group) | 'none'
                     (Dr. GRPO, and LUFFY: mean only)
  cfg.adv_stats_from 'all' | 'policy': mean and std from the group's policy rows only (LUFFY grpo_split); a group
                     without policy rows falls back to all its rows. As LUFFY does it (ElliottYan/LUFFY,
                     luffy/verl/verl/mix_src/mix_core_alg.py: compute_grpo_outcome_advantage_split, read at commit
                     01f4ae066249e6965ce0d5512ccdf99a12895c74): a group with a single policy row has mean 0 and std 1,
                     and a std of 0 becomes 1, so A = (r - mean) / (1 + eps) instead of a division by eps.
"""

import numpy as np


def _std(x: np.ndarray, ddof: int) -> float:
  return float(np.std(x, ddof=ddof)) if len(x) > ddof else 0.0


def _nonzero(std: float, luffy: bool) -> float:
  return 1.0 if luffy and std == 0 else std


def compute(rewards_B, group_B, sources_B, cfg) -> np.ndarray:
  """A_B (float32) for rows grouped by group_B (e.g. prompt_index of the kept rows); sources_B: 0 = policy."""
  r_B = np.asarray(rewards_B, np.float64)
  group_B, sources_B = np.asarray(group_B), np.asarray(sources_B)
  stats_B = (sources_B == 0) if cfg.adv_stats_from == "policy" else np.ones_like(r_B, bool)
  if cfg.adv_stats_from not in ("all", "policy"):
    raise ValueError(f"unknown adv_stats_from {cfg.adv_stats_from!r}")
  luffy = cfg.adv_stats_from == "policy"
  A_B = np.zeros_like(r_B)
  std_B = np.ones_like(r_B)
  for g in np.unique(group_B):
    rows = group_B == g
    ref = rows & stats_B if (rows & stats_B).any() else rows
    single = luffy and ref.sum() == 1  # LUFFY: one policy row -> mean 0, std 1
    A_B[rows] = r_B[rows] - (0.0 if single else r_B[ref].mean())
    std_B[rows] = 1.0 if single else _nonzero(_std(r_B[ref], cfg.adv_ddof), luffy)
  if cfg.adv_std == "group":
    A_B = A_B / (std_B + cfg.adv_eps)
  elif cfg.adv_std == "batch":
    A_B = A_B / (_nonzero(_std(r_B[stats_B] if stats_B.any() else r_B, cfg.adv_ddof), luffy) + cfg.adv_eps)
  elif cfg.adv_std != "none":
    raise ValueError(f"unknown adv_std {cfg.adv_std!r}")
  return A_B.astype(np.float32)
