"""Host-side row layout shared by SFT and RL: prompt (left padded) + completion (right padded) per row, 3D M-RoPE
positions, and each row's own images packed to a patch budget (ekipl_jax/models/packed.py).

Legend: R rows, P prompt tokens, C completion tokens, T = P + C.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ekipl_jax import models
from ekipl_jax.models import packed as packed_lib


def rows_batch(
    model,
    prompt_ids_RP,
    prompt_mask_RP,
    completion_ids_RC,
    completion_mask_RC,
    pixel_values=None,
    image_grid_thw=None,
    images_per_row: Sequence[int] = (),
    patch_buckets: Sequence[int] = (),
) -> dict[str, np.ndarray]:
  """-> input_ids [R, T], attention_mask [R, T], mm_token_type_ids [R, T] (1 at the prompt's image tokens),
  positions [R, 3, T], mask [R, C] (completion tokens), and the
  packed image arrays when there are images. pixel_values / image_grid_thw hold the rows' images in row order."""
  ids_RT = np.concatenate([prompt_ids_RP, completion_ids_RC], 1).astype(np.int32)
  mask_RT = np.concatenate([prompt_mask_RP, completion_mask_RC], 1).astype(np.int32)
  grid = None if pixel_values is None else np.asarray(image_grid_thw).reshape(-1, 3)
  # Image positions are the prompt's image pad tokens only: a completion may sample that token id too, and there
  # it is an ordinary token (as in the sampler), not a slot for vision features.
  mm_RT = np.zeros_like(ids_RT)
  mm_RT[:, : prompt_ids_RP.shape[1]] = (np.asarray(prompt_ids_RP) == model.config.image_token_id) & (
      np.asarray(prompt_mask_RP) == 1
  )
  pos_3RT, _ = models.rope_index(model.config, ids_RT, mask_RT, grid, mm_RT)
  batch = {
      "input_ids": ids_RT,
      "attention_mask": mask_RT,
      "mm_token_type_ids": mm_RT,
      "positions": np.ascontiguousarray(np.swapaxes(np.asarray(pos_3RT, np.int32), 0, 1)),
      "mask": np.asarray(completion_mask_RC, np.int32),
  }
  if pixel_values is not None:
    batch.update(packed_lib.pack_rows(model, pixel_values, grid, images_per_row, patch_buckets))
  return batch
