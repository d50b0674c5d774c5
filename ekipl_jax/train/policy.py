"""The policy a run trains: loaded from an HF folder, or built from scratch (tokenizer trained on the data's own text,
weights freshly initialised) and written as an HF folder first, so every run starts from a real checkpoint folder."""

from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp

from ekipl_jax import models
from ekipl_jax.data import processor as processor_lib
from ekipl_jax.data import tokenizer as tokenizer_lib

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def scratch_hf_config(family: str, arch, special: dict) -> dict:
  """An HF config.json dict (transformers 5 layout) for a from-scratch policy (`arch` fields, see configs/demo.py)."""
  head_dim = arch.hidden_size // arch.num_attention_heads
  text = dict(
      vocab_size=special["vocab_size"],
      hidden_size=arch.hidden_size,
      intermediate_size=arch.intermediate_size,
      num_hidden_layers=arch.num_hidden_layers,
      num_attention_heads=arch.num_attention_heads,
      num_key_value_heads=arch.num_key_value_heads,
      rms_norm_eps=1e-6,
      hidden_act="silu",
      max_position_embeddings=arch.max_position_embeddings,
      bos_token_id=None,
      eos_token_id=special["eos_token_id"],
      pad_token_id=special["pad_token_id"],
      rope_parameters={
          "rope_type": "default",
          "rope_theta": arch.rope_theta,
          "mrope_section": list(arch.mrope_section),
      },
      tie_word_embeddings=arch.tie_word_embeddings,
  )
  if 2 * sum(arch.mrope_section) != head_dim:
    raise ValueError(f"config key model.arch.mrope_section: must sum to head_dim / 2 = {head_dim // 2}")
  vision = dict(
      depth=arch.vision_depth,
      num_heads=arch.vision_num_heads,
      patch_size=14,
      temporal_patch_size=2,
      spatial_merge_size=2,
      in_channels=3,
  )
  if family == "qwen2_5_vl":
    vision.update(
        hidden_size=arch.vision_hidden_size,
        intermediate_size=arch.vision_intermediate_size,
        out_hidden_size=arch.hidden_size,
        window_size=arch.vision_window_size,
        fullatt_block_indexes=list(arch.vision_fullatt_block_indexes),
        hidden_act="silu",
        tokens_per_second=2,
    )
  elif family == "qwen2_vl":
    vision.update(
        embed_dim=arch.vision_hidden_size,
        hidden_size=arch.hidden_size,
        mlp_ratio=arch.vision_intermediate_size / arch.vision_hidden_size,
        hidden_act="quick_gelu",
    )
  else:
    raise ValueError(f"config key model.family: unknown family {family!r}")
  return dict(
      model_type=family,
      text_config=text,
      vision_config=vision,
      image_token_id=special["image_token_id"],
      video_token_id=special["video_token_id"],
      vision_start_token_id=special["vision_start_token_id"],
      vision_end_token_id=special["vision_end_token_id"],
      tie_word_embeddings=arch.tie_word_embeddings,
  )


def make_scratch_checkpoint(mcfg, dcfg, corpus: Sequence[str], out_dir: str, seed: int) -> str:
  """Train the tokenizer on `corpus`, initialise the policy, save both as an HF folder; returns out_dir.
  An existing folder (config.json present) is reused, so reruns and resumed runs share one starting point."""
  if os.path.exists(os.path.join(out_dir, "config.json")):
    return out_dir
  proc_dir = out_dir + "_processor"
  tokenizer_lib.build_processor_folder(
      list(corpus) + processor_lib.template_corpus(),
      proc_dir,
      mcfg.vocab_size,
      mcfg.family,
      dcfg.min_pixels,
      dcfg.max_pixels,
  )
  special = tokenizer_lib.read_special_token_ids(proc_dir)
  hf = scratch_hf_config(mcfg.family, mcfg.arch, special)
  model, params = models.init(hf, jax.random.key(seed))
  models.save_pretrained(model, params, out_dir, processor_dir=proc_dir)
  return out_dir


def load(mcfg, dcfg, path: str, mesh=None, rules=models.sharding.RULES):
  """-> (model, params, processor) from an HF folder (weights and the processor files beside them)."""
  if not os.path.exists(os.path.join(path, "config.json")):
    raise FileNotFoundError(f"config key model.init_from: no config.json in {path!r}")
  model, params = models.load_pretrained(
      path,
      dtype=DTYPES[mcfg.param_dtype],
      mesh=mesh,
      compute_dtype=DTYPES[mcfg.compute_dtype],
      remat=mcfg.remat,
      rules=rules,
  )
  proc = processor_lib.load(path, dcfg.min_pixels, dcfg.max_pixels)
  return model, params, proc
