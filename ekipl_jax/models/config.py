"""`QwenVLConfig`: the policy's text-side hyper-parameters read from an HF `config.json` (qwen2_vl / qwen2_5_vl; the
v5 nested `text_config` layout and the legacy flat layout), plus the raw vision config; `VisionConfig`: the vision
tower's (vision.py) hyper-parameters read from that raw vision config.

Both are frozen and hashable (static attributes of the Flax modules); `to_hf()` gives back what transformers'
`from_pretrained` accepts.
"""

from __future__ import annotations

import dataclasses
import json

MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")  # the model families (config.json model_type)


def family_of(model_type: str) -> str:
  """qwen2_5_vl for a Qwen2.5-VL model_type (qwen2_5_vl, qwen2_5_vl_text), else qwen2_vl."""
  return "qwen2_5_vl" if model_type.startswith("qwen2_5_vl") else "qwen2_vl"


@dataclasses.dataclass(frozen=True)
class QwenVLConfig:
  model_type: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  rms_norm_eps: float
  rope_theta: float
  mrope_section: tuple[int, ...]
  tie_word_embeddings: bool
  image_token_id: int
  video_token_id: int
  vision_start_token_id: int
  spatial_merge_size: int
  hf_json: str = dataclasses.field(repr=False)  # the full HF config, for to_hf() and the vision tower

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def hf(self) -> dict:
    return json.loads(self.hf_json)

  @property
  def vision_hf(self) -> dict:
    return dict(self.hf.get("vision_config") or {})

  @classmethod
  def from_hf(cls, hf: dict) -> "QwenVLConfig":
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
      raise ValueError(f"unknown model_type {model_type!r} (supported: {', '.join(MODEL_TYPES)})")
    text = dict(hf)
    text.update(hf.get("text_config") or {})  # v5 nests text fields; legacy keeps them at the top
    if text.get("use_sliding_window"):
      raise NotImplementedError("use_sliding_window=True is not supported")
    rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or hf.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "mrope"):
      raise NotImplementedError(f"rope_type {rope_type!r} is not supported")
    theta = rope.get("rope_theta", text.get("rope_theta", 1000000.0))
    heads = text["num_attention_heads"]
    vision = hf.get("vision_config") or {}
    tie = hf.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False)
    cfg = cls(
        model_type=model_type,
        vocab_size=text["vocab_size"],
        hidden_size=text["hidden_size"],
        intermediate_size=text["intermediate_size"],
        num_layers=text["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=text.get("num_key_value_heads") or heads,
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta),
        mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
        tie_word_embeddings=bool(tie),
        image_token_id=hf.get("image_token_id", 151655),
        video_token_id=hf.get("video_token_id", 151656),
        vision_start_token_id=hf.get("vision_start_token_id", 151652),
        spatial_merge_size=vision.get("spatial_merge_size", 2),
        hf_json=json.dumps(hf, sort_keys=True),
    )
    if 2 * sum(cfg.mrope_section) != cfg.head_dim:
      raise ValueError(f"mrope_section {cfg.mrope_section} must sum to head_dim / 2 = {cfg.head_dim // 2}")
    return cfg

  def to_hf(self, dtype: str | None = None) -> dict:
    hf = self.hf
    if dtype is not None:
      hf["dtype"] = dtype
      if isinstance(hf.get("text_config"), dict):
        hf["text_config"]["dtype"] = dtype
    return hf


def as_config(c: "QwenVLConfig | dict") -> QwenVLConfig:
  return c if isinstance(c, QwenVLConfig) else QwenVLConfig.from_hf(c)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """The vision tower's hyper-parameters, from config.json's `vision_config` (`from_hf`) of either family."""

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
    return family_of(self.model_type)

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
    family = family_of(model_type)
    if not model_type.startswith(MODEL_TYPES):
      raise ValueError(f"unknown model_type {model_type!r}")
    rope_params = vc.get("rope_parameters") or {}
    common = dict(
        model_type=family,
        depth=int(vc.get("depth", 32)),
        num_heads=int(vc.get("num_heads", 16)),
        patch_size=int(vc.get("patch_size", 14)),
        temporal_patch_size=int(vc.get("temporal_patch_size", 2)),
        in_channels=int(vc.get("in_channels", vc.get("in_chans", 3))),
        spatial_merge_size=int(vc.get("spatial_merge_size", 2)),
        rope_theta=float(rope_params.get("rope_theta", vc.get("rope_theta", 10000.0))),
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
