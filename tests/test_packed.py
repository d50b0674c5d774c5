"""Row-packed vision inputs (models/packed.py) give exactly the log-probs of the unpacked batch (the path that is
itself checked against transformers), with different image sizes and counts per row, under jit."""

import functools

import jax
import numpy as np
import pytest

from ekipl_jax import models
from ekipl_jax.models import packed
from ekipl_jax.train import batching
from tests import hf_fixtures


@pytest.mark.parametrize("family", hf_fixtures.FAMILIES)
def test_row_logprobs_equal_batch_logprobs(family):
  cfg = hf_fixtures.tiny_config_dict(family)
  model, params = models.init(cfg, jax.random.key(0))
  # Row 0: one 4x6-patch image; row 1: two images (2x2, 4x4); row 2: one 6x4 image. Then text completions.
  rows = [[3, (4, 6), 5], [2, (2, 2), 3, (4, 4), 4], [(6, 4), 7]]  # completions (last C tokens) are text
  inp = hf_fixtures.make_inputs(cfg, rows, seed=1)
  ids_RT, mask_RT = inp["input_ids"], inp["attention_mask"]
  C = 4
  P = ids_RT.shape[1] - C
  ref_logp, ref_ent = models.token_logprobs(
      model, params, ids_RT, mask_RT, inp["pixel_values"], inp["image_grid_thw"], targets_from=P
  )
  batch = batching.rows_batch(
      model,
      ids_RT[:, :P],
      mask_RT[:, :P],
      ids_RT[:, P:],
      mask_RT[:, P:],
      inp["pixel_values"],
      inp["image_grid_thw"],
      images_per_row=[1, 2, 1],
      patch_buckets=(64, 128),
  )
  assert batch["pixels_RNF"].shape[:2] == (3, 64)  # the largest row has 4*6 + 0 = 24 or 4 + 16 = 20 patches -> 64
  fn = jax.jit(functools.partial(packed.row_logprobs, model, targets_from=P))
  logp, ent = fn(params, batch)
  np.testing.assert_allclose(np.asarray(logp), np.asarray(ref_logp), atol=2e-5)
  np.testing.assert_allclose(np.asarray(ent), np.asarray(ref_ent), atol=2e-5)


def test_rows_never_see_each_others_images():
  cfg = hf_fixtures.tiny_config_dict("qwen2_5_vl")
  model, params = models.init(cfg, jax.random.key(0))
  inp = hf_fixtures.make_inputs(cfg, [[2, (4, 4), 3], [2, (4, 4), 3]], seed=2)
  ids, mask = inp["input_ids"], inp["attention_mask"]
  P = ids.shape[1] - 2
  mk = lambda px: batching.rows_batch(
      model, ids[:, :P], mask[:, :P], ids[:, P:], mask[:, P:], px, inp["image_grid_thw"], images_per_row=[1, 1]
  )
  fn = jax.jit(functools.partial(packed.row_logprobs, model, targets_from=P))
  a, _ = fn(params, mk(inp["pixel_values"]))
  px = inp["pixel_values"].copy()
  px[16:] += 1.0  # perturb row 1's image only
  b, _ = fn(params, mk(px))
  np.testing.assert_array_equal(np.asarray(a)[0], np.asarray(b)[0])
  assert np.abs(np.asarray(a)[1] - np.asarray(b)[1]).max() > 1e-4


def test_image_pad_token_sampled_in_completion_is_text():
  """A completion may sample the image-pad token id; the trainer must score it as the sampler did (an ordinary
  token fed through the KV cache), not as a slot for vision features. Reference: prefill + teacher-forced decode."""
  import jax.numpy as jnp

  cfg = hf_fixtures.tiny_config_dict("qwen2_5_vl")
  model, params = models.init(cfg, jax.random.key(0))
  inp = hf_fixtures.make_inputs(cfg, [[2, (4, 4), 3], [5, (2, 2), 1]], seed=3)
  ids_BP, mask_BP = inp["input_ids"], inp["attention_mask"]
  B, P = ids_BP.shape
  comp_BC = np.array([[7, hf_fixtures.IMAGE_TOKEN_ID, 9, 11], [hf_fixtures.IMAGE_TOKEN_ID, 5, 6, 8]], np.int32)
  C = comp_BC.shape[1]

  x_BPD, pos_3BP, delta_B = model.apply(
      params, ids_BP, mask_BP, inp["pixel_values"], inp["image_grid_thw"], method="embed"
  )
  cache = models.init_cache(model.config, B, P + C, jnp.float32)
  slots_BS = np.zeros((B, P + C), np.int32)
  slots_BS[:, :P] = mask_BP
  h, cache = model.apply(params, x_BPD, pos_3BP, slots_BS, cache=cache, cache_index=0, method="decode")
  logits = [model.apply(params, h[:, -1:], method="unembed")]
  for t in range(C - 1):
    x_B1D, _, _ = model.apply(params, comp_BC[:, t : t + 1], positions=np.zeros((3, B, 1), np.int32), method="embed")
    pos_3B1 = np.broadcast_to((mask_BP.sum(1) + t + delta_B)[None, :, None], (3, B, 1)).astype(np.int32)
    slots_BS[:, P + t] = 1
    h, cache = model.apply(params, x_B1D, pos_3B1, slots_BS, cache=cache, cache_index=P + t, method="decode")
    logits.append(model.apply(params, h, method="unembed"))
  logits_BCV = np.concatenate([np.asarray(l) for l in logits], axis=1)
  ref_BC = np.take_along_axis(jax.nn.log_softmax(logits_BCV, -1), comp_BC[..., None], -1)[..., 0]

  batch = batching.rows_batch(
      model,
      ids_BP,
      mask_BP,
      comp_BC,
      np.ones_like(comp_BC),
      inp["pixel_values"],
      inp["image_grid_thw"],
      images_per_row=[1, 1],
  )
  got_BC, _ = jax.jit(functools.partial(packed.row_logprobs, model, targets_from=P))(params, batch)
  np.testing.assert_allclose(np.asarray(got_BC), ref_BC, atol=2e-5)
