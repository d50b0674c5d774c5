"""Shared test fixtures: tiny random Qwen2-VL / Qwen2.5-VL checkpoints built by transformers itself, and inputs in the
exact layout the transformers processor returns (image pad tokens, flattened patches, image_grid_thw).

Legend: B batch rows, T tokens, N vision patches (before the 2x2 merge), P patch vector length (C * tp * p * p).

    path = tiny_hf_model("qwen2_vl", tmp_path)                  # a folder transformers' from_pretrained loads
    inputs = make_inputs(path_or_config, rows=[...], seed=0)     # numpy dict: input_ids, attention_mask, ...
"""

from __future__ import annotations

import json
import os

import numpy as np

FAMILIES = ("qwen2_vl", "qwen2_5_vl")

VOCAB = 320
IMAGE_TOKEN_ID = 300
VIDEO_TOKEN_ID = 301
VISION_START_ID = 302
VISION_END_ID = 303
TEXT_VOCAB = 296  # ordinary text tokens are drawn from [0, TEXT_VOCAB)


def tiny_config_dict(family: str, tie_word_embeddings: bool = False) -> dict:
  """A tiny HF config (hidden 64, 2 layers, 4 heads, 2 kv heads, head_dim 16, vision depth 2)."""
  text = dict(
      vocab_size=VOCAB,
      hidden_size=64,
      intermediate_size=96,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      rms_norm_eps=1e-6,
      max_position_embeddings=512,
      bos_token_id=1,
      eos_token_id=2,
      rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
  )
  if family == "qwen2_vl":
    vision = dict(
        depth=2,
        embed_dim=32,
        hidden_size=64,
        num_heads=2,
        mlp_ratio=2,
        patch_size=14,
        temporal_patch_size=2,
        spatial_merge_size=2,
        in_channels=3,
    )
  elif family == "qwen2_5_vl":
    vision = dict(
        depth=2,
        hidden_size=32,
        out_hidden_size=64,
        intermediate_size=48,
        num_heads=2,
        patch_size=14,
        temporal_patch_size=2,
        spatial_merge_size=2,
        in_channels=3,
        window_size=56,
        fullatt_block_indexes=[1],
        tokens_per_second=2,
    )
  else:
    raise ValueError(f"unknown family {family!r}")
  return dict(
      model_type=family,
      text_config=text,
      vision_config=vision,
      image_token_id=IMAGE_TOKEN_ID,
      video_token_id=VIDEO_TOKEN_ID,
      vision_start_token_id=VISION_START_ID,
      vision_end_token_id=VISION_END_ID,
      tie_word_embeddings=tie_word_embeddings,
  )


def build_hf_model(family: str, seed: int = 0, tie_word_embeddings: bool = False, noise: float = 0.05):
  """A transformers model in float32 / eager attention whose every weight is perturbed away from its init."""
  import torch
  import transformers

  cfg_dict = dict(tiny_config_dict(family, tie_word_embeddings))
  cfg_dict.pop("model_type")
  if family == "qwen2_vl":
    config = transformers.Qwen2VLConfig(**cfg_dict)
    cls = transformers.Qwen2VLForConditionalGeneration
  else:
    config = transformers.Qwen2_5_VLConfig(**cfg_dict)
    cls = transformers.Qwen2_5_VLForConditionalGeneration
  config._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = cls(config).to(torch.float32).eval()
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for _, p in model.named_parameters():
      p.add_(noise * torch.randn(p.shape, generator=gen, dtype=p.dtype))
  return model


def tiny_hf_model(
    family: str, tmp_path, seed: int = 0, tie_word_embeddings: bool = False, max_shard_size: str | None = None
) -> str:
  """Save a tiny random HF model of `family` under tmp_path/<family> and return the folder path."""
  model = build_hf_model(family, seed=seed, tie_word_embeddings=tie_word_embeddings)
  out = os.path.join(str(tmp_path), f"{family}_s{seed}_t{int(tie_word_embeddings)}")
  kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
  model.save_pretrained(out, **kwargs)
  return out


def _vision_cfg(cfg_or_path) -> tuple[int, int, int, int]:
  """(patch_size, temporal_patch_size, in_channels, merge) from an HF folder or config dict."""
  if isinstance(cfg_or_path, (str, os.PathLike)):
    with open(os.path.join(cfg_or_path, "config.json")) as f:
      cfg_or_path = json.load(f)
  v = cfg_or_path["vision_config"]
  return (
      v.get("patch_size", 14),
      v.get("temporal_patch_size", 2),
      v.get("in_channels", 3),
      v.get("spatial_merge_size", 2),
  )


def make_inputs(cfg_or_path, rows: list[list], seed: int = 0, pad_id: int = 0) -> dict:
  """Processor-style inputs. Each row is a list of segments: an int n = n random text tokens, or a tuple (h, w) =
  one image of h x w patches (even numbers) wrapped in vision start/end tokens. Rows are left padded.

  Returns numpy input_ids [B,T] int64, attention_mask [B,T] int64, mm_token_type_ids [B,T] int64 and, when any
  image is present, pixel_values [N, P] float32 and image_grid_thw [n_images, 3] int64 (images in row order)."""
  rng = np.random.default_rng(seed)
  p, tp, c, merge = _vision_cfg(cfg_or_path)
  seqs, types, grids = [], [], []
  for row in rows:
    ids, tt = [], []
    for seg in row:
      if isinstance(seg, int):
        ids += list(rng.integers(0, TEXT_VOCAB, seg))
        tt += [0] * seg
      else:
        h, w = seg
        n_tok = h * w // (merge * merge)
        ids += [VISION_START_ID] + [IMAGE_TOKEN_ID] * n_tok + [VISION_END_ID]
        tt += [0] + [1] * n_tok + [0]
        grids.append((1, h, w))
    seqs.append(ids)
    types.append(tt)
  T = max(len(s) for s in seqs)
  B = len(seqs)
  input_ids = np.full((B, T), pad_id, np.int64)
  mask = np.zeros((B, T), np.int64)
  mm = np.zeros((B, T), np.int64)
  for b, (s, t) in enumerate(zip(seqs, types)):
    input_ids[b, T - len(s) :] = s
    mask[b, T - len(s) :] = 1
    mm[b, T - len(s) :] = t
  out = dict(input_ids=input_ids, attention_mask=mask, mm_token_type_ids=mm)
  if grids:
    grid = np.asarray(grids, np.int64)
    n = int(grid.prod(-1).sum())
    out["pixel_values"] = rng.normal(size=(n, c * tp * p * p)).astype(np.float32)
    out["image_grid_thw"] = grid
  return out


def hf_logits(hf_model, inputs: dict) -> np.ndarray:
  """Logits [B,T,V] of a transformers model on numpy inputs from make_inputs."""
  import torch

  kw = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
  with torch.no_grad():
    return hf_model(**kw).logits.float().numpy()


def load_hf(path: str):
  """transformers' own from_pretrained on a folder (float32, eager attention)."""
  import torch
  import transformers

  with open(os.path.join(path, "config.json")) as f:
    mt = json.load(f)["model_type"]
  cls = {
      "qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
      "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
  }[mt]
  return cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
