"""bfloat16 (params and/or compute) against float32, per-layer remat (same logits and grads), models.init."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_fixtures as F
from ekipl_jax import models

ROWS = [[3, (4, 4), 5], [2, (2, 4), 4]]


@pytest.fixture(scope="module", params=F.FAMILIES)
def path(request, tmp_path_factory):
  return F.tiny_hf_model(request.param, tmp_path_factory.mktemp(request.param), seed=41)


@pytest.fixture(scope="module")
def f32(path):
  return models.load_pretrained(path)


def run(model, params, inputs):
  return np.asarray(
      model.apply(
          params, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], inputs["image_grid_thw"]
      ).astype(jnp.float32)
  )


@pytest.mark.parametrize("dtype,compute", [(jnp.bfloat16, None), (jnp.float32, jnp.bfloat16)])
def test_bfloat16_error_is_bounded(path, f32, dtype, compute):
  inputs = F.make_inputs(path, ROWS, seed=1)
  ref = run(*f32, inputs)
  model, params = models.load_pretrained(path, dtype=dtype, compute_dtype=compute)
  out = model.apply(
      params, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], inputs["image_grid_thw"]
  )
  assert out.dtype == jnp.bfloat16
  err = np.abs(np.asarray(out.astype(jnp.float32)) - ref)[inputs["attention_mask"].astype(bool)]
  scale = np.abs(ref).max()
  assert err.max() <= 0.05 * scale, (err.max(), scale)
  assert err.mean() <= 0.01 * scale
  assert err.max() > 0  # bf16 really ran


def test_remat_same_logits_and_grads(path, f32):
  inputs = F.make_inputs(path, ROWS, seed=2)
  m0, params = f32
  m1 = m0.clone(remat=True)
  ids, mask = inputs["input_ids"], inputs["attention_mask"]
  loss = lambda m: (
      lambda p: models.token_logprobs(
          m, p, ids, mask, inputs["pixel_values"], inputs["image_grid_thw"], targets_from=ids.shape[1] - 4
      )[0].sum()
  )
  v0, g0 = jax.value_and_grad(loss(m0))(params)
  v1, g1 = jax.value_and_grad(loss(m1))(params)
  np.testing.assert_allclose(v1, v0, rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6)


def test_init_matches_hf_parameter_count_and_runs(path):
  import json
  import os

  hf_cfg = json.load(open(os.path.join(path, "config.json")))
  model, params = models.init(hf_cfg, jax.random.PRNGKey(0), dtype=jnp.bfloat16)
  n_ours = sum(x.size for x in jax.tree_util.tree_leaves(params))
  n_hf = sum(p.numel() for p in F.load_hf(path).parameters())
  assert n_ours == n_hf
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(params))
  inputs = F.make_inputs(path, ROWS, seed=3)
  out = run(model, params, inputs)
  assert out.shape == (2, inputs["input_ids"].shape[1], F.VOCAB) and np.isfinite(out).all()
  text_only, p2 = models.init(hf_cfg, jax.random.PRNGKey(0), with_vision=False)
  assert "visual" not in p2["params"]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("dims", [(((2,), (1,)), ((), ())), (((2,), (0,)), ((), ()))])  # tied [V, D] | lm_head [D, V]
def test_dot_lean_grads_same_gradients_as_autodiff(dtype, dims):
  """decoder.dot_f32_lean_grads (the unembedding's matmul) gives the gradients autodiff of dot_f32 gives, when the
  output is rounded to the operands' dtype as QwenVL.unembed does; only the float32 copies are gone."""
  from ekipl_jax.models import decoder  # pylint: disable=g-import-not-at-top

  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  h_BTD = jax.random.normal(k1, (2, 5, 24), jnp.float32)
  w_shape = (40, 24) if dims[0][1] == (1,) else (24, 40)
  w = 0.2 * jax.random.normal(k2, w_shape, jnp.float32)
  c_BTV = jax.random.normal(k3, (2, 5, 40), jnp.float32)

  def loss(dot, h, w):
    out = dot(h.astype(dtype), w.astype(dtype), dims).astype(dtype)
    return jnp.sum(out.astype(jnp.float32) * c_BTV)

  want = jax.grad(lambda h, w: loss(decoder.dot_f32, h, w), argnums=(0, 1))(h_BTD, w)
  got = jax.grad(lambda h, w: loss(decoder.dot_f32_lean_grads, h, w), argnums=(0, 1))(h_BTD, w)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # the reference itself: d/dw of sum(c * h @ w) by hand, float32
  if dtype == jnp.float32:
    hand = jnp.einsum("btd,btv->vd" if w_shape == (40, 24) else "btd,btv->dv", h_BTD, c_BTV)
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(hand), rtol=1e-5, atol=1e-5)
