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
`metadata=`, not a traced image_grid_thw). Attention is softmax under a `segment_q == segment_k` mask (transformers' cu_seqlens semantics: one segment per frame of
each image, or per window in Qwen2.5-VL window blocks), in query blocks of `attn_chunk`. Window blocks look only at
the keys within `config.max_window_patches` of each query block (exact: windows are contiguous in compute order);
full blocks do the same with `max_frame_patches` when given (a static promise about the largest frame), else O(N^2).

Parameter names (the checkpoint contract; `hf_to_flax_name` implements it, keys relative to `visual.`):
    a numeric path component joins its parent with "_":   blocks.{i} -> blocks_{i},  merger.mlp.{0,2} -> merger/mlp_{0,2}
    nn.Linear weight [out, in]            -> kernel [in, out]            (transpose)
    nn.Linear / LayerNorm bias            -> bias
    norm1 / norm2 / ln_q weight           -> scale                       (LayerNorm for qwen2_vl, RMSNorm for 2.5)
    patch_embed.proj.weight [D,C,Tp,P,P]  -> patch_embed/proj/kernel [K, D] = weight.reshape(D, K).T
                                             (inverse: kernel.T.reshape(D, C, Tp, P, P); K is in the processor's
                                             flatten order C, Tp, P, P, so the Conv3D is one matmul)
e.g. visual.blocks.3.attn.qkv.weight -> ("blocks_3", "attn", "qkv", "kernel"), transposed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = Any
FAMILIES = ("qwen2_vl", "qwen2_5_vl")


