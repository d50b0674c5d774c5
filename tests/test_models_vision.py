"""Vision tower vs transformers' `model.model.visual` (both families), image isolation, bucket padding, bf16.

Legend: N patches, M merged tokens, K patch vector length, O LLM width.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ekipl_jax.models import hf_checkpoint, vision


@pytest.fixture(autouse=True)
def _strict_ranks():
  with jax.numpy_rank_promotion("raise"):
    yield


torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

FAMILIES = ("qwen2_vl", "qwen2_5_vl")
# one image; several sizes (3x5 merged units: window 2 does not divide it); a 2-frame clip
GRIDS = {"one": [[1, 4, 6]], "several": [[1, 4, 6], [1, 6, 10], [1, 2, 2]], "frames": [[2, 6, 4], [1, 8, 8]]}


def tiny_vision_config(family: str) -> dict:
  if family == "qwen2_vl":
    return dict(depth=3, embed_dim=32, hidden_size=48, num_heads=2, mlp_ratio=2, in_channels=3)
  return dict(
      depth=3,
      hidden_size=32,
      out_hidden_size=48,
      intermediate_size=40,
      num_heads=2,
      in_channels=3,
      window_size=56,
      fullatt_block_indexes=[1],
      tokens_per_second=2,
  )


@functools.lru_cache(maxsize=None)
def hf_visual(family: str):
  """transformers' vision tower of a tiny model, every weight perturbed, float32, eager attention."""
  text = dict(
      vocab_size=64,
      hidden_size=48,
      intermediate_size=64,
      num_hidden_layers=1,
      num_attention_heads=2,
      num_key_value_heads=1,
      rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 2]},
  )
  cls_cfg, cls = (
      (transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration)
      if family == "qwen2_vl"
      else (transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration)
  )
  config = cls_cfg(text_config=text, vision_config=tiny_vision_config(family))
  config._attn_implementation = "eager"
  torch.manual_seed(0)
  model = cls(config).to(torch.float32).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model.model.visual


def jax_tower(family: str, **kw):
  visual = hf_visual(family)
  cfg = vision.VisionConfig.from_hf(visual.config.to_dict(), family)
  sd = {k: v.detach().numpy() for k, v in visual.state_dict().items()}
  return vision.VisionTower(cfg, **kw), {"params": hf_checkpoint.vision_params_from_state_dict(sd)}


def pixels(grid, seed: int = 0) -> np.ndarray:
  n = int(np.prod(np.asarray(grid), axis=-1).sum())
  return np.random.default_rng(seed).normal(size=(n, 3 * 2 * 14 * 14)).astype(np.float32)


def hf_features(family: str, pixel_values: np.ndarray, grid) -> np.ndarray:
  with torch.no_grad():
    out = hf_visual(family)(torch.from_numpy(pixel_values), grid_thw=torch.tensor(grid))
  return out.pooler_output.numpy()


@pytest.mark.parametrize("family", FAMILIES)
def test_config_roundtrip(family):
  hf = tiny_vision_config(family)
  cfg = vision.VisionConfig.from_hf(hf, family)
  assert vision.VisionConfig.from_hf(cfg.to_hf(), family) == cfg
  assert cfg.out_hidden_size == 48 and cfg.embed_dim == 32
  assert vision.VisionConfig.from_hf({**hf, "in_chans": 3}, family).in_channels == 3


