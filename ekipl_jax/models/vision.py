"""Qwen2-VL / Qwen2.5-VL vision tower: patch embed, 2D rotary, blocks (full or window attention), 2x2 patch merger.

Legend: N patches (before the merge, possibly padded to a bucket); M merged tokens (N / U); U merge unit
(spatial_merge_size**2, 4); K patch vector length (C * Tp * P * P); D vision width; H heads; Dh head dim;
F vision mlp width; O output width (the LLM hidden size); I images (rows of image_grid_thw).

    tower = VisionTower(VisionConfig.from_hf(hf["vision_config"], hf["model_type"]), dtype=jnp.bfloat16)
    meta = vision_metadata(image_grid_thw, tower.config, pad_to=None)        # host numpy, once per batch
    feats_MO = tower.apply(variables, pixel_values_NK, metadata=meta)        # or image_grid_thw=... (host numpy)

`feats_MO` is in exactly the order of transformers' `model.visual(...).pooler_output` (what the LLM receives at the
image pad tokens). With `pad_to` the compute sees `pad_to` patches; the first `num_merged(grid, config)` rows of the
output are the real features, the rest (`pad_to / U - M` rows) are garbage to drop. Pad patches form one extra
attention segment of their own, so they never touch real patches; `pixel_values` may be passed unpadded (the tower
pads with zeros) or already padded to `pad_to` (`pad_patches`). `pad_to` must be a multiple of U.

Everything data dependent (rotary positions, per-frame segment ids, the Qwen2.5-VL window order, window segment ids and
the inverse order) is host numpy from `vision_metadata`; the jitted compute sees only those arrays (under jit pass
`metadata=`, not a traced image_grid_thw). Attention is softmax under a `segment_q == segment_k` mask (transformers'
cu_seqlens semantics: one segment per frame of each image, or per window in Qwen2.5-VL window blocks), in query blocks
of `attn_chunk`. Window blocks look only at the keys within `config.max_window_patches` of each query block (exact:
windows are contiguous in compute order); full blocks do the same with `max_frame_patches` when given (a static
promise about the largest frame), else O(N^2). A batch of rows runs the tower per row (models/packed.py).

Parameter names mirror transformers' `visual.*` keys; the mapping is models/hf_checkpoint.py's (vision_hf_to_flax_name).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ekipl_jax.models import rope
from ekipl_jax.models.config import VisionConfig
from ekipl_jax.models.decoder import RMSNorm

Array = Any


# ------------------------------------------------------------------------------------- host-side metadata (numpy)


class VisionMetadata(NamedTuple):
  """Per-patch arrays, all in the compute order (Qwen2.5-VL: window order; Qwen2-VL: the input order)."""

  patch_perm_N: np.ndarray  # int32: compute row n takes input pixel row patch_perm_N[n] (pads: rows >= real N)
  pos_hw_N2: np.ndarray  # int32: (row, col) of each patch in its image, for the 2D rotary
  segment_ids_N: np.ndarray  # int32: one id per frame of each image (transformers' cu_seqlens); pads: one more id
  window_ids_N: np.ndarray  # int32: one id per attention window (== segment_ids_N when there are no windows)
  unperm_M: np.ndarray  # int32: output row m = merged compute row unperm_M[m] (real rows first, then pads)


def num_merged(image_grid_thw: np.ndarray, config: VisionConfig) -> int:
  """M: merged tokens the LLM receives for these images (the real rows at the top of the tower's output)."""
  return int(np.prod(np.asarray(image_grid_thw), axis=-1).sum()) // config.merge_unit


def _image_positions(t: int, h: int, w: int, m: int) -> np.ndarray:
  """(row, col) per patch in the processor's order: frames, then m x m merge blocks row-major, then inside a block."""
  hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  blocks = lambda a: a.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
  return np.tile(np.stack([blocks(hh), blocks(ww)], axis=-1), (t, 1))


def _image_windows(t: int, h: int, w: int, m: int, win: int) -> tuple[np.ndarray, np.ndarray]:
  """Window order of one image's merge units and each unit's window (transformers' get_vision_window_index).

  Units (frame f, row y, col x) on the (h/m, w/m) grid are cut into win x win windows (the last ones smaller when
  win does not divide the grid); order: frame, window row, window col, then row-major inside the window."""
  f, y, x = np.meshgrid(np.arange(t), np.arange(h // m), np.arange(w // m), indexing="ij")
  f, y, x = f.reshape(-1), y.reshape(-1), x.reshape(-1)
  n_wh, n_ww = -(-(h // m) // win), -(-(w // m) // win)
  window = (f * n_wh + y // win) * n_ww + x // win
  order = np.lexsort((x % win, y % win, window))
  return order, window[order]


def vision_metadata(image_grid_thw: np.ndarray, config: VisionConfig, pad_to: int | None = None) -> VisionMetadata:
  grid = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
  m, u = config.spatial_merge_size, config.merge_unit
  n_real = int(np.prod(grid, axis=-1).sum())
  n = n_real if pad_to is None else int(pad_to)
  if n < n_real or n % u:
    raise ValueError(f"pad_to={pad_to} must be >= {n_real} patches and a multiple of {u}")
  windowed = config.family == "qwen2_5_vl" and config.window_size > 0
  win = max(config.window_size // m // config.patch_size, 1)

  unit_order, pos, seg, wid = [], [], [], []
  unit_base = seg_base = win_base = 0
  for t, h, w in grid.tolist():
    pos.append(_image_positions(t, h, w, m))
    seg.append(np.repeat(seg_base + np.arange(t), h * w))
    if windowed:
      order, window = _image_windows(t, h, w, m, win)
    else:
      order, window = np.arange(t * h * w // u), np.repeat(np.arange(t), h * w // u)
    unit_order.append(unit_base + order)
    _, window = np.unique(window, return_inverse=True)  # dense ids, in first-seen (= window) order
    wid.append(win_base + np.repeat(window, u))
    unit_base, seg_base, win_base = unit_base + t * h * w // u, seg_base + t, win_base + int(window.max()) + 1
  n_pad_units = (n - n_real) // u
  unit_order.append(unit_base + np.arange(n_pad_units))
  unit_order = np.concatenate(unit_order)
  patch_perm = (unit_order[:, None] * u + np.arange(u)).reshape(-1)
  pos_hw = np.concatenate(pos + [np.zeros((n - n_real, 2), np.int64)])[patch_perm]
  seg_ids = np.concatenate(seg + [np.full(n - n_real, seg_base)])[patch_perm]
  win_ids = np.concatenate(wid + [np.full(n - n_real, win_base)])
  as32 = lambda a: np.ascontiguousarray(a, dtype=np.int32)
  return VisionMetadata(as32(patch_perm), as32(pos_hw), as32(seg_ids), as32(win_ids), as32(np.argsort(unit_order)))


def pad_patches(pixel_values_NK: np.ndarray, pad_to: int) -> np.ndarray:
  """Zero rows up to the bucket size `pad_to` (host side, so the jitted tower sees one shape per bucket)."""
  x = np.asarray(pixel_values_NK)
  return np.concatenate([x, np.zeros((pad_to - x.shape[0], x.shape[1]), x.dtype)]) if pad_to > x.shape[0] else x


# ------------------------------------------------------------------------------------------------- compute


def rotary_cos_sin(pos_hw_N2: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
  """2D axial rotary: the first Dh/4 frequencies rotate by row, the next Dh/4 by column, halves repeated (f32)."""
  spatial = head_dim // 2
  inv_freq = 1.0 / (theta ** (jnp.arange(0, spatial, 2, dtype=jnp.float32) / spatial))
  ang_N2F = pos_hw_N2.astype(jnp.float32)[..., None] * inv_freq[None, None, :]
  ang_NHalf = ang_N2F.reshape(ang_N2F.shape[0], -1)  # [row freqs, col freqs]
  ang_NDh = jnp.concatenate([ang_NHalf, ang_NHalf], axis=-1)
  return jnp.cos(ang_NDh), jnp.sin(ang_NDh)


def segment_attention(
    q_NHDh: Array, k_NHDh: Array, v_NHDh: Array, seg_N: Array, chunk: int | None = None, span: int | None = None
) -> Array:
  """Softmax attention where query n sees key j only if seg[n] == seg[j] (segments are contiguous runs).

  chunk: queries in blocks of `chunk` (None: all at once, [H, N, N] logits). span: a static bound on the length of
  every real segment; then a query block only looks at the `chunk + 2 (span - 1)` keys around it (exact, since a
  segment of length <= span cannot reach further), so the cost is O(N (chunk + span)) instead of O(N^2). Memory: one
  block's logits at a time, in the backward pass too."""
  scale = q_NHDh.shape[-1] ** -0.5

  def attend(q_CHDh: Array, seg_C: Array, k_LHDh: Array, v_LHDh: Array, seg_L: Array) -> Array:
    logits_HCL = jnp.einsum("chd,lhd->hcl", q_CHDh, k_LHDh, preferred_element_type=jnp.float32) * scale
    mask_1CL = (seg_C[:, None] == seg_L[None, :])[None]
    probs_HCL = jax.nn.softmax(jnp.where(mask_1CL, logits_HCL, -jnp.inf), axis=-1).astype(v_LHDh.dtype)
    return jnp.einsum("hcl,lhd->chd", probs_HCL, v_LHDh)

  n = q_NHDh.shape[0]
  if chunk is None or n <= chunk:
    return attend(q_NHDh, seg_N, k_NHDh, v_NHDh, seg_N)
  n_blocks = -(-n // chunk)
  q_pad = jnp.pad(q_NHDh, ((0, n_blocks * chunk - n), (0, 0), (0, 0)))
  seg_pad = jnp.pad(seg_N, (0, n_blocks * chunk - n), mode="edge")  # pad queries copy the last real segment
  band = n if span is None else min(n, chunk + 2 * (span - 1))

  def one_block(b: Array) -> Array:
    q_CHDh = jax.lax.dynamic_slice_in_dim(q_pad, b * chunk, chunk)
    seg_C = jax.lax.dynamic_slice_in_dim(seg_pad, b * chunk, chunk)
    start = jnp.clip(b * chunk - (span or 1) + 1, 0, n - band)
    k_LHDh, v_LHDh, seg_L = (jax.lax.dynamic_slice_in_dim(a, start, band) for a in (k_NHDh, v_NHDh, seg_N))
    return attend(q_CHDh, seg_C, k_LHDh, v_LHDh, seg_L)

  # Checkpointed: the backward pass recomputes each block's [H, chunk, band] logits instead of keeping all blocks'
  # (the whole [H, N, band] probabilities would otherwise be a residual of the map).
  out_BCHDh = jax.lax.map(jax.checkpoint(one_block), jnp.arange(n_blocks))
  return out_BCHDh.reshape(n_blocks * chunk, *q_NHDh.shape[1:])[:n]


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def dense(features: int, axes: tuple[str, str], name: str, dtype: Any, param_dtype: Any, bias: bool = True) -> nn.Dense:
  """nn.Dense (its default lecun-normal / zero init) whose kernel and bias declare logical axes (sharding.RULES'
  vision_* entries), so FSDP splits the tower's parameters like the decoder's."""
  return nn.Dense(
      features,
      use_bias=bias,
      dtype=dtype,
      param_dtype=param_dtype,
      name=name,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[1:]),
  )


def make_norm(config: VisionConfig, dtype: Any, param_dtype: Any, name: str) -> nn.Module:
  if config.family == "qwen2_5_vl":
    return RMSNorm(config.norm_eps, dtype, param_dtype, axis="vision_embed", name=name)
  return nn.LayerNorm(
      epsilon=config.norm_eps,
      dtype=dtype,
      param_dtype=param_dtype,
      name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("vision_embed",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("vision_embed",)),
  )


class VisionAttention(nn.Module):
  """qkv -> 2D rotary on q, k -> segment-masked softmax attention -> proj (transformers' `attn.qkv`, `attn.proj`)."""

  config: VisionConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attn_chunk: int | None = None
  span: int | None = None  # static bound on segment length (see segment_attention)

  @nn.compact
  def __call__(self, x_ND: Array, cos_NDh: Array, sin_NDh: Array, seg_N: Array) -> Array:
    n, d, h = x_ND.shape[0], self.config.embed_dim, self.config.num_heads
    dt, pdt = self.dtype, self.param_dtype
    qkv_N3HDh = dense(3 * d, ("vision_embed", "vision_heads"), "qkv", dt, pdt)(x_ND).reshape(n, 3, h, d // h)
    rotate = lambda x: rope.apply_rotary(x.astype(jnp.float32), cos_NDh, sin_NDh).astype(x.dtype)  # in float32
    q_NHDh, k_NHDh = rotate(qkv_N3HDh[:, 0]), rotate(qkv_N3HDh[:, 1])
    o_NHDh = segment_attention(q_NHDh, k_NHDh, qkv_N3HDh[:, 2], seg_N, self.attn_chunk, self.span)
    return dense(d, ("vision_heads", "vision_embed"), "proj", dt, pdt)(o_NHDh.reshape(n, d))


class VisionMLP(nn.Module):
  """qwen2_vl: fc2(act(fc1 x)); qwen2_5_vl: down_proj(act(gate_proj x) * up_proj x). All with biases."""

  config: VisionConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_ND: Array) -> Array:
    cfg, dt, pdt = self.config, self.dtype, self.param_dtype
    act = ACTIVATIONS[cfg.hidden_act]
    up = lambda name: dense(cfg.intermediate_size, ("vision_embed", "vision_mlp"), name, dt, pdt)
    down = lambda name: dense(cfg.embed_dim, ("vision_mlp", "vision_embed"), name, dt, pdt)
    if cfg.family == "qwen2_vl":
      return down("fc2")(act(up("fc1")(x_ND)))
    return down("down_proj")(act(up("gate_proj")(x_ND)) * up("up_proj")(x_ND))


class VisionBlock(nn.Module):
  """x + attn(norm1(x)); x + mlp(norm2(x)). `seg_N` picks full (per frame) or window attention."""

  config: VisionConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attn_chunk: int | None = None
  span: int | None = None

  @nn.compact
  def __call__(self, x_ND: Array, cos_NDh: Array, sin_NDh: Array, seg_N: Array) -> Array:
    cfg, dt, pdt = self.config, self.dtype, self.param_dtype
    attn = VisionAttention(cfg, dt, pdt, self.attn_chunk, self.span, name="attn")
    x_ND = x_ND + attn(make_norm(cfg, dt, pdt, "norm1")(x_ND), cos_NDh, sin_NDh, seg_N)
    return x_ND + VisionMLP(cfg, dt, pdt, name="mlp")(make_norm(cfg, dt, pdt, "norm2")(x_ND))


class PatchMerger(nn.Module):
  """ln_q, then each run of U consecutive patches (one m x m block) concatenated -> mlp_0 -> GELU -> mlp_2."""

  config: VisionConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_ND: Array) -> Array:
    cfg, dt, pdt = self.config, self.dtype, self.param_dtype
    y_MUD = make_norm(cfg, dt, pdt, "ln_q")(x_ND)
    y_MK = y_MUD.reshape(-1, cfg.merge_unit * cfg.embed_dim)
    y_MK = jax.nn.gelu(dense(y_MK.shape[-1], ("vision_embed", "vision_mlp"), "mlp_0", dt, pdt)(y_MK), approximate=False)
    return dense(cfg.out_hidden_size, ("vision_mlp", "embed"), "mlp_2", dt, pdt)(y_MK)


class PatchEmbed(nn.Module):
  """The Conv3D with stride == kernel over flattened patches is one matmul: x_ND = pixels_NK @ kernel_KD."""

  config: VisionConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixels_NK: Array) -> Array:
    proj = dense(self.config.embed_dim, ("vision_patch", "vision_embed"), "proj", self.dtype, self.param_dtype, False)
    return proj(pixels_NK.astype(self.dtype))


class VisionTower(nn.Module):
  """pixel_values [N_real or N_pad, K] + (image_grid_thw host numpy | precomputed VisionMetadata) -> feats [M, O]."""

  config: VisionConfig
  dtype: Any = jnp.float32  # compute dtype (rotary and softmax always in float32)
  param_dtype: Any = jnp.float32
  remat: bool = False  # rematerialise each block in the backward pass
  attn_chunk: int | None = 512  # query block of the attention (None: all N queries at once, [H, N, N] logits)
  max_frame_patches: int | None = None  # static bound on h*w of any frame: full-attention blocks then only look at
  #                                       keys near each query block; None: they look at all N keys (always exact)

  @nn.compact
  def __call__(
      self, pixel_values_NK: Array, image_grid_thw: np.ndarray | None = None, metadata: VisionMetadata | None = None
  ) -> Array:
    cfg = self.config
    if metadata is None:
      metadata = vision_metadata(np.asarray(image_grid_thw), cfg)
    perm_N = jnp.asarray(metadata.patch_perm_N)
    n = perm_N.shape[0]
    if pixel_values_NK.shape[0] < n:
      pixel_values_NK = jnp.pad(pixel_values_NK, ((0, n - pixel_values_NK.shape[0]), (0, 0)))
    x_ND = PatchEmbed(cfg, self.dtype, self.param_dtype, name="patch_embed")(jnp.take(pixel_values_NK, perm_N, 0))
    cos_NDh, sin_NDh = rotary_cos_sin(jnp.asarray(metadata.pos_hw_N2), cfg.head_dim, cfg.rope_theta)
    seg_N, win_N = jnp.asarray(metadata.segment_ids_N), jnp.asarray(metadata.window_ids_N)
    block_cls = nn.remat(VisionBlock) if self.remat else VisionBlock
    if self.max_frame_patches is not None and image_grid_thw is not None:
      assert int(np.max(np.prod(np.asarray(image_grid_thw)[:, 1:], -1))) <= self.max_frame_patches
    for i in range(cfg.depth):
      window = cfg.is_window_block(i)
      span = cfg.max_window_patches if window else self.max_frame_patches
      block = block_cls(cfg, self.dtype, self.param_dtype, self.attn_chunk, span, name=f"blocks_{i}")
      x_ND = block(x_ND, cos_NDh, sin_NDh, win_N if window else seg_N)
    feats_MO = PatchMerger(cfg, self.dtype, self.param_dtype, name="merger")(x_ND)
    return jnp.take(feats_MO, jnp.asarray(metadata.unperm_M), axis=0)
