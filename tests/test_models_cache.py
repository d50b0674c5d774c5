"""KV-cache decoding (prefill + one token at a time == the full forward pass) and chunked token_logprobs
(== log_softmax of the full logits at the targets; entropy too).

Legend: B batch, P prompt tokens, T full tokens, S cache slots, V vocab, C targets.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_fixtures as F
from ekipl_jax import models


@pytest.fixture(scope="module", params=F.FAMILIES)
def loaded(request, tmp_path_factory):
  path = F.tiny_hf_model(request.param, tmp_path_factory.mktemp(request.param), seed=7)
  model, params = models.load_pretrained(path)
  return path, model, params


def full_logits(model, params, inputs):
  return np.asarray(
      model.apply(
          params,
          inputs["input_ids"],
          inputs["attention_mask"],
          inputs.get("pixel_values"),
          inputs.get("image_grid_thw"),
      )
  )


@pytest.mark.parametrize("rows", [[[3], [8]], [[3, (4, 4), 2], [2, (2, 4), 5]]], ids=["left_pad", "image"])
def test_prefill_then_decode_equals_full_forward(loaded, rows):
  path, model, params = loaded
  n_new = 4
  full = F.make_inputs(path, [r + [n_new] for r in rows], seed=11)  # prompt rows + n_new completion tokens
  ids_BT, mask_BT = full["input_ids"], full["attention_mask"]
  B, T = ids_BT.shape
  P, S = T - n_new, T + 2  # two spare slots stay empty (masked)
  ref_BTV = full_logits(model, params, full)

  x_BPD, pos_3BP, delta_B = model.apply(
      params, ids_BT[:, :P], mask_BT[:, :P], full.get("pixel_values"), full.get("image_grid_thw"), method="embed"
  )
  cache = models.init_cache(model.config, B, S, jnp.float32)
  assert cache["k"].shape == (2, B, S, 2, 16)
  slots_BS = np.zeros((B, S), np.int32)
  slots_BS[:, :P] = mask_BT[:, :P]
  decode = jax.jit(lambda p, x, pos, m, c, i: model.apply(p, x, pos, m, cache=c, cache_index=i, method="decode"))
  h_BPD, cache = decode(params, x_BPD, pos_3BP, slots_BS, cache, 0)
  logits = [model.apply(params, h_BPD, method="unembed")]
  n_valid_B = mask_BT[:, :P].sum(1)
  for t in range(n_new):
    x_B1D, _, _ = model.apply(params, ids_BT[:, P + t : P + t + 1], method="embed")
    pos_3B1 = np.broadcast_to((n_valid_B + t + delta_B)[None, :, None], (3, B, 1)).astype(np.int32)
    slots_BS[:, P + t] = 1
    h_B1D, cache = decode(params, x_B1D, pos_3B1, slots_BS, cache, P + t)
    logits.append(model.apply(params, h_B1D, method="unembed"))
  got_BTV = np.concatenate([np.asarray(l) for l in logits], axis=1)
  valid = mask_BT.astype(bool)
  assert np.abs(got_BTV - ref_BTV)[valid].max() <= 1e-4
  assert decode._cache_size() == 2  # prefill shape + step shape; changing values / cache_index does not recompile


@pytest.mark.parametrize("temperature,chunk", [(1.0, 3), (0.7, 64)])
def test_token_logprobs_equal_log_softmax(loaded, temperature, chunk):
  path, model, params = loaded
  inputs = F.make_inputs(path, [[3, (4, 4), 9], [2, 12]], seed=12)
  ids_BT, mask_BT = inputs["input_ids"], inputs["attention_mask"]
  T = ids_BT.shape[1]
  start = T - 7
  logp_BC, ent_BC = models.token_logprobs(
      model,
      params,
      ids_BT,
      mask_BT,
      inputs["pixel_values"],
      inputs["image_grid_thw"],
      targets_from=start,
      temperature=temperature,
      chunk_size=chunk,
  )
  logits_BTV = full_logits(model, params, inputs).astype(np.float64) / temperature
  logq_BTV = (
      logits_BTV
      - np.log(np.exp(logits_BTV - logits_BTV.max(-1, keepdims=True)).sum(-1, keepdims=True))
      - logits_BTV.max(-1, keepdims=True)
  )
  ref_logp = np.take_along_axis(logq_BTV[:, start - 1 : T - 1], ids_BT[:, start:, None], -1)[..., 0]
  ref_ent = -(np.exp(logq_BTV) * logq_BTV).sum(-1)[:, start - 1 : T - 1]
  assert logp_BC.shape == ent_BC.shape == (2, 7)
  np.testing.assert_allclose(np.asarray(logp_BC), ref_logp, atol=1e-4)
  np.testing.assert_allclose(np.asarray(ent_BC), ref_ent, atol=1e-4)


def test_token_logprobs_jit_and_grad(loaded):
  path, model, params = loaded
  inputs = F.make_inputs(path, [[5], [12]], seed=13)
  ids_BT, mask_BT = inputs["input_ids"], inputs["attention_mask"]
  loss = lambda p, ids, m: models.token_logprobs(model, p, ids, m, targets_from=6, chunk_size=4)[0].sum()
  value, grads = jax.jit(jax.value_and_grad(loss))(params, ids_BT, mask_BT)
  eager = models.token_logprobs(model, params, ids_BT, mask_BT, targets_from=6, chunk_size=4)[0].sum()
  np.testing.assert_allclose(value, eager, rtol=1e-5)
  g = grads["params"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
  assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_write_cache_puts_the_new_slots_exactly(dtype):
  """write_cache (bits for 16-bit floats) == numpy slot assignment, under jit with the index traced."""
  from ekipl_jax.models.decoder import write_cache

  rng = np.random.default_rng(0)
  cache_BKSDh = rng.normal(size=(2, 3, 9, 4)).astype(np.float32)
  new_BKTDh = rng.normal(size=(2, 3, 2, 4)).astype(np.float32)
  got = jax.jit(write_cache)(jnp.asarray(cache_BKSDh, dtype), jnp.asarray(new_BKTDh), 5)
  want = np.asarray(jnp.asarray(cache_BKSDh, dtype)).copy()
  want[:, :, 5:7] = np.asarray(jnp.asarray(new_BKTDh, dtype))
  assert got.dtype == dtype
  np.testing.assert_array_equal(np.asarray(got), want)
