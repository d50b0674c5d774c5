"""Row-packed vision inputs: every row of a training batch carries its own images, padded to one patch budget.

The processor returns the images of a whole batch concatenated (pixel_values [N, F], image_grid_thw [I, 3]), and the
vision metadata (window order, segments) is global over the batch. That layout cannot be split into micro-batches or
sharded over rows. Here each row r gets its images' patches in a fixed budget Np (a bucket), with row-local metadata;
inside jit the tower runs once per row (jax.vmap over R, the row axis sharded like the batch), so attention costs
R * Np^2 (the sum of n_i^2 over images, as transformers' cu_seqlens, when a row holds one image) instead of (R * Np)^2,
and never crosses a row's images (every image and every row's padding is its own segment); row r's merged features
are placed at row r's image pad tokens. Rows may have different image sizes and counts.

Legend: R rows, T tokens, Np patch budget per row, Mp = Np / merge_unit, F patch features, D width, C targets.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ekipl_jax.data import processor as processor_lib
from ekipl_jax import sharding
from ekipl_jax.models import logprobs as logprobs_lib
from ekipl_jax.models import vision as vision_lib
from ekipl_jax.models.model import place_features, vision_config

PACKED_KEYS = ("pixels_RNF", "patch_perm_RN", "pos_hw_RN2", "segment_ids_RN", "window_ids_RN", "unperm_RM")


def pack_rows(
    model,
    pixel_values_NF: np.ndarray,
    image_grid_thw_Ix3: np.ndarray,
    images_per_row: Sequence[int],
    patch_buckets: Sequence[int] = (),
) -> dict[str, np.ndarray]:
  """Host side. images_per_row[r] images (in order) belong to row r. The budget Np is the smallest bucket that holds
  the largest row (or that row's size rounded up to the merge unit when no bucket is given)."""
  vcfg = vision_config(model.config)
  u = vcfg.merge_unit
  grid = np.asarray(image_grid_thw_Ix3, np.int64).reshape(-1, 3)
  patches_I = grid.prod(-1)
  img_start = np.concatenate([[0], np.cumsum(images_per_row)]).astype(int)
  patch_start = np.concatenate([[0], np.cumsum(patches_I)]).astype(int)
  need = max(int(patches_I[img_start[r] : img_start[r + 1]].sum()) for r in range(len(images_per_row)))
  Np = processor_lib.pick_bucket(need, patch_buckets, unit=u)
  rows = {k: [] for k in PACKED_KEYS}
  for r in range(len(images_per_row)):
    i0, i1 = img_start[r], img_start[r + 1]
    meta = vision_lib.vision_metadata(grid[i0:i1], vcfg, pad_to=Np)
    px = np.asarray(pixel_values_NF[patch_start[i0] : patch_start[i1]], np.float32)
    rows["pixels_RNF"].append(vision_lib.pad_patches(px, Np))
    rows["patch_perm_RN"].append(meta.patch_perm_N)
    rows["pos_hw_RN2"].append(meta.pos_hw_N2)
    rows["segment_ids_RN"].append(meta.segment_ids_N)
    rows["window_ids_RN"].append(meta.window_ids_N)
    rows["unperm_RM"].append(meta.unperm_M)
  return {k: np.stack(v) for k, v in rows.items()}


def row_metadata(packed: dict) -> vision_lib.VisionMetadata:
  """The row-local metadata of a packed batch, each field with a leading R axis (what the per-row tower maps over)."""
  return vision_lib.VisionMetadata(
      packed["patch_perm_RN"],
      packed["pos_hw_RN2"],
      packed["segment_ids_RN"],
      packed["window_ids_RN"],
      packed["unperm_RM"],
  )


def vision_rows(model, params, packed: dict):
  """feats_RMD: the vision tower run on each row's own patches (vmap over rows; Mp = Np / merge_unit per row)."""
  tower = lambda m, px_NF, meta: m.visual(px_NF, metadata=meta)
  per_row = lambda px_NF, meta: model.apply(params, px_NF, meta, method=tower)
  constrain = lambda x: sharding.constrain(x, ("batch",) + (None,) * (x.ndim - 1), model.mesh, model.rules)
  feats_RMD = jax.vmap(per_row)(constrain(packed["pixels_RNF"]), row_metadata(packed))
  return constrain(feats_RMD)


def embed_rows(model, params, input_ids_RT, positions_3RT, packed: dict, is_img_RT=None):
  """x_RTD: token embeddings with each row's vision features at its image positions (is_img_RT; default: every
  image pad token)."""
  x_RTD, _, _ = model.apply(params, input_ids_RT, None, None, None, None, positions_3RT, method="embed")
  if packed is None or "pixels_RNF" not in packed:
    return x_RTD
  feats_RMD = vision_rows(model, params, packed).astype(x_RTD.dtype)
  if is_img_RT is None:
    is_img_RT = input_ids_RT == model.config.image_token_id
  return place_features(x_RTD, is_img_RT.astype(bool), feats_RMD)


def row_logprobs(model, params, batch: dict, *, targets_from: int, temperature: float = 1.0, chunk_size: int = 128):
  """logp_RC, entropy_RC of input_ids[:, targets_from:] for a row-packed batch (keys: input_ids [R, T],
  attention_mask [R, T], positions [R, 3, T], optionally mm_token_type_ids [R, T] and the PACKED_KEYS)."""
  ids_RT, mask_RT = batch["input_ids"], batch["attention_mask"]
  positions_3RT = jnp.swapaxes(batch["positions"], 0, 1)
  x_RTD = embed_rows(model, params, ids_RT, positions_3RT, batch, batch.get("mm_token_type_ids"))
  h_RTD, _ = model.apply(params, x_RTD, positions_3RT, mask_RT, method="decode")
  T = ids_RT.shape[1]
  return logprobs_lib.logprobs_from_hidden(
      model,
      params,
      h_RTD[:, targets_from - 1 : T - 1],
      ids_RT[:, targets_from:],
      temperature=temperature,
      chunk_size=chunk_size,
  )
