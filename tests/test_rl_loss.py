"""The GRPO loss against an independent numpy transcription of docs/METHOD.md sect. 1-4, and its gradient per token."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ekipl_jax.rl import config, loss
from ekipl_jax.rl.batch import UpdateBatch


@pytest.fixture(autouse=True)
def _strict_ranks():
  with jax.numpy_rank_promotion("raise"):
    yield


B, C = 6, 5


def _cfg(**kw):
  c = config.default()
  c.update(kw)
  return c


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  logp = np.log(rng.uniform(0.05, 0.95, (B, C))).astype(np.float32)
  old = (logp + rng.normal(0, 0.4, (B, C))).astype(np.float32)  # rho spans both clip edges
  ref = (logp + rng.normal(0, 0.3, (B, C))).astype(np.float32)
  beh = (logp + rng.normal(0, 1.0, (B, C))).astype(np.float32)
  ent = rng.uniform(0, 2, (B, C)).astype(np.float32)
  A = np.array([1.0, -1.5, 0.7, -0.3, 2.0, -2.0], np.float32)
  lengths = np.array([5, 3, 1, 4, 2, 5])
  mask = (np.arange(C)[None] < lengths[:, None]).astype(np.float32)
  ext = np.array([0, 0, 0, 1, 1, 1], bool)
  has_beh = np.array([0, 0, 0, 1, 0, 1], bool)
  return dict(logp=logp, old=old, ref=ref, beh=beh, ent=ent, A=A, mask=mask, ext=ext, has_beh=has_beh)


def np_loss(d, cfg):
  """loss = loss_sum / denom written straight from the formulas (float64)."""
  logp, old, ref, A = (d[k].astype(np.float64) for k in ("logp", "old", "ref", "A"))
  A = A[:, None]
  ext = np.broadcast_to(d["ext"][:, None], logp.shape)
  rho = np.exp(logp - old)
  J = np.minimum(rho * A, np.clip(rho, 1 - cfg.eps_low, 1 + cfg.eps_high) * A)
  if cfg.dual_clip is not None:
    J = np.where(A < 0, np.maximum(J, cfg.dual_clip * A), J)
  p, p_old = np.exp(logp), np.exp(old)
  if cfg.external_treatment == "luffy":
    J = np.where(ext, p / (p + cfg.luffy_gamma) * A, J)
  elif cfg.external_treatment == "importance":
    use = ext & d["has_beh"][:, None]
    J = np.where(use, np.minimum(np.exp(logp - d["beh"]), cfg.is_max) * A, J)
  elif cfg.external_treatment == "importance_tis":
    use = ext & d["has_beh"][:, None]
    J = np.where(use, np.minimum(np.exp(old - d["beh"]), cfg.is_max) * J, J)
  elif cfg.external_treatment == "rlplus":
    w = (p_old + 1) / 2
    J = np.where(ext, 2 * p / (p_old + w) * A * np.sqrt(1 - p), J)
  kl = np.exp(ref - logp) - (ref - logp) - 1 if cfg.kl_estimator == "k3" else logp - ref
  l = -(J - cfg.beta * kl + cfg.entropy_coef * d["ent"])
  m = d["mask"]
  if cfg.aggregation == "token_mean":
    return (l * m).sum() / m.sum()
  per_seq = (l * m).sum(1) / (m.sum(1) if cfg.aggregation == "seq_mean_token_mean" else cfg.max_len_norm)
  return per_seq.mean()


def batch_of(d, cfg) -> UpdateBatch:
  return UpdateBatch(
      mask_RC=d["mask"],
      A_R=d["A"],
      is_external_R=d["ext"],
      behaviour_logp_RC=d["beh"],
      has_behaviour_R=d["has_beh"],
      ref_logp_RC=d["ref"] if cfg.beta else None,
  )


def jax_loss(d, cfg, logp=None):
  logp = jnp.asarray(d["logp"]) if logp is None else logp
  return loss.grpo_loss(logp, d["old"], batch_of(d, cfg), cfg, entropy_BC=d["ent"])


@pytest.mark.parametrize("aggregation,treatment", list(itertools.product(loss.AGGREGATIONS, loss.TREATMENTS)))
def test_loss_matches_numpy(aggregation, treatment):
  d = _inputs()
  cfg = _cfg(
      aggregation=aggregation,
      external_treatment=treatment,
      eps_high=0.28,
      dual_clip=1.5,
      entropy_coef=0.01,
      max_len_norm=7,
  )
  loss_sum, denom, _ = jax_loss(d, cfg)
  np.testing.assert_allclose(loss_sum / denom, np_loss(d, cfg), rtol=1e-5)
  expected_denom = d["mask"].sum() if aggregation == "token_mean" else B
  assert float(denom) == expected_denom


@pytest.mark.parametrize("kl", ["k1", "k3"])
def test_kl_estimators_and_beta_zero(kl):
  d = _inputs(1)
  cfg = _cfg(kl_estimator=kl, beta=0.1)
  loss_sum, denom, aux = jax_loss(d, cfg)
  np.testing.assert_allclose(loss_sum / denom, np_loss(d, cfg), rtol=1e-5)
  cfg0 = _cfg(beta=0.0)
  loss_sum0, denom0, aux0 = jax_loss(d, cfg0)  # ref_logp_BC = None
  np.testing.assert_allclose(loss_sum0 / denom0, np_loss(d, cfg0), rtol=1e-5)
  assert "sum/kl" not in aux0
  with pytest.raises(ValueError):
    loss.grpo_loss(d["logp"], d["old"], UpdateBatch(mask_RC=d["mask"], A_R=d["A"], is_external_R=d["ext"]), cfg)


def _grad_per_token(d, cfg):
  return np.asarray(jax.grad(lambda lp: jax_loss(d, cfg, lp)[0])(jnp.asarray(d["logp"])))


@pytest.mark.parametrize("dual_clip", [None, 1.5])
def test_gradient_zero_exactly_where_clipped(dual_clip):
  d = _inputs(2)
  cfg = _cfg(beta=0.0, eps_low=0.2, eps_high=0.28, dual_clip=dual_clip, external_treatment="paper")
  g = _grad_per_token(d, cfg)
  rho, A = np.exp(d["logp"] - d["old"]), d["A"][:, None]
  zero = (d["mask"] == 0) | (A == 0) | ((A > 0) & (rho > 1 + 0.28)) | ((A < 0) & (rho < 1 - 0.2))
  if dual_clip is not None:
    zero |= (A < 0) & (rho > dual_clip)
  assert zero.any() and (~zero).any()
  np.testing.assert_array_equal(g == 0, zero)


def test_gradient_external_treatments():
  d = _inputs(3)
  ext_tok = np.broadcast_to(d["ext"][:, None], (B, C)) & (d["mask"] > 0)
  # luffy: never clipped, so every valid external token gets a gradient
  g = _grad_per_token(d, _cfg(beta=0.0, external_treatment="luffy"))
  assert np.all(g[ext_tok] != 0)
  # importance: zero exactly above is_max on rows with behaviour log-probs
  cfg = _cfg(beta=0.0, external_treatment="importance", is_max=1.5)
  g = _grad_per_token(d, cfg)
  use = ext_tok & d["has_beh"][:, None]
  rho_is = np.exp(d["logp"] - d["beh"])
  assert (use & (rho_is > 1.5)).any() and (use & (rho_is < 1.5)).any()
  np.testing.assert_array_equal(g[use] == 0, rho_is[use] > 1.5)


@pytest.mark.parametrize("aggregation", loss.AGGREGATIONS)
def test_row_split_sums_to_big_batch(aggregation):
  d = _inputs(4)
  cfg = _cfg(aggregation=aggregation, max_len_norm=7)
  full_sum, full_den, _ = jax_loss(d, cfg)
  parts = [{k: v[i::3] for k, v in d.items()} for i in range(3)]
  sums = [jax_loss(p, cfg)[:2] for p in parts]
  np.testing.assert_allclose(sum(s for s, _ in sums) / sum(n for _, n in sums), full_sum / full_den, rtol=1e-6)


def test_aux_clip_fractions_and_ratios():
  d = _inputs(5)
  cfg = _cfg(beta=0.0, eps_low=0.2, eps_high=0.28, external_treatment="paper")
  _, _, aux = jax_loss(d, cfg)
  m = loss.finalize_aux(aux)
  rho, A, msk = np.exp(d["logp"] - d["old"]), d["A"][:, None], d["mask"] > 0
  np.testing.assert_allclose(m["clip_low"], ((A < 0) & (rho < 0.8) & msk).sum() / msk.sum(), rtol=1e-6)
  np.testing.assert_allclose(m["clip_high"], ((A > 0) & (rho > 1.28) & msk).sum() / msk.sum(), rtol=1e-6)
  pol = msk & ~d["ext"][:, None]
  np.testing.assert_allclose(m["rho_max/policy"], rho[pol].max(), rtol=1e-6)
  np.testing.assert_allclose(m["rho_min/external"], rho[msk & d["ext"][:, None]].min(), rtol=1e-6)
  np.testing.assert_allclose(m["rho_mean/policy"], rho[pol].mean(), rtol=1e-6)
  np.testing.assert_allclose(m["entropy"], d["ent"][msk].mean(), rtol=1e-6)


def _one_token(logp, old, beh, A, treatment):
  """One external token with behaviour log-probs: (loss, d loss / d logp) from grpo_loss (token_mean, beta 0)."""
  cfg = _cfg(beta=0.0, aggregation="token_mean", external_treatment=treatment, is_max=2.0)
  f32 = lambda x: jnp.full((1, 1), x, jnp.float32)

  batch = UpdateBatch(
      mask_RC=f32(1.0), A_R=jnp.array([A], jnp.float32), is_external_R=jnp.array([True]), behaviour_logp_RC=f32(beh)
  )

  def f(lp):
    s, d, _ = loss.grpo_loss(lp, f32(old), batch, cfg)
    return s / d

  value, grad = jax.value_and_grad(f)(f32(logp))
  return float(value), float(grad[0, 0])


def test_importance_tis_capped_token_keeps_its_gradient():
  """pi_theta = 0.55, pi_old = 0.5, pi_behaviour = 0.1, A = 1, C = 2 (by hand):
  'importance_tis' (TRL): w = min(0.5 / 0.1, 2) = 2, rho = 1.1 (inside the clip): J = w rho A = 2.2, dJ/dlogp = 2.2;
  'importance' (truncated ratio): min(0.55 / 0.1, 2) A = 2, constant above the cap: gradient 0."""
  lp, old, beh = np.log(0.55), np.log(0.5), np.log(0.1)
  value, grad = _one_token(lp, old, beh, 1.0, "importance_tis")
  assert value == pytest.approx(-2.2, rel=1e-5) and grad == pytest.approx(-2.2, rel=1e-5)
  value, grad = _one_token(lp, old, beh, 1.0, "importance")
  assert value == pytest.approx(-2.0, rel=1e-6) and grad == 0.0
  # Below the cap (pi_behaviour = 0.4): w = 1.25; A = -1: J = w * min(rho A, clip(rho) A) = 1.25 * -1.1.
  value, grad = _one_token(lp, old, np.log(0.4), -1.0, "importance_tis")
  assert value == pytest.approx(1.25 * 1.1, rel=1e-5) and grad == pytest.approx(1.25 * 1.1, rel=1e-5)
  # Outside the clip (rho = 1.3 > 1 + eps_high, A > 0) the PPO term is constant: no gradient, as without weight.
  value, grad = _one_token(np.log(0.65), old, beh, 1.0, "importance_tis")
  assert value == pytest.approx(-2.0 * 1.2, rel=1e-5) and grad == 0.0
