"""Group-relative advantages (host-side numpy), docs/METHOD.md sections 1 and 4.1: for row i of a kept group of G rows,

  A_i = (r_i - mean(r_group)) / (std(r_group) + eps)

std is the unbiased one by default (cfg.adv_ddof = 1): TRL's GRPOTrainer, which Reason-RFT builds on, uses
torch's `.std(dim=1)`, whose default is Bessel-corrected. A group with <= ddof rows has std 0.
Registered variants:
  STD_MODES (cfg.adv_std)         'group' per-group std | 'batch' one std over the whole batch (mean stays per
                                  group) | 'none' no division (Dr. GRPO, and LUFFY: mean only)
  STATS_FROM (cfg.adv_stats_from) 'all' rows of the group | 'policy': mean and std from the group's policy rows only
                                  (LUFFY grpo_split); a group without policy rows falls back to all its rows. As
                                  LUFFY does it (ElliottYan/LUFFY, luffy/verl/verl/mix_src/mix_core_alg.py:
                                  compute_grpo_outcome_advantage_split, read at commit
                                  01f4ae066249e6965ce0d5512ccdf99a12895c74): a group with a single policy row has
                                  mean 0 and std 1, and a std of 0 becomes 1, so A = (r - mean) / (1 + eps) instead
                                  of a division by eps.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ekipl_jax.rl.registry import Registry

STD_MODES = Registry("rl.adv_std")  # (Centered, cfg) -> A_B
STATS_FROM = Registry("rl.adv_stats_from")  # sources_B -> bool rows the statistics come from; info: luffy


@STATS_FROM.register("all", luffy=False)
def _all_rows(sources_B: np.ndarray) -> np.ndarray:
  return np.ones(sources_B.shape, bool)


@STATS_FROM.register("policy", luffy=True)
def _policy_rows(sources_B: np.ndarray) -> np.ndarray:
  return sources_B == 0


@dataclasses.dataclass
class Centered:
  """r - mean per group, the per-group std, and what a batch-wide std needs (float64)."""

  A_B: np.ndarray  # r_i - mean(r_group)
  std_B: np.ndarray  # the std of row i's group
  r_B: np.ndarray
  stats_B: np.ndarray  # bool: rows the statistics come from
  luffy: bool  # a std of 0 becomes 1
  ddof: int

  def batch_std(self) -> float:
    return _nonzero(_std(self.r_B[self.stats_B] if self.stats_B.any() else self.r_B, self.ddof), self.luffy)


@STD_MODES.register("group")
def _group_std(c: Centered, cfg) -> np.ndarray:
  return c.A_B / (c.std_B + cfg.adv_eps)


@STD_MODES.register("batch")
def _batch_std(c: Centered, cfg) -> np.ndarray:
  return c.A_B / (c.batch_std() + cfg.adv_eps)


@STD_MODES.register("none")
def _no_std(c: Centered, cfg) -> np.ndarray:
  return c.A_B


def _std(x: np.ndarray, ddof: int) -> float:
  return float(np.std(x, ddof=ddof)) if len(x) > ddof else 0.0


def _nonzero(std: float, luffy: bool) -> float:
  return 1.0 if luffy and std == 0 else std


def compute(rewards_B, group_B, sources_B, cfg) -> np.ndarray:
  """A_B (float32) for rows grouped by group_B (e.g. prompt_index of the kept rows); sources_B: 0 = policy."""
  scale = STD_MODES.lookup(cfg.adv_std)
  r_B = np.asarray(rewards_B, np.float64)
  group_B, sources_B = np.asarray(group_B), np.asarray(sources_B)
  stats_B = STATS_FROM.lookup(cfg.adv_stats_from)(sources_B)
  luffy = STATS_FROM.info[cfg.adv_stats_from]["luffy"]
  A_B = np.zeros_like(r_B)
  std_B = np.ones_like(r_B)
  for g in np.unique(group_B):
    rows = group_B == g
    ref = rows & stats_B if (rows & stats_B).any() else rows
    single = luffy and ref.sum() == 1  # LUFFY: one policy row -> mean 0, std 1
    A_B[rows] = r_B[rows] - (0.0 if single else r_B[ref].mean())
    std_B[rows] = 1.0 if single else _nonzero(_std(r_B[ref], cfg.adv_ddof), luffy)
  return scale(Centered(A_B, std_B, r_B, stats_B, luffy, cfg.adv_ddof), cfg).astype(np.float32)