# ----------------------------------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  model_type: str  # "qwen2_vl" (LayerNorm, fc1/fc2 MLP, full attention) | "qwen2_5_vl" (RMSNorm, SwiGLU, windows)
  depth: int
  embed_dim: int  # D: qwen2_vl `embed_dim`, qwen2_5_vl `hidden_size`
  num_heads: int
  intermediate_size: int  # F: qwen2_vl embed_dim * mlp_ratio, qwen2_5_vl `intermediate_size`
  out_hidden_size: int  # O (LLM width): qwen2_vl vision `hidden_size`, qwen2_5_vl `out_hidden_size`
  hidden_act: str = "quick_gelu"
  patch_size: int = 14
  temporal_patch_size: int = 2
  in_channels: int = 3
  spatial_merge_size: int = 2
  window_size: int = 0  # pixels; 0 = full attention in every block (qwen2_vl)
  fullatt_block_indexes: tuple[int, ...] = ()
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  mlp_ratio: float | None = None  # qwen2_vl only, kept for to_hf
  tokens_per_second: int | None = None  # qwen2_5_vl only (used by the decoder's M-RoPE for video), kept for to_hf
  initializer_range: float = 0.02

  @property
  def family(self) -> str:
    return "qwen2_5_vl" if self.model_type.startswith("qwen2_5_vl") else "qwen2_vl"

  @property
  def head_dim(self) -> int:
    return self.embed_dim // self.num_heads

  @property
  def merge_unit(self) -> int:
    return self.spatial_merge_size**2

  @property
  def patch_dim(self) -> int:
    return self.in_channels * self.temporal_patch_size * self.patch_size**2

  @property
  def max_window_patches(self) -> int:
    """Patches in the largest attention window (window blocks attend within <= this many patches)."""
    return max(self.window_size // self.spatial_merge_size // self.patch_size, 1) ** 2 * self.merge_unit

  def is_window_block(self, i: int) -> bool:
    return self.family == "qwen2_5_vl" and self.window_size > 0 and i not in self.fullatt_block_indexes

  @classmethod
  def from_hf(cls, vc: dict, model_type: str, out_hidden_size: int | None = None) -> "VisionConfig":
    family = "qwen2_5_vl" if model_type.startswith("qwen2_5_vl") else "qwen2_vl"
    if not model_type.startswith(FAMILIES):
      raise ValueError(f"unknown model_type {model_type!r}")
    rope = vc.get("rope_parameters") or {}
    common = dict(
        model_type=family,
        depth=int(vc.get("depth", 32)),
        num_heads=int(vc.get("num_heads", 16)),
        patch_size=int(vc.get("patch_size", 14)),
        temporal_patch_size=int(vc.get("temporal_patch_size", 2)),
        in_channels=int(vc.get("in_channels", vc.get("in_chans", 3))),
        spatial_merge_size=int(vc.get("spatial_merge_size", 2)),
        rope_theta=float(rope.get("rope_theta", vc.get("rope_theta", 10000.0))),
        initializer_range=float(vc.get("initializer_range", 0.02)),
    )
    if family == "qwen2_vl":
      embed_dim, mlp_ratio = int(vc.get("embed_dim", 1280)), vc.get("mlp_ratio", 4)
      return cls(
          **common,
          embed_dim=embed_dim,
          intermediate_size=int(embed_dim * mlp_ratio),
          out_hidden_size=int(out_hidden_size or vc.get("hidden_size", 3584)),
          hidden_act=vc.get("hidden_act", "quick_gelu"),
          mlp_ratio=mlp_ratio,
      )
    return cls(
        **common,
        embed_dim=int(vc.get("hidden_size", 3584)),
        intermediate_size=int(vc.get("intermediate_size", 3420)),
        out_hidden_size=int(out_hidden_size or vc.get("out_hidden_size", 3584)),
        hidden_act=vc.get("hidden_act", "silu"),
        window_size=int(vc.get("window_size", 112)),
        fullatt_block_indexes=tuple(int(i) for i in vc.get("fullatt_block_indexes", (7, 15, 23, 31))),
        tokens_per_second=vc.get("tokens_per_second", 4),
    )

  def to_hf(self) -> dict:
    out = dict(
        depth=self.depth,
        num_heads=self.num_heads,
        hidden_act=self.hidden_act,
        patch_size=self.patch_size,
        temporal_patch_size=self.temporal_patch_size,
        in_channels=self.in_channels,
        spatial_merge_size=self.spatial_merge_size,
        initializer_range=self.initializer_range,
    )
    if self.rope_theta != 10000.0:
      out["rope_parameters"] = {"rope_type": "axial", "rope_theta": self.rope_theta}
    if self.family == "qwen2_vl":
      ratio = self.mlp_ratio if self.mlp_ratio is not None else self.intermediate_size / self.embed_dim
      return dict(
          out, model_type="qwen2_vl", embed_dim=self.embed_dim, hidden_size=self.out_hidden_size, mlp_ratio=ratio
      )
    return dict(
        out,
        model_type="qwen2_5_vl",
        hidden_size=self.embed_dim,
        intermediate_size=self.intermediate_size,
        out_hidden_size=self.out_hidden_size,
        window_size=self.window_size,
        fullatt_block_indexes=list(self.fullatt_block_indexes),
        tokens_per_second=self.tokens_per_second if self.tokens_per_second is not None else 4,
    )


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


def apply_rotary(x_NHDh: Array, cos_NDh: Array, sin_NDh: Array) -> Array:
  x = x_NHDh.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x * cos_NDh[:, None, :] + rotated * sin_NDh[:, None, :]).astype(x_NHDh.dtype)


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


class RMSNorm(nn.Module):
  eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_ND: Array) -> Array:
    init = nn.with_logical_partitioning(nn.initializers.ones, ("vision_embed",))
    scale_D = self.param("scale", init, (x_ND.shape[-1],), self.param_dtype)
    x = x_ND.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return scale_D.astype(self.dtype)[None, :] * x.astype(self.dtype)