@pytest.mark.parametrize("family", FAMILIES)
def test_param_names_roundtrip(family):
  tower, params = jax_tower(family)
  sd = {k: v.detach().numpy() for k, v in hf_visual(family).state_dict().items()}
  init = nn.unbox(tower.init(jax.random.PRNGKey(0), pixels(GRIDS["one"]), np.asarray(GRIDS["one"])))
  shapes = lambda t: jax.tree_util.tree_map(np.shape, t)
  assert shapes(init) == shapes(params)
  back = hf_checkpoint.vision_state_dict_from_params(params["params"], tower.config)
  assert sorted(back) == sorted("model.visual." + k for k in sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(back["model.visual." + k], v)
  assert hf_checkpoint.vision_hf_to_flax_name("model.visual.blocks.3.attn.qkv.weight")[0] == (
      "blocks_3",
      "attn",
      "qkv",
      "kernel",
  )


@pytest.mark.parametrize("case", list(GRIDS))
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_transformers(family, case):
  grid = GRIDS[case]
  tower, params = jax_tower(family)
  x = pixels(grid)
  got = np.asarray(tower.apply(params, x, np.asarray(grid)))
  want = hf_features(family, x, grid)
  assert got.shape == want.shape == (vision.num_merged(grid, tower.config), 48)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_images_do_not_see_each_other(family):
  grid = GRIDS["several"]
  tower, params = jax_tower(family)
  meta = vision.vision_metadata(grid, tower.config)
  fn = jax.jit(lambda p, x, m: tower.apply(p, x, metadata=m))
  x = pixels(grid)
  n0, m0 = 4 * 6, 4 * 6 // 4
  y = x.copy()
  y[n0 : n0 + 60] += 1.0  # image 2 only
  a, b = np.asarray(fn(params, x, meta)), np.asarray(fn(params, y, meta))
  np.testing.assert_array_equal(a[:m0], b[:m0])
  np.testing.assert_array_equal(a[m0 + 15 :], b[m0 + 15 :])  # image 3 too
  assert np.abs(a[m0 : m0 + 15] - b[m0 : m0 + 15]).max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_bucket_matches_unpadded(family):
  tower, params = jax_tower(family)
  fn = jax.jit(lambda p, x, m: tower.apply(p, x, metadata=m))
  bucket = 256
  for grid in (GRIDS["one"], GRIDS["several"]):
    x, m = pixels(grid), vision.num_merged(grid, tower.config)
    want = np.asarray(fn(params, x, vision.vision_metadata(grid, tower.config)))
    meta = vision.vision_metadata(grid, tower.config, pad_to=bucket)
    got = np.asarray(fn(params, vision.pad_patches(x, bucket), meta))
    assert got.shape == (bucket // 4, 48)
    np.testing.assert_allclose(got[:m], want, atol=1e-5, rtol=0)
  assert fn._cache_size() == 3  # two unpadded shapes, one bucket shared by both


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_close_to_f32(family):
  grid = GRIDS["several"]
  tower, params = jax_tower(family)
  tower16, _ = jax_tower(family, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, remat=True, attn_chunk=32)
  params16 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.bfloat16), params)
  x = pixels(grid)
  want = np.asarray(tower.apply(params, x, np.asarray(grid)))
  got = np.asarray(tower16.apply(params16, x, np.asarray(grid))).astype(np.float32)
  assert got.dtype == np.float32 and np.isfinite(got).all()
  rel = np.abs(got - want).max() / np.abs(want).max()
  assert rel < 2e-2, rel


def test_attention_chunks_and_remat_grad():
  grid = GRIDS["several"]
  tower, params = jax_tower("qwen2_5_vl")
  chunked, _ = jax_tower("qwen2_5_vl", remat=True, attn_chunk=16, max_frame_patches=60)
  x = pixels(grid)
  meta = vision.vision_metadata(grid, tower.config)
  np.testing.assert_allclose(chunked.apply(params, x, metadata=meta), tower.apply(params, x, metadata=meta), atol=1e-5)
  loss = lambda t: lambda p: jnp.sum(t.apply(p, x, metadata=meta) ** 2)
  g1, g2 = jax.grad(loss(tower))(params), jax.grad(loss(chunked))(params)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), g1, g2)


@pytest.mark.parametrize("chunk,span", [(8, None), (8, 7), (16, 5), (5, 3)])
def test_banded_segment_attention_is_exact(chunk, span):
  rng = np.random.default_rng(1)
  lengths = [1, 3, 7, 2, 5, 7, 4] if span == 7 else [1, 3, 2, 5, 1, 4, 3, 2]
  lengths = [min(x, span or 99) for x in lengths]
  seg_N = np.repeat(np.arange(len(lengths)), lengths).astype(np.int32)
  q, k, v = (rng.normal(size=(len(seg_N), 2, 4)).astype(np.float32) for _ in range(3))
  want = vision.segment_attention(q, k, v, seg_N)
  got = vision.segment_attention(q, k, v, seg_N, chunk=chunk, span=span)
  np.testing.assert_allclose(got, want, atol=1e-6)
  logits = np.einsum("nhd,mhd->hnm", q, k) / 2.0  # dense numpy reference
  logits = np.where(seg_N[None, :, None] == seg_N[None, None, :], logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  np.testing.assert_allclose(want, np.einsum("hnm,mhd->nhd", p / p.sum(-1, keepdims=True), v), atol=1e-5)
