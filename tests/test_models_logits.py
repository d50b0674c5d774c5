"""Policy logits vs transformers (both families): text only, one image, several images of different sizes, a
left-padded batch; M-RoPE positions vs transformers' get_rope_index (host numpy and in-graph); error paths of embed.

Legend: B batch, T tokens, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_fixtures as F
from ekipl_jax import models

torch = pytest.importorskip("torch")

CASES = {
    "text": [[11]],
    "one_image": [[3, (4, 4), 5]],
    "several_images": [[2, (4, 6), 3, (2, 2), 1, (6, 4), 2]],
    "left_padded": [[3, (4, 4), 5], [2, (4, 6), 2, (2, 2), 1], [6]],
    "left_padded_text": [[4], [9], [1]],
}


@pytest.fixture(scope="module", params=F.FAMILIES)
def pair(request, tmp_path_factory):
  path = F.tiny_hf_model(request.param, tmp_path_factory.mktemp(request.param))
  model, params = models.load_pretrained(path)
  return path, F.load_hf(path), model, params


def apply(model, params, inputs, **kw):
  return np.asarray(
      model.apply(
          params,
          inputs["input_ids"],
          inputs["attention_mask"],
          inputs.get("pixel_values"),
          inputs.get("image_grid_thw"),
          inputs["mm_token_type_ids"],
          **kw,
      )
  )


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(pair, case):
  path, hf, model, params = pair
  inputs = F.make_inputs(path, CASES[case], seed=1)
  ref_BTV, got_BTV = F.hf_logits(hf, inputs), apply(model, params, inputs)
  valid = inputs["attention_mask"].astype(bool)
  assert np.abs(ref_BTV - got_BTV)[valid].max() <= 1e-4
  assert np.abs(ref_BTV).max() > 1e-2  # the comparison is not trivially between zeros


def test_jit_with_precomputed_positions_matches(pair):
  path, hf, model, params = pair
  inputs = F.make_inputs(path, CASES["left_padded_text"], seed=2)
  pos_3BT, _ = models.rope_index(model.config, inputs["input_ids"], inputs["attention_mask"])
  f = jax.jit(lambda p, ids, m, pos: model.apply(p, ids, m, positions=pos))
  got = np.asarray(f(params, inputs["input_ids"], inputs["attention_mask"], pos_3BT))
  valid = inputs["attention_mask"].astype(bool)
  assert np.abs(F.hf_logits(hf, inputs) - got)[valid].max() <= 1e-4
  # traced ids without positions: text positions are computed in-graph, same result
  g = jax.jit(lambda p, ids, m: model.apply(p, ids, m))
  np.testing.assert_allclose(np.asarray(g(params, inputs["input_ids"], inputs["attention_mask"])), got, atol=1e-5)


@pytest.mark.parametrize("case", ["one_image", "several_images", "left_padded", "left_padded_text"])
def test_rope_index_matches_transformers(pair, case):
  path, hf, model, _ = pair
  inputs = F.make_inputs(path, CASES[case], seed=3)
  t = {k: torch.from_numpy(v) for k, v in inputs.items() if k != "pixel_values"}
  if "image_grid_thw" not in t:
    t["image_grid_thw"] = torch.zeros((0, 3), dtype=torch.int64)
  ref_pos, ref_delta = hf.model.get_rope_index(
      t["input_ids"], t["mm_token_type_ids"], t["image_grid_thw"], attention_mask=t["attention_mask"]
  )
  grid = inputs.get("image_grid_thw")
  pos, delta = models.rope_index(
      model.config, inputs["input_ids"], inputs["attention_mask"], grid, inputs["mm_token_type_ids"]
  )
  assert isinstance(pos, np.ndarray)
  np.testing.assert_array_equal(pos, ref_pos.numpy())
  np.testing.assert_array_equal(delta, ref_delta.numpy()[:, 0])
  jpos, jdelta = jax.jit(lambda *a: models.rope_index(model.config, *a))(
      inputs["input_ids"], inputs["attention_mask"], grid, inputs["mm_token_type_ids"]
  )
  np.testing.assert_array_equal(np.asarray(jpos), pos)
  np.testing.assert_array_equal(np.asarray(jdelta), delta)


def test_processor_dict_as_keywords(pair):
  path, _, model, params = pair
  inputs = F.make_inputs(path, CASES["left_padded"], seed=4)
  np.testing.assert_array_equal(np.asarray(model.apply(params, **inputs)), apply(model, params, inputs))
  as_jax = {k: jnp.asarray(v) for k, v in inputs.items()}
  np.testing.assert_allclose(np.asarray(model.apply(params, **as_jax)), apply(model, params, inputs), atol=1e-6)


def test_mm_token_type_ids_optional(pair):
  path, _, model, params = pair
  inputs = F.make_inputs(path, CASES["left_padded"], seed=4)
  with_ids = apply(model, params, inputs)
  without = np.asarray(
      model.apply(
          params, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], inputs["image_grid_thw"]
      )
  )
  np.testing.assert_array_equal(with_ids, without)


def test_pad_token_count_mismatch_raises(pair):
  path, _, model, params = pair
  inputs = F.make_inputs(path, CASES["one_image"], seed=5)
  ids = inputs["input_ids"].copy()
  ids[0, np.flatnonzero(ids[0] == F.IMAGE_TOKEN_ID)[0]] = 5  # one pad token fewer than features
  with pytest.raises(ValueError, match="image pad tokens"):
    model.apply(params, ids, inputs["attention_mask"], inputs["pixel_values"], inputs["image_grid_thw"])


def test_tied_embeddings(tmp_path):
  path = F.tiny_hf_model("qwen2_vl", tmp_path, seed=3, tie_word_embeddings=True)
  model, params = models.load_pretrained(path)
  assert "lm_head" not in params["params"]
  inputs = F.make_inputs(path, CASES["left_padded"], seed=6)
  valid = inputs["attention_mask"].astype(bool)
  assert np.abs(F.hf_logits(F.load_hf(path), inputs) - apply(model, params, inputs))[valid].max() <= 1e-4
