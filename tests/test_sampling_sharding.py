"""The sampler on a mesh of 8 forced CPU devices (tests/conftest.py) equals the 1-device run; no compilation after
warm-up across prompt lengths in the same buckets."""

import jax
import numpy as np
import pytest

import hf_fixtures as F
from ekipl_jax import sharding
from ekipl_jax.models.hf_checkpoint import load_pretrained
from ekipl_jax.sampling import generate
from ekipl_jax.sampling.sampler import count_compilations

C = 8
KW = dict(max_new_tokens=C, temperature=0.0, eos_token_ids=[F.VOCAB + 1])


@pytest.fixture(scope="module")
def path(tmp_path_factory):
  return F.tiny_hf_model("qwen2_5_vl", tmp_path_factory.mktemp("m"))


def _run(model, params, inp, **kw):
  return generate(
      model,
      params,
      inp["input_ids"],
      inp["attention_mask"],
      inp.get("pixel_values"),
      inp.get("image_grid_thw"),
      **{**KW, "rng": jax.random.key(0), **kw},
  )


def test_mesh_equals_single_device(path):
  assert jax.device_count() == 8
  inp = F.make_inputs(path, [[3, (4, 4), 5], [9], [2, (4, 4), 1], [12]], seed=0)
  model1, params1 = load_pretrained(path)
  ref = _run(model1, params1, inp, num_samples=2)
  mesh = sharding.make_mesh((2, 2, 2))
  model8, params8 = load_pretrained(path, mesh=mesh)
  assert len(params8["params"]["embed_tokens"]["embedding"].sharding.device_set) == 8
  out = _run(model8, params8, inp, num_samples=2)
  assert len(out.tokens.sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
  np.testing.assert_array_equal(np.asarray(out.lengths), np.asarray(ref.lengths))
  np.testing.assert_allclose(np.asarray(out.policy_logprobs), np.asarray(ref.policy_logprobs), atol=1e-4)
  sampled1 = _run(model1, params1, inp, num_samples=2, temperature=1.0, top_k=0, rng=jax.random.key(3))
  sampled8 = _run(model8, params8, inp, num_samples=2, temperature=1.0, top_k=0, rng=jax.random.key(3))
  assert sampled8.tokens.shape == (8, C) and sampled1.tokens.shape == (8, C)


def test_no_compilation_after_warm_up(path):
  model, params = load_pretrained(path)
  img = lambda n_text, seed: F.make_inputs(path, [[n_text, (4, 4), 2], [n_text + 3]], seed=seed)
  txt = lambda n, seed: F.make_inputs(path, [[n], [max(n - 4, 1)]], seed=seed)
  warm = [txt(5, 0), txt(20, 0), img(3, 0)]  # buckets 16 and 32 (text), 16 (one 4x4 image)
  later = [txt(3, 1), txt(14, 2), txt(17, 3), txt(31, 4), img(1, 5), img(7, 6)]
  for inp in warm:
    _run(model, params, inp)
    _run(model, params, inp, temperature=0.9, top_p=0.9, top_k=50)
  with count_compilations() as n:
    for i, inp in enumerate(later):
      out = _run(model, params, inp, rng=jax.random.key(i))
      out = _run(model, params, inp, temperature=0.9, top_p=0.9, top_k=50, rng=jax.random.key(i))
      np.asarray(out.tokens)
  assert n[0] == 0, f"{n[0]} compilations after warm-up"
  with count_compilations() as n:  # the counter does see compilations (a new bucket)
    _run(model, params, txt(40, 7))
  assert n[0] >= 2
