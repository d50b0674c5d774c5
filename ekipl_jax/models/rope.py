"""Multimodal RoPE: 3D position ids (the semantics of transformers' `get_rope_index`) and the rotary helpers.

Legend: B batch, T tokens, I images, Dh head dim, 3 = (temporal, height, width) position streams.

`mrope_positions` is vectorised and written against an array module `xp`: with numpy it runs host-side on concrete
inputs (what `model.apply` does by default), with jax.numpy it runs inside jit on traced inputs (shapes static).
Semantics (per row, over the tokens with attention_mask = 1, pads get position 0):
  text token: all three streams = p, then p += 1
  image with grid (t, h, w) starting at p: token (i, j, k) of its t x h/s x w/s grid -> (p + i, p + j, p + k),
  then p += max(h, w) / s
rope_deltas_B = max position + 1 - number of valid tokens (decode position of the n-th valid token = n + delta).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def mrope_positions(xp, is_image_BT, attention_mask_BT, image_grid_thw_I3, merge: int):
  """positions_3BT (int32), rope_deltas_B (int32). `is_image_BT`: image pad tokens (mm_token_type_ids == 1)."""
  valid = attention_mask_BT.astype(bool)
  is_img = xp.logical_and(is_image_BT.astype(bool), valid)
  B, T = valid.shape
  ones = xp.ones((B, T), xp.int32)
  zeros = xp.zeros((B, T), xp.int32)
  if image_grid_thw_I3 is None or image_grid_thw_I3.shape[0] == 0:
    off3 = xp.stack([zeros, zeros, zeros])
    advance = xp.where(valid, ones, zeros)
  else:
    grid = image_grid_thw_I3.astype(xp.int32)
    gt, gh, gw = grid[:, 0], grid[:, 1] // merge, grid[:, 2] // merge
    n_img = gt * gh * gw
    ends = xp.cumsum(n_img)
    flat = is_img.reshape(-1).astype(xp.int32)
    rank = xp.cumsum(flat) - flat  # index of each image token among all image tokens (row-major)
    idx = xp.clip(xp.searchsorted(ends, rank, side="right"), 0, grid.shape[0] - 1)
    j = rank - (ends - n_img)[idx]
    h, w = gh[idx], gw[idx]
    off3 = xp.stack([j // (h * w), (j // w) % h, j % w]).reshape(3, B, T)
    off3 = xp.where(is_img[None], off3, 0)
    is_last = (j == n_img[idx] - 1).reshape(B, T)
    span = xp.maximum(h, w).reshape(B, T)
    advance = xp.where(valid, xp.where(is_img, xp.where(is_last, span, zeros), ones), zeros)
  start_BT = xp.cumsum(advance, axis=1) - advance  # position where the current text token / image starts
  pos_3BT = xp.where(valid[None], start_BT[None] + off3, 0).astype(xp.int32)
  deltas_B = (pos_3BT.max(axis=(0, 2)) + 1 - valid.sum(axis=1)).astype(xp.int32)
  return pos_3BT, deltas_B


def inv_freq(head_dim: int, theta: float) -> np.ndarray:
  return 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))


def mrope_cos_sin(positions_3BT, head_dim: int, theta: float, mrope_section: tuple[int, ...], dtype):
  """cos_BTDh, sin_BTDh: half-dim chunk i of the rotary frequencies takes position stream i % 3."""
  freqs_3BTd = positions_3BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq(head_dim, theta))
  bounds = np.cumsum((0,) + tuple(mrope_section))
  freqs_BTd = jnp.concatenate(
      [freqs_3BTd[i % 3, :, :, a:b] for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))], axis=-1
  )
  emb_BTDh = jnp.concatenate([freqs_BTd, freqs_BTd], axis=-1)
  return jnp.cos(emb_BTDh).astype(dtype), jnp.sin(emb_BTDh).astype(dtype)


def apply_rotary(x_BTNDh, cos_BTDh, sin_BTDh):
  """Rotate-half rotary on x [..., heads, Dh] with cos / sin [..., Dh] shared by the heads (decoder: [B, T, N, Dh];
  vision tower: [N, H, Dh])."""
  half = x_BTNDh.shape[-1] // 2
  rot = jnp.concatenate([-x_BTNDh[..., half:], x_BTNDh[..., :half]], axis=-1)
  return x_BTNDh * cos_BTDh[..., None, :] + rot * sin_BTDh[..., None, :]
