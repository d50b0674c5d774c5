"""Per-token log-probs and entropies of a span of targets, chunked over T so [B, T, V] logits never exist at once.

Legend: B batch, T tokens, C targets (T - targets_from), K chunk length, D width, V vocab.

Each chunk's logits are rematerialised in the backward pass (`jax.checkpoint`), so memory is O(B * K * V).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(
    model,
    params,
    input_ids_BT,
    attention_mask_BT=None,
    pixel_values=None,
    image_grid_thw=None,
    *,
    targets_from: int,
    temperature: float = 1.0,
    chunk_size: int = 128,
    mm_token_type_ids=None,
    positions=None,
    vision_metadata=None,
):
  """logp_BC, entropy_BC (float32): column j scores input_ids[:, targets_from + j] given the tokens before it,
  under softmax(logits / temperature). `targets_from` and `chunk_size` are static."""
  T = input_ids_BT.shape[1]
  if not 1 <= targets_from < T:
    raise ValueError(f"targets_from={targets_from} must be in [1, {T - 1}]")
  h_BTD = model.apply(
      params,
      input_ids_BT,
      attention_mask_BT,
      pixel_values,
      image_grid_thw,
      mm_token_type_ids,
      positions,
      vision_metadata,
      method="hidden",
  )
  return logprobs_from_hidden(
      model,
      params,
      h_BTD[:, targets_from - 1 : T - 1],
      jnp.asarray(input_ids_BT)[:, targets_from:],
      temperature=temperature,
      chunk_size=chunk_size,
  )


def logprobs_from_hidden(model, params, h_BCD, targets_BC, *, temperature: float = 1.0, chunk_size: int = 128):
  """logp_BC, entropy_BC of `targets_BC` given the hidden states h_BCD that predict them (position t-1 for t),
  chunked over C with each chunk's logits rematerialised in the backward pass."""
  B, C, D = h_BCD.shape
  K = min(chunk_size, C)
  n = -(-C // K)
  pad = n * K - C
  h_nBKD = jnp.pad(h_BCD, ((0, 0), (0, pad), (0, 0))).reshape(B, n, K, D).swapaxes(0, 1)
  t_nBK = jnp.pad(targets_BC, ((0, 0), (0, pad))).reshape(B, n, K).swapaxes(0, 1)

  @jax.checkpoint
  def chunk(h_BKD, t_BK):
    logits_BKV = model.apply(params, h_BKD, method="unembed").astype(jnp.float32) / temperature
    logz_BK = jax.nn.logsumexp(logits_BKV, axis=-1)
    logp_BK = jnp.take_along_axis(logits_BKV, t_BK[..., None], axis=-1)[..., 0] - logz_BK
    p_BKV = jnp.exp(logits_BKV - logz_BK[..., None])
    entropy_BK = logz_BK - jnp.sum(p_BKV * logits_BKV, axis=-1)
    return logp_BK, entropy_BK

  logp_nBK, ent_nBK = jax.lax.map(lambda a: chunk(*a), (h_nBKD, t_nBK))
  unchunk = lambda x: x.swapaxes(0, 1).reshape(B, n * K)[:, :C]
  return unchunk(logp_nBK), unchunk(ent_nBK)
