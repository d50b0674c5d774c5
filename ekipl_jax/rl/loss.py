"""The GRPO / Vision-EKIPL objective (docs/METHOD.md sect. 1-4), per completion token t of row i:

  rho_it = pi_theta(o_it | q, o_i,<t) / pi_old(o_it | q, o_i,<t)             = exp(logp - old_logp)
  J_it   = min( rho_it A_i , clip(rho_it, 1 - eps_low, 1 + eps_high) A_i )   (DAPO clip-higher)
  J_it   = max( J_it , c A_i )  where A_i < 0                                  (dual clip, c > 1, optional)
  KL_it  = exp(ref - logp) - (ref - logp) - 1   (k3)   |   logp - ref   (k1)
  l_it   = -( J_it - beta KL_it + entropy_coef H_it )

External rows (is_external) replace J_it by, per cfg.external_treatment:
  'paper'      the same clipped J_it, pi_old = the old policy's own teacher-forced probability (Vision-EKIPL)
  'luffy'      f(pi_theta) A_i, f(p) = p / (p + gamma), never clipped; gradient through pi_theta (LUFFY)
  'importance' min(pi_theta / pi_behaviour, is_max) A_i from stored behaviour log-probs (truncated IS; above
               is_max the term is constant, so no gradient); rows with has_behaviour_B False use 'paper'
               (has_behaviour_B None: every external row has them)
  'importance_tis'  w A-term of the clipped J_it with w = sg(min(pi_old / pi_behaviour, is_max)): truncated
               importance sampling as TRL's GRPOTrainer applies it (vllm_importance_sampling_mode "token_truncate",
               trl/trainer/grpo_trainer.py at commit f2cd57710ae345ea6428ae95363267fcf38a3dc8): the weight is detached,
               so a capped token still gets the clipped term's gradient (times is_max); rows with has_behaviour_B
               False use 'paper'
  'rlplus'     2 pi_theta / (pi_old + w) * A_i * (1 - sg(pi_theta))^0.5, w = (pi_old + 1) / 2, not clipped (RL-PLUS)

Aggregation, returned as (loss_sum, denom) with loss = loss_sum / denom. Both are sums over rows, so k micro-batches
give sum(loss_sum_k) / sum(denom_k) == the big-batch loss exactly (and its gradient, denom has none):
  'token_mean'              loss_sum = sum_it l_it                       denom = number of valid tokens     (DAPO)
  'seq_mean_token_mean'     loss_sum = sum_i (1/|o_i|) sum_t l_it        denom = number of sequences        (GRPO)
  'seq_mean_token_sum_norm' loss_sum = sum_i (1/max_len_norm) sum_t l_it denom = number of sequences   (Dr. GRPO)
A sequence counts when it has at least one valid token, so all-padding rows (batch padding) change nothing.

aux holds additive statistics ("sum/..."), and "min/..." / "max/..." ones, merged across micro-batches by
merge_aux and turned into metrics by finalize_aux.
"""

from typing import Optional

import jax
import jax.numpy as jnp

from ekipl_jax.rl.batch import UpdateBatch

Array = jax.Array
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
TREATMENTS = ("paper", "luffy", "importance", "importance_tis", "rlplus")


def denominator(mask_BC: Array, cfg) -> Array:
  m_BC = mask_BC.astype(jnp.float32)
  if cfg.aggregation == "token_mean":
    return m_BC.sum()
  if cfg.aggregation in AGGREGATIONS:
    return (m_BC.sum(-1) > 0).astype(jnp.float32).sum()
  raise ValueError(f"unknown aggregation {cfg.aggregation!r}")


def aggregate(l_BC: Array, mask_BC: Array, cfg) -> Array:
  """loss_sum of per-token values l_BC (see module docstring)."""
  m_BC = mask_BC.astype(jnp.float32)
  tok_sum_B = (l_BC * m_BC).sum(-1)
  if cfg.aggregation == "token_mean":
    return tok_sum_B.sum()
  if cfg.aggregation == "seq_mean_token_mean":
    return (tok_sum_B / jnp.maximum(m_BC.sum(-1), 1.0)).sum()
  if cfg.aggregation == "seq_mean_token_sum_norm":
    return tok_sum_B.sum() / cfg.max_len_norm
  raise ValueError(f"unknown aggregation {cfg.aggregation!r}")


def kl_term(logp_BC: Array, ref_logp_BC: Array, estimator: str) -> Array:
  d_BC = ref_logp_BC - logp_BC
  if estimator == "k3":
    return jnp.exp(d_BC) - d_BC - 1.0
  if estimator == "k1":
    return -d_BC
  raise ValueError(f"unknown kl_estimator {estimator!r}")


def _masked_stats(x_BC: Array, m_BC: Array, name: str) -> dict[str, Array]:
  mb = m_BC > 0
  return {
      f"sum/{name}": jnp.where(mb, x_BC, 0.0).sum(),
      f"sum/{name}_count": m_BC.sum(),
      f"min/{name}": jnp.where(mb, x_BC, jnp.inf).min(),
      f"max/{name}": jnp.where(mb, x_BC, -jnp.inf).max(),
  }


