"""The GRPO / Vision-EKIPL objective (docs/METHOD.md, sections 1, 3 and 4). Symbols: a group of G rows i
(completions o_i of prompt q) with advantages A_i, completion tokens t; pi_theta the policy being trained, pi_old
the policy that scored the batch, pi_ref the frozen reference, pi_beh the model that wrote an external row.

  rho_it = pi_theta(o_it | q, o_i,<t) / pi_old(o_it | q, o_i,<t) = exp(logp - old_logp)      importance ratio
  J_it   = min( rho_it A_i , clip(rho_it, 1 - eps_low, 1 + eps_high) A_i )                     clipped surrogate
  J_it   = max( J_it , c A_i )  where A_i < 0                                 dual clip (c = cfg.dual_clip > 1)
  KL_it  = pi_ref / pi_theta - log(pi_ref / pi_theta) - 1   (k3)  |  log(pi_theta / pi_ref)   (k1)
  l_it   = -( J_it - beta KL_it + entropy_coef H_it )                                        per-token loss
eps_low = eps_high gives GRPO's symmetric clip (eps); eps_high > eps_low is DAPO's clip-higher.

External rows (is_external_R) replace J_it by a registered treatment (TREATMENTS, cfg.external_treatment):
  'paper'          the same clipped J_it, pi_old the old policy's own teacher-forced probability (Vision-EKIPL)
  'luffy'          f(pi_theta) A_i, f(p) = p / (p + gamma), never clipped (LUFFY)
  'importance'     min(pi_theta / pi_beh, C) A_i, C = is_max (truncated ratio: constant above C, so no gradient)
  'importance_tis' sg(min(pi_old / pi_beh, C)) J_it (truncated importance sampling as TRL's GRPOTrainer applies it,
                   vllm_importance_sampling_mode "token_truncate", trl/trainer/grpo_trainer.py, read at commit
                   f2cd57710ae345ea6428ae95363267fcf38a3dc8: the weight is detached, so a capped token keeps the
                   gradient of J_it, times C)
  'rlplus'         2 pi_theta / (pi_old + w) A_i (1 - sg(pi_theta))^0.5, w = (pi_old + 1) / 2, not clipped (RL-PLUS)
'importance' and 'importance_tis' need pi_beh (batch.behaviour_logp_RC); rows without it (has_behaviour_R False)
use 'paper'.

Aggregation (AGGREGATIONS, cfg.aggregation) returns (loss_sum, denom), loss = loss_sum / denom. Both are sums over
rows, so k micro-batches give sum(loss_sum_k) / sum(denom_k) == the big-batch loss exactly (and its gradient):
  'token_mean'              loss_sum = sum_it l_it                        denom = number of valid tokens   (DAPO)
  'seq_mean_token_mean'     loss_sum = sum_i (1/|o_i|) sum_t l_it         denom = number of sequences      (GRPO)
  'seq_mean_token_sum_norm' loss_sum = sum_i (1/max_len_norm) sum_t l_it  denom = number of sequences  (Dr. GRPO)
A sequence counts when it has at least one valid token, so all-padding rows (batch padding) change nothing.

aux holds additive statistics ("sum/..."), and "min/..." / "max/..." ones, merged across micro-batches by
merge_aux and turned into metrics by finalize_aux. Legend: B rows, C completion tokens; *_B1 broadcasts over C.
"""

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from ekipl_jax.rl.batch import UpdateBatch
from ekipl_jax.rl.registry import Registry

Array = jax.Array
sg = jax.lax.stop_gradient
TREATMENTS = Registry("rl.external_treatment")  # (Terms, cfg) -> (J_BC, clipped_BC); info: needs_behaviour
AGGREGATIONS = Registry("rl.aggregation")  # (l_BC, m_BC, cfg) -> (loss_sum, denom)
KL_ESTIMATORS = Registry("rl.kl_estimator")  # (logp_BC, ref_logp_BC) -> KL_BC


class Terms(NamedTuple):
  """What a treatment reads (float32, zero on padding)."""

  logp_BC: Array  # log pi_theta
  old_logp_BC: Array  # log pi_old (no gradient)
  A_B1: Array  # A_i
  J_BC: Array  # the clipped surrogate J_it of every token
  ext_B1: Array  # bool: external row
  valid_BC: Array  # bool: completion token
  behaviour_logp_BC: Optional[Array]  # log pi_beh (None when the batch has none)
  has_B1: Array  # bool: the row's pi_beh is known


# --- External-token treatments: J_BC for every token, and which tokens use the clipped J (clip statistics). ---


@TREATMENTS.register("paper")
def _paper(t: Terms, cfg) -> tuple[Array, Array]:
  return t.J_BC, jnp.ones_like(t.valid_BC)


@TREATMENTS.register("luffy")
def _luffy(t: Terms, cfg) -> tuple[Array, Array]:
  pi_BC = jnp.exp(t.logp_BC)
  J_BC = jnp.where(t.ext_B1, pi_BC / (pi_BC + cfg.luffy_gamma) * t.A_B1, t.J_BC)  # f(pi) A, f(p) = p / (p + gamma)
  return J_BC, jnp.broadcast_to(~t.ext_B1, t.J_BC.shape)


