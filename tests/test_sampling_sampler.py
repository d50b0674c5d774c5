"""The sampler against transformers (greedy, token for token) and against a fresh forward pass (log-probs)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_fixtures as F
from ekipl_jax.models.hf_checkpoint import load_pretrained
from ekipl_jax.models.model import rope_index
from ekipl_jax.sampling import generate

NEVER = F.VOCAB + 7  # an EOS id no model can sample
C = 10
TEXT_ROWS = [[5], [9], [2]]
IMAGE_ROWS = [[3, (4, 4), 6], [1, (4, 8), 2], [7]]  # an image row, another image size, a text-only row


@pytest.fixture(scope="module", params=F.FAMILIES)
def family_model(request, tmp_path_factory):
  path = F.tiny_hf_model(request.param, tmp_path_factory.mktemp(request.param))
  model, params = load_pretrained(path)
  return path, model, params


def _gen(model, params, inp, **kw):
  kw = dict(dict(max_new_tokens=C, temperature=0.0, eos_token_ids=[NEVER], rng=jax.random.key(0)), **kw)
  return generate(
      model, params, inp["input_ids"], inp["attention_mask"], inp.get("pixel_values"), inp.get("image_grid_thw"), **kw
  )


@pytest.mark.parametrize("images", [False, True], ids=["text", "images"])
def test_greedy_equals_transformers(family_model, images):
  import torch

  path, model, params = family_model
  inp = F.make_inputs(path, IMAGE_ROWS if images else TEXT_ROWS, seed=1)
  free = np.asarray(_gen(model, params, inp).tokens)
  eos = int(free[1, 4])  # a token row 1 samples mid-way: rows stop at different steps
  out = _gen(model, params, inp, eos_token_ids=[eos, NEVER])
  hf = F.load_hf(path)
  with torch.no_grad():
    ref = hf.generate(
        **{k: torch.from_numpy(v) for k, v in inp.items()},
        max_new_tokens=C,
        do_sample=False,
        eos_token_id=[eos],
        pad_token_id=0,
    )[:, inp["input_ids"].shape[1] :].numpy()
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  np.testing.assert_array_equal(tokens[:, : ref.shape[1]], ref)
  assert (tokens[:, ref.shape[1] :] == 0).all()
  for row, n in zip(tokens, lengths):
    hits = np.flatnonzero(row == eos)
    assert n == (hits[0] + 1 if hits.size else C)
    assert (row[n:] == 0).all()
  assert lengths[1] <= 5


def _forward(model, params, ids, mask, P, pixel_values, grid):
  """Logits of prompt + completion through embed / decode / unembed. The tiny random policy may sample the image
  pad token: in a completion it is an ordinary token (as in the sampler and transformers), so embed it as text."""
  img = model.config.image_token_id
  sampled_img = (ids == img) & (np.arange(ids.shape[1]) >= P)[None]
  x, pos, _ = model.apply(params, np.where(sampled_img, 0, ids), mask, pixel_values, grid, method="embed")
  e_img, _, _ = model.apply(params, np.full((1, 1), img), positions=np.zeros((3, 1, 1), np.int32), method="embed")
  x = jnp.where(sampled_img[..., None], e_img[0, 0], x)
  h, _ = model.apply(params, x, pos, mask, method="decode")
  return model.apply(params, h, method="unembed")


def test_logprobs_equal_a_fresh_forward_pass(family_model):
  path, model, params = family_model
  inp = F.make_inputs(path, IMAGE_ROWS, seed=2)
  # one setting per family (test time): plain sampling, and temperature + top-k truncation
  for T, top_k in [(1.0, 0)] if model.config.model_type == "qwen2_vl" else [(0.7, 20)]:
    out = _gen(model, params, inp, temperature=T, top_k=top_k, rng=jax.random.key(5), num_samples=2)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    B, P = inp["input_ids"].shape
    ids = np.concatenate([np.repeat(inp["input_ids"], 2, 0), tokens], 1)
    mask = np.concatenate([np.repeat(inp["attention_mask"], 2, 0), np.arange(C)[None] < lengths[:, None]], 1)
    grid = inp["image_grid_thw"]
    # images in row order after repeating each prompt twice: row0 img0, row0 img0, row1 img1, row1 img1
    pv_rows = [inp["pixel_values"][:16], inp["pixel_values"][:16], inp["pixel_values"][16:], inp["pixel_values"][16:]]
    logits = _forward(model, params, ids, mask, P, np.concatenate(pv_rows), grid[[0, 0, 1, 1]])
    logp_ref = jax.nn.log_softmax(jnp.asarray(logits)[:, P - 1 : -1] / T, -1)
    logp_ref = np.take_along_axis(np.asarray(logp_ref), tokens[..., None], -1)[..., 0]
    valid = mask[:, P:].astype(bool)
    np.testing.assert_allclose(np.asarray(out.policy_logprobs)[valid], logp_ref[valid], atol=1e-4)
    if top_k == 0:  # no truncation: the sampled distribution is the tempered policy
      np.testing.assert_allclose(np.asarray(out.logprobs)[valid], logp_ref[valid], atol=1e-4)
    else:  # truncation renormalises: the sampled distribution gives each kept token more mass
      assert (np.asarray(out.logprobs)[valid] >= logp_ref[valid] - 1e-5).all()
    assert (np.asarray(out.logprobs)[~valid] == 0).all()


def test_num_samples_rows_and_bucketing(family_model):
  path, model, params = family_model
  inp = F.make_inputs(path, TEXT_ROWS, seed=3)
  one = np.asarray(_gen(model, params, inp).tokens)
  rep = np.asarray(_gen(model, params, inp, num_samples=3).tokens)
  np.testing.assert_array_equal(rep, np.repeat(one, 3, 0))  # greedy: prompt-major copies
  # extra left padding (another bucket) changes nothing
  padded = {k: np.pad(v, ((0, 0), (20, 0))) for k, v in inp.items()}
  np.testing.assert_array_equal(np.asarray(_gen(model, params, padded).tokens), one)
  sampled = np.asarray(_gen(model, params, inp, temperature=1.0, num_samples=3, rng=jax.random.key(1)).tokens)
  assert len({tuple(r) for r in sampled}) > 3  # samples of one prompt differ


def test_rope_positions_continue_after_images(family_model):
  """The first decode position equals the one transformers' get_rope_index continues with (max + 1)."""
  path, model, _ = family_model
  inp = F.make_inputs(path, IMAGE_ROWS, seed=4)
  pos, deltas = rope_index(model.config, inp["input_ids"], inp["attention_mask"], inp["image_grid_thw"])
  first = inp["attention_mask"].sum(1) + np.asarray(deltas)
  np.testing.assert_array_equal(first, np.asarray(pos).max(axis=(0, 2)) + 1)
