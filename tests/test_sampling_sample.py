"""The sampling step: temperature, top-k, top-p cut the distribution as transformers does (frequency bounds on a tiny
vocabulary with a seeded key), and the returned log-probs are those of the distribution sampled from."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ekipl_jax.sampling.sample import SamplingParams, sample_step, truncated_probs

LOGITS_V = np.array([2.0, 1.5, 1.0, 0.2, -0.5, -1.0, -3.0, 0.9], np.float32)


def reference_probs(logits, T, top_k, top_p):
  """transformers' warpers (temperature -> top-k -> top-p), written out in numpy."""
  z = logits.astype(np.float64) / T
  if top_k:
    z = np.where(z >= np.sort(z)[::-1][top_k - 1], z, -np.inf)
  if top_p < 1.0:
    order = np.argsort(z)  # ascending, as in TopPLogitsWarper
    p = np.exp(z[order] - z[order].max())
    p /= p.sum()
    remove = np.cumsum(p) <= 1 - top_p
    remove[-1] = False
    z[order[remove]] = -np.inf
  p = np.exp(z - z.max())
  return p / p.sum()


CASES = [(1.0, 0, 1.0), (0.5, 0, 1.0), (1.3, 3, 1.0), (1.0, 0, 0.7), (0.8, 5, 0.8), (1.0, 0, 0.95)]


@pytest.mark.parametrize("T,top_k,top_p", CASES)
def test_frequencies_match_the_truncated_distribution(T, top_k, top_p):
  n = 40_000
  sp = SamplingParams(T, top_p, top_k)
  ref = reference_probs(LOGITS_V, T, top_k, top_p)
  logits_BV = jnp.broadcast_to(jnp.asarray(LOGITS_V), (n, LOGITS_V.size))
  tok, logp, plogp = jax.jit(sample_step, static_argnums=2)(logits_BV, jax.random.key(1), sp)
  tok = np.asarray(tok)
  freq = np.bincount(tok, minlength=LOGITS_V.size) / n
  assert (freq[ref == 0] == 0).all(), "a token outside top-k / top-p was sampled"
  sigma = np.sqrt(ref * (1 - ref) / n)
  np.testing.assert_array_less(np.abs(freq - ref), 5 * sigma + 1e-9)
  # chi-square over the kept tokens (df = kept - 1; 40 is far beyond the 99.9% quantile for df <= 7)
  kept = ref > 0
  chi2 = (n * (freq[kept] - ref[kept]) ** 2 / ref[kept]).sum()
  assert chi2 < 40, chi2
  # log-probs: of the truncated distribution, and of the tempered untruncated policy
  np.testing.assert_allclose(np.asarray(logp), np.log(ref[tok]), atol=1e-5)
  tempered = jax.nn.log_softmax(LOGITS_V / T)
  np.testing.assert_allclose(np.asarray(plogp), np.asarray(tempered)[tok], atol=1e-5)
  np.testing.assert_allclose(np.asarray(truncated_probs(logits_BV[:1], sp))[0], ref, atol=1e-6)


def test_greedy():
  logits = jnp.asarray(np.stack([LOGITS_V, LOGITS_V[::-1]]))
  tok, logp, plogp = sample_step(logits, jax.random.key(0), SamplingParams(0.0, 0.9, 3))
  np.testing.assert_array_equal(tok, [0, 7])
  np.testing.assert_array_equal(logp, 0.0)
  np.testing.assert_allclose(plogp, np.asarray(jax.nn.log_softmax(logits))[[0, 1], [0, 7]], atol=1e-6)


def test_seeded_and_key_dependent():
  logits = jnp.broadcast_to(jnp.asarray(LOGITS_V), (64, 8))
  sp = SamplingParams(1.0, 0.9, 0)
  a = sample_step(logits, jax.random.key(3), sp)[0]
  b = sample_step(logits, jax.random.key(3), sp)[0]
  c = sample_step(logits, jax.random.key(4), sp)[0]
  np.testing.assert_array_equal(a, b)
  assert (np.asarray(a) != np.asarray(c)).any()