def _behaviour(t: Terms, name: str, fallback_BC: Array) -> tuple[Array, Array]:
  """(tokens that use pi_beh, log pi_beh there and fallback_BC elsewhere)."""
  if t.behaviour_logp_BC is None:
    raise ValueError(f"external_treatment {name!r} needs behaviour_logp_RC")
  use_BC = jnp.broadcast_to(t.ext_B1 & t.has_B1, t.J_BC.shape)
  return use_BC, jnp.where(use_BC & t.valid_BC, t.behaviour_logp_BC.astype(jnp.float32), fallback_BC)


@TREATMENTS.register("importance", needs_behaviour=True)
def _importance(t: Terms, cfg) -> tuple[Array, Array]:
  use_BC, beh_BC = _behaviour(t, "importance", t.logp_BC)
  rho_beh_BC = jnp.exp(t.logp_BC - sg(beh_BC))  # pi_theta / pi_beh
  return jnp.where(use_BC, jnp.minimum(rho_beh_BC, cfg.is_max) * t.A_B1, t.J_BC), ~use_BC


@TREATMENTS.register("importance_tis", needs_behaviour=True)
def _importance_tis(t: Terms, cfg) -> tuple[Array, Array]:
  use_BC, beh_BC = _behaviour(t, "importance_tis", t.old_logp_BC)
  w_BC = sg(jnp.minimum(jnp.exp(t.old_logp_BC - beh_BC), cfg.is_max))  # min(pi_old / pi_beh, C), detached
  return jnp.where(use_BC, w_BC * t.J_BC, t.J_BC), jnp.ones_like(t.valid_BC)


@TREATMENTS.register("rlplus")
def _rlplus(t: Terms, cfg) -> tuple[Array, Array]:
  pi_BC, pi_old_BC = jnp.exp(t.logp_BC), jnp.exp(t.old_logp_BC)
  w_BC = (pi_old_BC + 1.0) / 2.0
  scale_BC = jnp.sqrt(1.0 - sg(pi_BC))  # (1 - sg(pi_theta))^0.5
  J_BC = jnp.where(t.ext_B1, 2.0 * pi_BC / (pi_old_BC + w_BC) * t.A_B1 * scale_BC, t.J_BC)
  return J_BC, jnp.broadcast_to(~t.ext_B1, t.J_BC.shape)


# --- Aggregations: (loss_sum, denom) of per-token values l_BC under the float mask m_BC. ---


def _num_sequences(m_BC: Array) -> Array:
  return (m_BC.sum(-1) > 0).astype(jnp.float32).sum()


@AGGREGATIONS.register("token_mean")
def _token_mean(l_BC: Array, m_BC: Array, cfg) -> tuple[Array, Array]:
  return (l_BC * m_BC).sum(-1).sum(), m_BC.sum()


@AGGREGATIONS.register("seq_mean_token_mean")
def _seq_mean_token_mean(l_BC: Array, m_BC: Array, cfg) -> tuple[Array, Array]:
  return ((l_BC * m_BC).sum(-1) / jnp.maximum(m_BC.sum(-1), 1.0)).sum(), _num_sequences(m_BC)


@AGGREGATIONS.register("seq_mean_token_sum_norm")
def _seq_mean_token_sum_norm(l_BC: Array, m_BC: Array, cfg) -> tuple[Array, Array]:
  return (l_BC * m_BC).sum(-1).sum() / cfg.max_len_norm, _num_sequences(m_BC)


# --- KL estimators of KL(pi_theta || pi_ref) per token. ---


@KL_ESTIMATORS.register("k3")
def _k3(logp_BC: Array, ref_logp_BC: Array) -> Array:
  d_BC = ref_logp_BC - logp_BC
  return jnp.exp(d_BC) - d_BC - 1.0


@KL_ESTIMATORS.register("k1")
def _k1(logp_BC: Array, ref_logp_BC: Array) -> Array:
  return -(ref_logp_BC - logp_BC)  # log(pi_theta / pi_ref)


def _masked_stats(x_BC: Array, m_BC: Array, name: str) -> dict[str, Array]:
  mb = m_BC > 0
  return {
      f"sum/{name}": jnp.where(mb, x_BC, 0.0).sum(),
      f"sum/{name}_count": m_BC.sum(),
      f"min/{name}": jnp.where(mb, x_BC, jnp.inf).min(),
      f"max/{name}": jnp.where(mb, x_BC, -jnp.inf).max(),
  }


