"""SFT micro-batching (train/sft.py, sft.micro_batches): k micro-batches give the one-batch step's loss, gradient
norm and updated params to float tolerance, and the loss is the masked mean NLL that models.token_logprobs (the
unpacked path, itself checked against transformers) gives."""

import jax
import numpy as np
import optax
import pytest

from ekipl_jax import models
from ekipl_jax.train import batching, sft
from ekipl_jax.train_state import init_state
from tests import hf_fixtures


@pytest.mark.slow  # two SFT step compilations (about 1-2 min on 2 shared cores)
def test_micro_batches_equal_one_batch():
  k = 4
  cfg = hf_fixtures.tiny_config_dict("qwen2_vl")
  model, params = models.init(cfg, jax.random.key(0))
  # Four rows with different images and completion masks, so the micro-batches hold different token counts.
  rows = [[3, (4, 4), 5], [2, (2, 2), 7], [(4, 2), 6], [4, (2, 4), 4]]
  inp = hf_fixtures.make_inputs(cfg, rows, seed=3)
  ids_RT, mask_RT = inp["input_ids"], inp["attention_mask"]
  C = 4
  P = ids_RT.shape[1] - C
  loss_mask_RC = np.ones((4, C), np.int32)
  loss_mask_RC[1, 2:] = 0  # row 1: 2 target tokens; row 3: 1
  loss_mask_RC[3, 1:] = 0
  batch = batching.rows_batch(
      model,
      ids_RT[:, :P],
      mask_RT[:, :P],
      ids_RT[:, P:],
      loss_mask_RC,
      inp["pixel_values"],
      inp["image_grid_thw"],
      images_per_row=[1, 1, 1, 1],
  )
  opt = optax.sgd(1.0)  # the update is the gradient itself, so params compare the gradients
  results = []
  for micro in (1, k):
    step = sft.make_sft_step(model, opt, chunk_size=2, micro_batches=micro)
    state = init_state(jax.tree.map(lambda x: x.copy(), params), opt)
    state, metrics = step(state, batch, P)
    results.append((state.params, {key: float(v) for key, v in metrics.items()}))
  (p1, m1), (pk, mk) = results

  logp_RC, _ = models.token_logprobs(
      model, params, ids_RT, mask_RT, inp["pixel_values"], inp["image_grid_thw"], targets_from=P
  )
  want = -float(np.sum(np.asarray(logp_RC) * loss_mask_RC) / loss_mask_RC.sum())
  assert m1["loss"] == pytest.approx(want, rel=1e-5)
  assert mk["loss"] == pytest.approx(want, rel=1e-5)
  assert mk["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-5)
  assert m1["grad_norm"] > 0 and mk["tokens"] == m1["tokens"] == loss_mask_RC.sum()
  for a, b, p0 in zip(jax.tree.leaves(p1), jax.tree.leaves(pk), jax.tree.leaves(params)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6, rtol=1e-5)
  moved = sum(
      float(np.abs(np.asarray(a) - np.asarray(p0)).sum()) for a, p0 in zip(jax.tree.leaves(p1), jax.tree.leaves(params))
  )
  assert moved > 0


def test_micro_batches_must_divide_rows():
  from configs import base
  from ekipl_jax.train import validate

  c = base.get_config()
  c.stage, c.sft.batch_size, c.sft.micro_batches = "sft", 6, 4
  with pytest.raises(ValueError, match="config key sft.micro_batches: 4 does not divide"):
    validate.config(c)
