"""Train a small byte-level BPE tokenizer locally and write a Qwen2-VL / Qwen2.5-VL processor folder.

The folder has what the Qwen checkpoints ship: tokenizer.json + tokenizer_config.json (Qwen2Tokenizer, byte-level
BPE with Qwen's pre-tokenizer regex, NFC), chat_template.jinja (Qwen-VL's template, verbatim), and
preprocessor_config.json / video_preprocessor_config.json (Qwen2VLImageProcessor, min/max pixels). Special tokens
follow the BPE vocabulary in Qwen's order, so their ids are `num_bpe + offset` (recorded in special_tokens.json,
which a model config reads for image_token_id, vision_start_token_id, eos/pad).
"""

import json
import os
from typing import Iterable

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

# Qwen2's pre-tokenizer regex (transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX).
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)

QWEN2_VL_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Qwen2.5-VL adds these (not special: they are ordinary text the model may emit).
QWEN2_5_VL_EXTRA = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)

# Qwen2-VL / Qwen2.5-VL Instruct chat template (as shipped with the checkpoints): a default system turn when the
# first message is not a system message; images as <|vision_start|><|image_pad|><|vision_end|> in content order.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

PROCESSOR_CLASS = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def added_tokens(family: str) -> list[tuple[str, bool]]:
  """(content, special) in id order after the BPE vocabulary."""
  if family not in PROCESSOR_CLASS:
    raise ValueError(f"family must be one of {sorted(PROCESSOR_CLASS)}, got {family!r}")
  extra = QWEN2_5_VL_EXTRA if family == "qwen2_5_vl" else ()
  return [(t, True) for t in QWEN2_VL_SPECIALS] + [(t, False) for t in extra]


def train_tokenizer(corpus: Iterable[str], vocab_size: int, family: str = "qwen2_5_vl") -> Tokenizer:
  """Byte-level BPE with `vocab_size` ids in total (BPE merges + the family's added tokens at the end)."""
  added = added_tokens(family)
  tok = Tokenizer(models.BPE())
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence(
      [
          pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
          pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
      ]
  )
  tok.decoder = decoders.ByteLevel()
  num_bpe = vocab_size - len(added)
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  if num_bpe < len(alphabet):
    raise ValueError(f"vocab_size {vocab_size} leaves fewer than {len(alphabet)} ids for the byte alphabet")
  trainer = trainers.BpeTrainer(vocab_size=num_bpe, initial_alphabet=alphabet, show_progress=False)
  tok.train_from_iterator(list(corpus), trainer)
  tok.add_tokens([AddedToken(t, special=s, normalized=False) for t, s in added])
  return tok


def special_token_ids(tok: Tokenizer) -> dict[str, int]:
  """The ids a model config / generation config needs."""
  ids = {
      name: tok.token_to_id(t)
      for name, t in [
          ("image_token_id", "<|image_pad|>"),
          ("video_token_id", "<|video_pad|>"),
          ("vision_start_token_id", "<|vision_start|>"),
          ("vision_end_token_id", "<|vision_end|>"),
          ("eos_token_id", "<|im_end|>"),
          ("pad_token_id", "<|endoftext|>"),
          ("im_start_token_id", "<|im_start|>"),
          ("endoftext_token_id", "<|endoftext|>"),
      ]
  }
  return {**ids, "vocab_size": tok.get_vocab_size(with_added_tokens=True)}


def build_processor_folder(
    corpus: Iterable[str],
    out_dir: str,
    vocab_size: int = 1024,
    family: str = "qwen2_5_vl",
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280,
) -> str:
  """Writes an HF processor folder for `family` (qwen2_vl | qwen2_5_vl); returns out_dir."""
  corpus = list(corpus) + [CHAT_TEMPLATE]
  tok = train_tokenizer(corpus, vocab_size, family)
  os.makedirs(out_dir, exist_ok=True)
  tok.save(os.path.join(out_dir, "tokenizer.json"))
  ids = special_token_ids(tok)
  proc_cls = PROCESSOR_CLASS[family]
  decoder = {
      str(tok.token_to_id(t)): {
          "content": t,
          "lstrip": False,
          "normalized": False,
          "rstrip": False,
          "single_word": False,
          "special": s,
      }
      for t, s in added_tokens(family)
  }
  tok_config = {
      "tokenizer_class": "Qwen2Tokenizer",
      "processor_class": proc_cls,
      "added_tokens_decoder": decoder,
      "bos_token": None,
      "eos_token": "<|im_end|>",
      "pad_token": "<|endoftext|>",
      "unk_token": None,
      "additional_special_tokens": [t for t, s in added_tokens(family) if s and t not in ("<|endoftext|>",)],
      "model_max_length": 32768,
      "errors": "replace",
      "split_special_tokens": False,
      "clean_up_tokenization_spaces": False,
      "add_prefix_space": False,
  }
  image_config = {
      "image_processor_type": "Qwen2VLImageProcessor",
      "processor_class": proc_cls,
      "min_pixels": min_pixels,
      "max_pixels": max_pixels,
      "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
      "patch_size": 14,
      "temporal_patch_size": 2,
      "merge_size": 2,
      "image_mean": CLIP_MEAN,
      "image_std": CLIP_STD,
      "do_resize": True,
      "do_rescale": True,
      "rescale_factor": 1 / 255,
      "do_normalize": True,
      "do_convert_rgb": True,
      "resample": 3,
  }
  video_config = {**image_config, "video_processor_type": "Qwen2VLVideoProcessor"}
  del video_config["image_processor_type"]
  files = {
      "tokenizer_config.json": tok_config,
      "preprocessor_config.json": image_config,
      "video_preprocessor_config.json": video_config,
      "special_tokens.json": {"family": family, **ids},
  }
  for name, obj in files.items():
    with open(os.path.join(out_dir, name), "w") as f:
      json.dump(obj, f, indent=2)
  with open(os.path.join(out_dir, "chat_template.jinja"), "w") as f:
    f.write(CHAT_TEMPLATE)
  return out_dir


def read_special_token_ids(folder: str) -> dict:
  with open(os.path.join(folder, "special_tokens.json")) as f:
    return json.load(f)