def grpo_loss(
    logp_BC: Array, old_logp_BC: Array, batch: UpdateBatch, cfg, *, entropy_BC: Optional[Array] = None
) -> tuple[Array, Array, dict[str, Array]]:
  """Returns (loss_sum, denom, aux); loss = loss_sum / denom (to minimise). See the module docstring."""
  treatment = TREATMENTS.lookup(cfg.external_treatment)
  aggregate = AGGREGATIONS.lookup(cfg.aggregation)
  f32 = jnp.float32
  m_BC = batch.mask_RC.astype(f32)
  valid_BC = m_BC > 0
  logp_BC = jnp.where(valid_BC, logp_BC.astype(f32), 0.0)
  old_logp_BC = jnp.where(valid_BC, sg(old_logp_BC).astype(f32), 0.0)
  A_B1 = batch.A_R.astype(f32)[:, None]  # A_i
  ext_B1 = batch.is_external_R.astype(bool)[:, None]
  has_R = batch.has_behaviour_R
  has_B1 = (jnp.ones(batch.A_R.shape, bool) if has_R is None else has_R.astype(bool))[:, None]
  eps_low, eps_high, c, beta = cfg.eps_low, cfg.eps_high, cfg.dual_clip, cfg.beta

  # J_it = min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A), and the dual clip max(J, c A) where A < 0.
  rho_BC = jnp.exp(logp_BC - old_logp_BC)
  J_BC = jnp.minimum(rho_BC * A_B1, jnp.clip(rho_BC, 1.0 - eps_low, 1.0 + eps_high) * A_B1)
  if c is not None:
    J_BC = jnp.where(A_B1 < 0, jnp.maximum(J_BC, c * A_B1), J_BC)

  # External tokens: the registered treatment.
  J_BC, clipped_BC = treatment(
      Terms(logp_BC, old_logp_BC, A_B1, J_BC, ext_B1, valid_BC, batch.behaviour_logp_RC, has_B1), cfg
  )

  # Objective J - beta KL + entropy_coef H.
  obj_BC = J_BC
  aux: dict[str, Array] = {}
  if batch.ref_logp_RC is not None:
    ref_BC = jnp.where(valid_BC, batch.ref_logp_RC.astype(f32), 0.0)
    kl_BC = KL_ESTIMATORS.lookup(cfg.kl_estimator)(logp_BC, ref_BC)
    aux["sum/kl"] = (kl_BC * m_BC).sum()
    if beta != 0:
      obj_BC = obj_BC - beta * kl_BC
  elif beta != 0:
    raise ValueError("beta != 0 needs batch.ref_logp_RC")
  if entropy_BC is not None:
    ent_BC = jnp.where(valid_BC, entropy_BC.astype(f32), 0.0)
    aux["sum/entropy"] = (ent_BC * m_BC).sum()
    if cfg.entropy_coef != 0:
      obj_BC = obj_BC + cfg.entropy_coef * ent_BC
  elif cfg.entropy_coef != 0:
    raise ValueError("entropy_coef != 0 needs entropy_BC")

  loss_sum, denom = aggregate(-obj_BC, m_BC, cfg)  # l_it = -obj_it

  # Diagnostics (no gradient): clip activity where the clip zeroes the gradient, rho by source.
  rho_sg, cm_BC = sg(rho_BC), m_BC * clipped_BC
  aux["sum/tokens"] = m_BC.sum()
  aux["sum/clip_low"] = (cm_BC * ((A_B1 < 0) & (rho_sg < 1.0 - eps_low))).sum()
  aux["sum/clip_high"] = (cm_BC * ((A_B1 > 0) & (rho_sg > 1.0 + eps_high))).sum()
  if c is not None:
    aux["sum/clip_dual"] = (cm_BC * ((A_B1 < 0) & (rho_sg > c))).sum()
  aux |= _masked_stats(rho_sg, m_BC * ~ext_B1, "rho/policy")
  aux |= _masked_stats(rho_sg, m_BC * ext_B1, "rho/external")
  return loss_sum, denom, aux


def merge_aux(a: dict[str, Array], b: dict[str, Array]) -> dict[str, Array]:
  """Combine the aux of two (micro-)batches: sums add, mins min, maxes max."""
  op = {"sum": jnp.add, "min": jnp.minimum, "max": jnp.maximum}
  return {k: op[k.split("/", 1)[0]](a[k], b[k]) for k in a}


def finalize_aux(aux: dict[str, Array]) -> dict[str, Array]:
  """Metrics from merged aux: per-token means (kl, entropy, clip fractions), rho mean/min/max by source."""
  tok = jnp.maximum(aux["sum/tokens"], 1.0)
  out = {}
  for name in ("kl", "entropy", "clip_low", "clip_high", "clip_dual"):
    if f"sum/{name}" in aux:
      out[name] = aux[f"sum/{name}"] / tok
  if "sum/sampler_diff" in aux:
    out["sampler_logp_diff"] = aux["sum/sampler_diff"] / jnp.maximum(aux["sum/sampler_tokens"], 1.0)
    out["sampler_logp_diff_max"] = aux["max/sampler_diff"]
  for src in ("policy", "external"):
    n = aux[f"sum/rho/{src}_count"]
    nan = jnp.float32(jnp.nan)
    out[f"rho_mean/{src}"] = jnp.where(n > 0, aux[f"sum/rho/{src}"] / jnp.maximum(n, 1.0), nan)
    out[f"rho_min/{src}"] = jnp.where(n > 0, aux[f"min/rho/{src}"], nan)
    out[f"rho_max/{src}"] = jnp.where(n > 0, aux[f"max/rho/{src}"], nan)
  return out