def make_norm(config: VisionConfig, dtype: Any, param_dtype: Any, name: str) -> nn.Module:
  if config.family == "qwen2_5_vl":
    return RMSNorm(config.norm_eps, dtype, param_dtype, name=name)
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
    q_NHDh = apply_rotary(qkv_N3HDh[:, 0], cos_NDh, sin_NDh)
    k_NHDh = apply_rotary(qkv_N3HDh[:, 1], cos_NDh, sin_NDh)
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


# ----------------------------------------------------------------------------------- checkpoint name mapping

NORM_MODULES = ("norm1", "norm2", "ln_q")
VISUAL_PREFIXES = ("model.visual.", "visual.")


def _conv_to_kernel(w: np.ndarray) -> np.ndarray:
  w = np.asarray(w)
  return np.ascontiguousarray(w.reshape(w.shape[0], -1).T)


def _identity(a: np.ndarray) -> np.ndarray:
  return np.asarray(a)


def _transpose(a: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(a).T)


def hf_to_flax_name(hf_key: str) -> tuple[tuple[str, ...], Callable[[np.ndarray], np.ndarray]]:
  """transformers key (with or without `model.visual.` / `visual.`) -> (path in params["params"], torch->flax fn).

  The path is relative to the tower's own params (the policy nests it under its `visual` submodule)."""
  for prefix in VISUAL_PREFIXES:
    if hf_key.startswith(prefix):
      hf_key = hf_key[len(prefix) :]
      break
  *mods, leaf = hf_key.split(".")
  path: list[str] = []
  for part in mods:
    if part.isdigit():
      path[-1] = f"{path[-1]}_{part}"
    else:
      path.append(part)
  if mods == ["patch_embed", "proj"] and leaf == "weight":
    return (*path, "kernel"), _conv_to_kernel
  if mods and mods[-1] in NORM_MODULES:
    return (*path, "scale" if leaf == "weight" else "bias"), _identity
  if leaf == "weight":
    return (*path, "kernel"), _transpose
  if leaf == "bias":
    return (*path, "bias"), _identity
  raise KeyError(f"no flax name for vision key {hf_key!r}")


def flax_to_hf_name(
    path: tuple[str, ...], config: VisionConfig, prefix: str = "model.visual."
) -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
  """Inverse of hf_to_flax_name: (path in the tower's params) -> (transformers key, flax->torch fn)."""
  *mods, leaf = path
  parts = []
  for m in mods:
    head, _, tail = m.rpartition("_")
    parts.extend([head, tail] if tail.isdigit() and head in ("blocks", "mlp") else [m])
  if list(mods) == ["patch_embed", "proj"]:
    shape = (config.embed_dim, config.in_channels, config.temporal_patch_size, config.patch_size, config.patch_size)
    return prefix + "patch_embed.proj.weight", lambda k: np.ascontiguousarray(np.asarray(k).T.reshape(shape))
  name = {"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf]
  return prefix + ".".join(parts + [name]), _transpose if leaf == "kernel" else _identity


def torch_to_param(hf_key: str, array: np.ndarray) -> tuple[tuple[str, ...], np.ndarray]:
  path, fn = hf_to_flax_name(hf_key)
  return path, fn(array)


def param_to_torch(
    path: tuple[str, ...], array: np.ndarray, config: VisionConfig, prefix: str = "model.visual."
) -> tuple[str, np.ndarray]:
  key, fn = flax_to_hf_name(path, config, prefix)
  return key, fn(array)


def params_from_state_dict(state_dict: dict[str, np.ndarray]) -> dict:
  """{transformers visual key: numpy array} -> the tower's params tree (numpy leaves; wrap as {"params": ...})."""
  tree: dict = {}
  for key, value in state_dict.items():
    path, value = torch_to_param(key, value)
    node = tree
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = value
  return tree


def state_dict_from_params(params: dict, config: VisionConfig, prefix: str = "model.visual.") -> dict[str, np.ndarray]:
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  out = {}
  for keypath, value in flat:
    key, value = param_to_torch(tuple(k.key for k in keypath), np.asarray(value), config, prefix)
    out[key] = value
  return out
