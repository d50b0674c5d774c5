"""config.json of the Instruct models the paper configs name, for tools that need the architecture but no weights
(experiments/aot.py compiles for a TPU slice from abstract parameters; no checkpoint has to be downloaded).

The fields are those of the public Hugging Face model cards' config.json (the legacy flat layout that
`QwenVLConfig.from_hf` reads), copied from:
  https://huggingface.co/Qwen/Qwen2-VL-2B-Instruct/blob/main/config.json
  https://huggingface.co/Qwen/Qwen2-VL-7B-Instruct/blob/main/config.json
  https://huggingface.co/Qwen/Qwen2.5-VL-3B-Instruct/blob/main/config.json
  https://huggingface.co/Qwen/Qwen2.5-VL-7B-Instruct/blob/main/config.json
Only what shapes the parameters and the activations is kept (no generation / dtype / version fields).

  hf = known_configs.lookup("runs/qwen2_vl_2b_counting_sft/hf")   # by a name, a repo id or a path containing one
"""

from __future__ import annotations

import copy
import re

_SPECIAL = dict(
    bos_token_id=151643,
    eos_token_id=151645,
    vision_start_token_id=151652,
    vision_end_token_id=151653,
    vision_token_id=151654,
    image_token_id=151655,
    video_token_id=151656,
)


def _qwen2_vl(hidden, inter, layers, heads, kv, vocab, tie) -> dict:
  return dict(
      model_type="qwen2_vl",
      hidden_act="silu",
      hidden_size=hidden,
      intermediate_size=inter,
      num_hidden_layers=layers,
      num_attention_heads=heads,
      num_key_value_heads=kv,
      vocab_size=vocab,
      tie_word_embeddings=tie,
      max_position_embeddings=32768,
      rms_norm_eps=1e-6,
      rope_theta=1000000.0,
      rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
      use_sliding_window=False,
      vision_config=dict(
          depth=32,
          embed_dim=1280,
          mlp_ratio=4,
          num_heads=16,
          in_chans=3,
          hidden_size=hidden,
          patch_size=14,
          spatial_merge_size=2,
          spatial_patch_size=14,
          temporal_patch_size=2,
      ),
      **_SPECIAL,
  )


def _qwen2_5_vl(hidden, inter, layers, heads, kv, vocab, tie) -> dict:
  return dict(
      model_type="qwen2_5_vl",
      hidden_act="silu",
      hidden_size=hidden,
      intermediate_size=inter,
      num_hidden_layers=layers,
      num_attention_heads=heads,
      num_key_value_heads=kv,
      vocab_size=vocab,
      tie_word_embeddings=tie,
      max_position_embeddings=128000,
      rms_norm_eps=1e-6,
      rope_theta=1000000.0,
      rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
      use_sliding_window=False,
      vision_config=dict(
          depth=32,
          hidden_act="silu",
          hidden_size=1280,
          intermediate_size=3420,
          num_heads=16,
          in_chans=3,
          out_hidden_size=hidden,
          patch_size=14,
          spatial_merge_size=2,
          spatial_patch_size=14,
          window_size=112,
          fullatt_block_indexes=[7, 15, 23, 31],
          tokens_per_second=2,
          temporal_patch_size=2,
      ),
      **_SPECIAL,
  )


# name (as configs/paper.py spells it) -> config.json fields
CONFIGS: dict[str, dict] = {
    "qwen2_vl_2b": _qwen2_vl(1536, 8960, 28, 12, 2, 151936, True),
    "qwen2_vl_7b": _qwen2_vl(3584, 18944, 28, 28, 4, 152064, False),
    "qwen2_5_vl_3b": _qwen2_5_vl(2048, 11008, 36, 16, 2, 151936, True),
    "qwen2_5_vl_7b": _qwen2_5_vl(3584, 18944, 28, 28, 4, 152064, False),
}


def normalise(text: str) -> str:
  """'checkpoints/Qwen2.5-VL-3B-Instruct' -> 'checkpoints/qwen2_5_vl_3b_instruct' (what names are matched in)."""
  return re.sub(r"[-.]", "_", text.lower())


def find(*texts: str) -> str | None:
  """The first known name contained in one of `texts` (config name, init_from path, repo id), or None."""
  for t in texts:
    for name in CONFIGS:
      if re.search(rf"(^|[^a-z0-9]){name}($|[^a-z0-9])", normalise(t or "")):
        return name
  return None


def lookup(*texts: str) -> dict:
  """config.json dict of the known model named in `texts`; KeyError listing the known names otherwise."""
  name = find(*texts)
  if name is None:
    raise KeyError(f"no known model name in {texts}; known: {sorted(CONFIGS)} (ekipl_jax/models/known_configs.py)")
  return copy.deepcopy(CONFIGS[name])
