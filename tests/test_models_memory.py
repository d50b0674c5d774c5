"""The policy's memory layout (what lets the paper configs fit TPU slices): the vision tower runs per row, so its
attention never spans the batch, and still equals transformers' tower per image; the tower's parameters shard under
FSDP like the decoder's; the reference policy's frozen copy is sharded like the policy, holds its matrices in the
compute dtype and gives bit-identical log-probs."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as PS

from ekipl_jax import models, sharding
from ekipl_jax.models import packed
from ekipl_jax.rl import update
from ekipl_jax.train import batching
from tests import hf_fixtures as F

torch = pytest.importorskip("torch")

# Row 0: one 4x6-patch image; row 1: two images (2x2, 4x4); row 2: one 6x4 image; row 3: one 2x4 image.
ROWS = [[2, (4, 6), 3], [2, (2, 2), 1, (4, 4), 2], [(6, 4), 2], [3, (2, 4), 4]]
IMAGES_PER_ROW = [1, 2, 1, 1]
C = 3  # completion tokens (the last C of each row)


@functools.lru_cache(maxsize=None)
def _folder(family: str, root: str) -> str:
  return F.tiny_hf_model(family, root, seed=7)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("memory"))
  return {f: _folder(f, root) for f in F.FAMILIES}


def _rows(model, inp, patch_buckets=(64,)):
  ids, mask = inp["input_ids"], inp["attention_mask"]
  P = ids.shape[1] - C
  batch = batching.rows_batch(
      model,
      ids[:, :P],
      mask[:, :P],
      ids[:, P:],
      mask[:, P:],
      inp["pixel_values"],
      inp["image_grid_thw"],
      IMAGES_PER_ROW,
      patch_buckets,
  )
  return batch, P


def _dot_shapes(jaxpr) -> list[tuple[int, ...]]:
  """Output shapes of every dot_general in a jaxpr, sub-jaxprs (scan, map, remat, pjit) included."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      out += [tuple(v.aval.shape) for v in eqn.outvars]
    for p in eqn.params.values():
      for sub in p if isinstance(p, (tuple, list)) else [p]:
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          out += _dot_shapes(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          out += _dot_shapes(sub)
  return out


@pytest.mark.parametrize("family", F.FAMILIES)
def test_per_row_tower_equals_transformers_per_image(family, folders):
  model, params = models.load_pretrained(folders[family])
  inp = F.make_inputs(folders[family], ROWS, seed=8)
  batch, _ = _rows(model, inp)
  R, Np = batch["pixels_RNF"].shape[:2]
  feats_RMD = np.asarray(jax.jit(functools.partial(packed.vision_rows, model))(params, batch))
  visual = F.load_hf(folders[family]).model.visual
  grid = inp["image_grid_thw"]
  patches_I = grid.prod(-1)
  starts = np.concatenate([[0], np.cumsum(patches_I)])
  image = 0
  for r, n_images in enumerate(IMAGES_PER_ROW):
    i0, i1 = image, image + n_images
    px = inp["pixel_values"][starts[i0] : starts[i1]]
    with torch.no_grad():
      want = visual(torch.from_numpy(px), grid_thw=torch.from_numpy(grid[i0:i1])).pooler_output.numpy()
    np.testing.assert_allclose(feats_RMD[r, : want.shape[0]], want, atol=2e-5, rtol=0)
    image = i1
  # Attention (and every matmul) of the tower works within one row: no product spans the R * Np patches of the batch.
  jaxpr = jax.make_jaxpr(functools.partial(packed.vision_rows, model))(params, batch).jaxpr
  shapes = _dot_shapes(jaxpr)
  assert shapes and all(R * Np not in s for s in shapes), sorted(set(shapes))
  assert any(s[-1] == Np and s[0] == R for s in shapes)  # the per-row attention logits [R, H, chunk, Np]


def test_vision_params_are_sharded_on_a_mesh(folders):
  mesh = sharding.make_mesh((2, 2, 2))
  _, params = models.load_pretrained(folders["qwen2_vl"], mesh=mesh)
  v = params["params"]["visual"]
  qkv = v["blocks_0"]["attn"]["qkv"]["kernel"]  # [32, 96]: (vision_embed, vision_heads)
  assert qkv.sharding.spec == PS("fsdp", "tensor")
  assert qkv.addressable_shards[0].data.shape == (16, 48)
  assert v["blocks_0"]["mlp"]["fc2"]["kernel"].sharding.spec == PS("tensor", "fsdp")  # (vision_mlp, vision_embed)
  assert v["patch_embed"]["proj"]["kernel"].sharding.spec == PS(None, "fsdp")
  assert v["merger"]["mlp_2"]["kernel"].sharding.spec == PS("tensor", "fsdp")  # (vision_mlp, embed)
  assert v["blocks_0"]["norm1"]["scale"].sharding.spec == PS("fsdp")
  kernels = [x for p, x in jax.tree_util.tree_leaves_with_path(v) if p[-1].key == "kernel"]
  assert all(any(ax is not None for ax in k.sharding.spec) for k in kernels)


def test_row_logprobs_on_8_devices_equal_one_device(folders):
  path = folders["qwen2_5_vl"]
  inp = F.make_inputs(path, ROWS, seed=9)
  model1, params1 = models.load_pretrained(path)
  batch, P = _rows(model1, inp)
  want, _ = jax.jit(functools.partial(packed.row_logprobs, model1, targets_from=P))(params1, batch)
  mesh = sharding.make_mesh((2, 2, 2))
  model8, params8 = models.load_pretrained(path, mesh=mesh)
  batch8 = update.shard_batch(batch, mesh)
  assert batch8["pixels_RNF"].sharding.spec[0] == ("data", "fsdp")  # 4 rows over the 4 batch shards
  got, _ = jax.jit(functools.partial(packed.row_logprobs, model8, targets_from=P))(params8, batch8)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


@pytest.mark.parametrize("family", F.FAMILIES)
def test_frozen_copy_is_sharded_half_size_and_bit_identical(family, folders):
  mesh = sharding.make_mesh((1, 8, 1))
  model, params = models.load_pretrained(folders[family], mesh=mesh, compute_dtype=jnp.bfloat16)
  ref = models.frozen_copy(params, jnp.bfloat16)
  leaves, ref_leaves = jax.tree.leaves(params), jax.tree.leaves(ref)
  for x, y in zip(leaves, ref_leaves):
    assert y.sharding == x.sharding and y.shape == x.shape
    assert y.dtype == (jnp.bfloat16 if x.ndim >= 2 else x.dtype)
  nbytes = lambda t: sum(x.nbytes for x in jax.tree.leaves(t))
  assert nbytes(ref) < 0.51 * nbytes(params)
  inp = F.make_inputs(folders[family], ROWS, seed=10)
  batch, P = _rows(model, inp)
  batch = update.shard_batch(batch, mesh)
  fn = jax.jit(functools.partial(packed.row_logprobs, model, targets_from=P))
  want, _ = fn(params, batch)
  jax.jit(lambda p: jax.tree.map(lambda x: x * 2, p), donate_argnums=0)(params)  # the policy's buffers are donated
  got, _ = fn(ref, batch)  # the copy is still alive and gives the policy's exact log-probs
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