def grpo_loss(
    logp_BC: Array,
    old_logp_BC: Array,
    batch: UpdateBatch,
    cfg,
    *,
    entropy_BC: Optional[Array] = None,
) -> tuple[Array, Array, dict[str, Array]]:
  """Returns (loss_sum, denom, aux); loss = loss_sum / denom (to minimise). See the module docstring."""
  if cfg.external_treatment not in TREATMENTS:
    raise ValueError(f"unknown external_treatment {cfg.external_treatment!r}")
  f32 = jnp.float32
  mask_BC, A_B, is_external_B = batch.mask_RC, batch.A_R, batch.is_external_R
  ref_logp_BC, behaviour_logp_BC, has_behaviour_B = batch.ref_logp_RC, batch.behaviour_logp_RC, batch.has_behaviour_R
  m_BC = mask_BC.astype(f32)
  valid_BC = m_BC > 0
  logp_BC = jnp.where(valid_BC, logp_BC.astype(f32), 0.0)
  old_logp_BC = jnp.where(valid_BC, jax.lax.stop_gradient(old_logp_BC).astype(f32), 0.0)
  A_B1 = A_B.astype(f32)[:, None]
  ext_B1 = is_external_B.astype(bool)[:, None]
  eps_low, eps_high, c, beta = cfg.eps_low, cfg.eps_high, cfg.dual_clip, cfg.beta

  # Clipped surrogate J (policy rows; external rows under 'paper').
  rho_BC = jnp.exp(logp_BC - old_logp_BC)
  J_BC = jnp.minimum(rho_BC * A_B1, jnp.clip(rho_BC, 1.0 - eps_low, 1.0 + eps_high) * A_B1)
  if c is not None:
    J_BC = jnp.where(A_B1 < 0, jnp.maximum(J_BC, c * A_B1), J_BC)
  clipped_BC = jnp.broadcast_to(~ext_B1, m_BC.shape)  # tokens that use the clipped J

  # External tokens.
  treatment = cfg.external_treatment
  if treatment == "paper":
    clipped_BC = jnp.ones_like(valid_BC)
  elif treatment == "luffy":
    pi_BC = jnp.exp(logp_BC)
    J_BC = jnp.where(ext_B1, pi_BC / (pi_BC + cfg.luffy_gamma) * A_B1, J_BC)
  elif treatment == "importance":
    if behaviour_logp_BC is None:
      raise ValueError("external_treatment 'importance' needs behaviour_logp_BC")
    has_B1 = (jnp.ones(A_B.shape, bool) if has_behaviour_B is None else has_behaviour_B.astype(bool))[:, None]
    use_is_BC = jnp.broadcast_to(ext_B1 & has_B1, m_BC.shape)
    beh_BC = jnp.where(use_is_BC & valid_BC, behaviour_logp_BC.astype(f32), logp_BC)
    rho_is_BC = jnp.exp(logp_BC - jax.lax.stop_gradient(beh_BC))
    J_BC = jnp.where(use_is_BC, jnp.minimum(rho_is_BC, cfg.is_max) * A_B1, J_BC)
    clipped_BC = ~use_is_BC
  elif treatment == "importance_tis":
    if behaviour_logp_BC is None:
      raise ValueError("external_treatment 'importance_tis' needs behaviour_logp_BC")
    has_B1 = (jnp.ones(A_B.shape, bool) if has_behaviour_B is None else has_behaviour_B.astype(bool))[:, None]
    use_is_BC = jnp.broadcast_to(ext_B1 & has_B1, m_BC.shape)
    beh_BC = jnp.where(use_is_BC & valid_BC, behaviour_logp_BC.astype(f32), old_logp_BC)
    w_BC = jax.lax.stop_gradient(jnp.minimum(jnp.exp(old_logp_BC - beh_BC), cfg.is_max))
    J_BC = jnp.where(use_is_BC, w_BC * J_BC, J_BC)
    clipped_BC = jnp.ones_like(valid_BC)
  elif treatment == "rlplus":
    pi_BC, pi_old_BC = jnp.exp(logp_BC), jnp.exp(old_logp_BC)
    w_BC = (pi_old_BC + 1.0) / 2.0
    scale_BC = jnp.sqrt(1.0 - jax.lax.stop_gradient(pi_BC))
    J_BC = jnp.where(ext_B1, 2.0 * pi_BC / (pi_old_BC + w_BC) * A_B1 * scale_BC, J_BC)

  obj_BC = J_BC
  aux: dict[str, Array] = {}
  if ref_logp_BC is not None:
    kl_BC = kl_term(logp_BC, jnp.where(valid_BC, ref_logp_BC.astype(f32), 0.0), cfg.kl_estimator)
    aux["sum/kl"] = (kl_BC * m_BC).sum()
    if beta != 0:
      obj_BC = obj_BC - beta * kl_BC
  elif beta != 0:
    raise ValueError("beta != 0 needs ref_logp_BC")
  if entropy_BC is not None:
    ent_BC = jnp.where(valid_BC, entropy_BC.astype(f32), 0.0)
    aux["sum/entropy"] = (ent_BC * m_BC).sum()
    if cfg.entropy_coef != 0:
      obj_BC = obj_BC + cfg.entropy_coef * ent_BC
  elif cfg.entropy_coef != 0:
    raise ValueError("entropy_coef != 0 needs entropy_BC")

  loss_sum = aggregate(-obj_BC, m_BC, cfg)
  denom = denominator(mask_BC, cfg)

  # Diagnostics (no gradient): clip activity where the clip zeroes the gradient, rho by source.
  sg = jax.lax.stop_gradient
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
