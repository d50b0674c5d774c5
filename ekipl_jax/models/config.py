"""`QwenVLConfig`: the policy's text-side hyper-parameters read from an HF `config.json` (qwen2_vl / qwen2_5_vl; the
v5 nested `text_config` layout and the legacy flat layout), plus the raw vision config for `vision.py`.

The config is frozen and hashable (it is a static attribute of the Flax module); `to_hf()` gives back a dict that
transformers' `from_pretrained` accepts.
"""

from __future__ import annotations

import dataclasses
import json

MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")


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
