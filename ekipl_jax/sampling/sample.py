"""One sampling step: logits -> token, with temperature, top-k, top-p (nucleus) and greedy; and its log-probs.

Legend: B rows, V vocabulary, k top-k candidates.

Order as in transformers / vLLM: logits / temperature, then keep the top_k largest (top_k 0 = all), then keep the
smallest set of most likely tokens whose probability reaches top_p (the token crossing top_p is kept; top_p 1 = all).

Returned per row:
  token_B        the chosen token (argmax when temperature == 0)
  logp_B         its log-prob under the distribution actually sampled from (temperature, top-k, top-p applied and
                 renormalised); 0 for greedy (a point mass)
  policy_logp_B  log_softmax(logits / temperature) at the token: the temperature-scaled policy without truncation,
                 what `models.token_logprobs(..., temperature=T)` recomputes (temperature 1 when greedy)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  temperature: float = 1.0  # 0 = greedy
  top_p: float = 1.0  # 1 = off
  top_k: int = 0  # 0 = off

  @property
  def greedy(self) -> bool:
    return self.temperature <= 0.0


def _take(x_BV, idx_B):
  return jnp.take_along_axis(x_BV, idx_B[:, None], axis=-1)[:, 0]


def _log_softmax_at(x_BV, idx_B):
  """jax.nn.log_softmax(x_BV)[b, idx_B[b]] (the same arithmetic), without the [B, V] log-probs."""
  max_B1 = jax.lax.stop_gradient(jnp.max(x_BV, axis=-1, keepdims=True))
  lse_B = jnp.log(jnp.sum(jnp.exp(x_BV - max_B1), axis=-1))
  return (_take(x_BV, idx_B) - max_B1[:, 0]) - lse_B


def _nucleus(sorted_logits_Bk, top_p: float):
  """Mask (to -inf) the sorted-descending candidates beyond the top_p nucleus."""
  probs_Bk = jax.nn.softmax(sorted_logits_Bk, axis=-1)
  before_Bk = jnp.cumsum(probs_Bk, axis=-1) - probs_Bk  # mass of the strictly more likely candidates
  keep_Bk = before_Bk < top_p
  return jnp.where(keep_Bk, sorted_logits_Bk, -jnp.inf)


def sample_step(logits_BV: jax.Array, rng: jax.Array, sp: SamplingParams):
  """(token_B int32, logp_B, policy_logp_B) for one step; see the module docstring."""
  logits_BV = logits_BV.astype(jnp.float32)
  if sp.greedy:
    token_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    policy_logp_B = _log_softmax_at(logits_BV, token_B)
    return token_B, jnp.zeros_like(policy_logp_B), policy_logp_B
  scaled_BV = logits_BV / sp.temperature
  V = scaled_BV.shape[-1]
  k = sp.top_k if 0 < sp.top_k < V else (V if sp.top_p < 1.0 else 0)
  if k == 0:  # plain sampling from the tempered distribution
    token_B = jax.random.categorical(rng, scaled_BV, axis=-1).astype(jnp.int32)
    logp_B = _log_softmax_at(scaled_BV, token_B)
    return token_B, logp_B, logp_B
  cand_Bk, cand_idx_Bk = jax.lax.top_k(scaled_BV, k)  # sorted descending
  if sp.top_p < 1.0:
    cand_Bk = _nucleus(cand_Bk, sp.top_p)
  choice_B = jax.random.categorical(rng, cand_Bk, axis=-1)
  token_B = _take(cand_idx_Bk, choice_B).astype(jnp.int32)
  logp_B = _log_softmax_at(cand_Bk, choice_B)
  return token_B, logp_B, _log_softmax_at(scaled_BV, token_B)


def truncated_probs(logits_BV: jax.Array, sp: SamplingParams) -> jax.Array:
  """The full [B, V] distribution `sample_step` samples from (for tests and diagnostics)."""
  logits_BV = logits_BV.astype(jnp.float32)
  if sp.greedy:
    return jax.nn.one_hot(jnp.argmax(logits_BV, -1), logits_BV.shape[-1])
  scaled_BV = logits_BV / sp.temperature
  V = scaled_BV.shape[-1]
  k = sp.top_k if 0 < sp.top_k < V else V
  cand_Bk, idx_Bk = jax.lax.top_k(scaled_BV, k)
  if sp.top_p < 1.0:
    cand_Bk = _nucleus(cand_Bk, sp.top_p)
  probs_Bk = jax.nn.softmax(cand_Bk, axis=-1)
  B = scaled_BV.shape[0]
  return jnp.zeros_like(scaled_BV).at[jnp.arange(B)[:, None], idx_Bk].set(probs_Bk)
