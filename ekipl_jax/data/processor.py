"""Reason-RFT prompts -> token ids + pixels, in the layout the transformers Qwen2-VL / Qwen2.5-VL processor returns.

  prompt:      chat template (user turn: images first, then the task template around the problem; no system message
               is passed, the Qwen template adds its default one) + add_generation_prompt
  images:      the checkpoint's image processor (Qwen2VLImageProcessor, PIL backend; min/max pixels from config);
               an image it keeps at its size skips its per-call machinery (encode_images: same pixels to the bit)
  expansion:   each <|image_pad|> becomes grid_thw.prod() / merge_size**2 copies (as Qwen2VLProcessor does)
  batches:     prompts left padded to the smallest bucket >= the longest prompt; completions right padded

Shape legend: B rows, P prompt tokens, C completion tokens, T = P + C, N vision patches (all images of the batch),
F = 3 * temporal_patch * patch**2 pixel features, I images in the batch.
"""

import dataclasses
import os
from typing import Sequence

import numpy as np
from transformers import AutoImageProcessor, AutoTokenizer
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_qwen2_vl_pil

# Reason-RFT user prompts (docs/METHOD.md sect. 5.2). `{Question}` is replaced by the record's problem.
PROMPT_TEMPLATES: dict[str, str] = {
    "counting": "{Question} Output the thinking process in <think> </think> and final answer (number) in "
    "<answer> </answer> tags.",
    "structure_choice": "{Question} Please select the correct answer by writing the letter (A, B, C or D) that "
    "precedes your choice.\nOutput the thinking process in <think> </think> and final answer "
    "(chosen letter) in <answer> </answer> tags.",
    "structure": "{Question} Output the thinking process in <think> </think> and final answer (float number or int "
    "number) in <answer> </answer> tags.",
    # Our paraphrase of the TRANCE rules (the original text is longer; paste it into the config to reproduce).
    "spatial": "The first image shows the initial state and the second image the final state. The initial objects "
    "are given as tuples ('object_id', 'shape', 'size', 'color', 'material'). Find the transformation "
    "as a sequence of 1 to 4 functions func(object_id, value), with func in change_size (small, medium, "
    "large), change_color (yellow, gray, cyan, blue, brown, green, red, purple), change_material "
    "(glass, metal, rubber), change_shape (cube, sphere, cylinder), change_position (front, behind, "
    "left, right, front_left, front_right, behind_left, behind_right). Write the reasoning in <think> "
    "</think> and only the functions in <answer> </answer>.\n{Question} Output the thinking process in "
    "<think> </think> and final answer in <answer> </answer> tags.",
}


def template_key(task: str, answer: str | None) -> str:
  """GeoMath items whose answer is a letter A-D use the multiple-choice template."""
  if task == "structure" and answer is not None and answer.strip() in ("A", "B", "C", "D"):
    return "structure_choice"
  return task


def format_question(problem: str, task: str, answer: str | None = None, templates: dict[str, str] | None = None) -> str:
  templates = PROMPT_TEMPLATES if templates is None else templates
  return templates[template_key(task, answer)].format(Question=problem)


def sft_target(cot: str, answer: str) -> str:
  return f"<think>\n{cot}\n</think>\n<answer>\n{answer}\n</answer>"


def messages(num_images: int, text: str) -> list[dict]:
  return [{"role": "user", "content": [{"type": "image"}] * num_images + [{"type": "text", "text": text}]}]


# ---------------------------------------------------------------------------------------------- the processor
@dataclasses.dataclass
class Processor:
  tokenizer: object  # transformers Qwen2Tokenizer
  image_processor: object  # Qwen2VLImageProcessor(Pil)
  chat_template: str
  image_token: str = "<|image_pad|>"

  @property
  def image_token_id(self) -> int:
    return self.tokenizer.convert_tokens_to_ids(self.image_token)

  @property
  def pad_token_id(self) -> int:
    return self.tokenizer.pad_token_id

  @property
  def eos_token_id(self) -> int:
    return self.tokenizer.eos_token_id


def load(folder: str, min_pixels: int | None = None, max_pixels: int | None = None) -> Processor:
  """Tokenizer, image processor and chat template of a checkpoint/processor folder (offline)."""
  kwargs = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
  image_processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True, backend="pil", **kwargs)
  tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
  template_path = os.path.join(folder, "chat_template.jinja")
  if os.path.isfile(template_path):
    with open(template_path) as f:
      template = f.read()
  else:
    template = tokenizer.chat_template
  return Processor(tokenizer, image_processor, template)


def prompt_string(
    proc: Processor,
    problem: str,
    task: str,
    num_images: int,
    answer: str | None = None,
    templates: dict[str, str] | None = None,
) -> str:
  return prompt_strings(proc, [(problem, task, num_images, answer)], templates)[0]


def prompt_strings(
    proc: Processor, items: Sequence[tuple[str, str, int, str | None]], templates: dict[str, str] | None = None
) -> list[str]:
  """prompt_string of each (problem, task, num_images, answer), the chat template rendered in one call."""
  convs = [messages(n, format_question(problem, task, answer, templates)) for problem, task, n, answer in items]
  if not convs:
    return []
  return proc.tokenizer.apply_chat_template(
      convs, chat_template=proc.chat_template, tokenize=False, add_generation_prompt=True
  )


def encode_images(proc: Processor, images: Sequence) -> tuple[np.ndarray, np.ndarray]:
  """-> pixel_values_NxF float32, image_grid_thw_Ix3 int64 (images in order, patches concatenated).

  An image the processor would keep at its size (`_kept_size`: uint8 RGB whose sides are already what its
  smart_resize picks) goes through the processor's own rescale / normalize / patchify methods without its per-call
  machinery (format checks, RGB conversion and a same-size PIL resize: a copy); the others through the processor
  in one call. The pixels are those of the processor called on each image (tests/test_data_processor.py)."""
  if not images:
    return np.zeros((0, 3 * 2 * 14 * 14), np.float32), np.zeros((0, 3), np.int64)
  ip = proc.image_processor
  arrays = [np.asarray(im) for im in images]
  kept = [_kept_size(ip, im, a) for im, a in zip(images, arrays)]
  out = [None] * len(arrays)
  rest = [i for i, k in enumerate(kept) if not k]
  if rest:
    hf = ip(images=[arrays[i] for i in rest], return_tensors="np")
    grids = np.asarray(hf["image_grid_thw"], np.int64)
    starts = np.concatenate([[0], np.cumsum(grids.prod(-1))])
    for j, i in enumerate(rest):
      out[i] = (np.asarray(hf["pixel_values"][starts[j] : starts[j + 1]], np.float32), grids[j])
  for i, k in enumerate(kept):
    if k:
      out[i] = _patches(ip, arrays[i])
  return np.concatenate([px for px, _ in out]), np.stack([g for _, g in out]).astype(np.int64)


def _kept_size(ip, image, array: np.ndarray) -> bool:
  """Whether the PIL-backend Qwen2-VL processor leaves `image` at its size and RGB (then `_patches` equals it)."""
  if type(ip) is not hf_qwen2_vl_pil.Qwen2VLImageProcessorPil or not (
      ip.do_resize and ip.do_rescale and ip.do_normalize
  ):
    return False
  if getattr(image, "mode", "RGB") != "RGB" or array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
    return False
  h, w = array.shape[:2]
  factor = ip.patch_size * ip.merge_size
  size = hf_qwen2_vl_pil.smart_resize(
      h, w, factor=factor, min_pixels=ip.size.shortest_edge, max_pixels=ip.size.longest_edge
  )
  return tuple(size) == (h, w)


def _patches(ip, image_HWC: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """One kept-size image through the processor's own steps (channels first, as it runs them)."""
  x = ip.normalize(ip.rescale(np.moveaxis(image_HWC, -1, 0), ip.rescale_factor), ip.image_mean, ip.image_std)
  px, gh, gw = ip.patchify(
      x, patch_size=ip.patch_size, merge_size=ip.merge_size, temporal_patch_size=ip.temporal_patch_size
  )
  return np.asarray(px, np.float32), np.array([1, gh, gw], np.int64)


def expand_image_tokens(proc: Processor, text: str, image_grid_thw_Ix3: np.ndarray) -> str:
  """Each <|image_pad|> -> grid.prod() // merge**2 copies, in order (Qwen2VLProcessor.replace_image_token)."""
  parts = text.split(proc.image_token)
  if len(parts) - 1 != len(image_grid_thw_Ix3):
    raise ValueError(f"{len(parts) - 1} image tokens in the text but {len(image_grid_thw_Ix3)} images")
  merge = proc.image_processor.merge_size**2
  counts = [int(np.prod(g)) // merge for g in image_grid_thw_Ix3]
  return parts[0] + "".join(proc.image_token * n + p for n, p in zip(counts, parts[1:]))


def encode_text(proc: Processor, text: str) -> list[int]:
  return proc.tokenizer.encode(text, add_special_tokens=False)


def encode_texts(proc: Processor, texts: Sequence[str]) -> list[list[int]]:
  """encode_text of each text, in one call of the fast tokenizer (its batch encoding)."""
  if not texts:
    return []
  return [list(ids) for ids in proc.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def encode_completion(proc: Processor, text: str, add_eos: bool = False) -> list[int]:
  """Token ids of a completion as it sits after the prompt (the prompt ends with "assistant\\n", a pre-token
  boundary, so this equals the tail of encoding prompt + text together); external responses use this."""
  ids = encode_text(proc, text)
  return ids + [proc.eos_token_id] if add_eos else ids


def pick_bucket(length: int, buckets: Sequence[int], unit: int = 1) -> int:
  """The smallest of `buckets` that is >= length and a multiple of `unit`; with no buckets, length rounded up to a
  multiple of `unit`. Padding to a bucket lets varying lengths reuse one compilation per bucket. The package's one
  bucket rule: prompt and SFT target lengths (here), the sampler's prompts and image patches (sampling/sampler.py)
  and the training batch's per-row patch budget (models/packed.py)."""
  fits = [b for b in sorted(buckets) if b >= length and b % unit == 0]
  if fits:
    return int(fits[0])
  if not len(buckets):
    return -(-length // unit) * unit
  multiple = f" that is a multiple of {unit}" if unit > 1 else ""
  raise ValueError(f"length {length} is longer than the largest bucket{multiple} in {tuple(buckets)}")


def bucket_for(
    examples: Sequence[dict], seqs: Sequence[Sequence[int]], buckets: Sequence[int], what: str, config_key: str
) -> int:
  """The bucket of the longest sequence; sequences longer than every bucket are an error naming their ids."""
  too_long = [_str(ex.get("id")) for ex, s in zip(examples, seqs) if len(s) > max(buckets)]
  if too_long:
    raise ValueError(
        f"{what} longer than {max(buckets)} tokens (config key {config_key}) for example ids " f"{too_long}"
    )
  return pick_bucket(max(len(s) for s in seqs), buckets)


def pad(seqs: Sequence[Sequence[int]], length: int, pad_id: int, side: str) -> tuple[np.ndarray, np.ndarray]:
  """-> ids_BxL int32, mask_BxL int32."""
  ids_BL = np.full((len(seqs), length), pad_id, np.int32)
  mask_BL = np.zeros((len(seqs), length), np.int32)
  for b, s in enumerate(seqs):
    if len(s) > length:
      raise ValueError(f"row {b} has {len(s)} tokens > {length}")
    sl = slice(length - len(s), length) if side == "left" else slice(0, len(s))
    ids_BL[b, sl], mask_BL[b, sl] = s, 1
  return ids_BL, mask_BL


# ---------------------------------------------------------------------------------------------- batches
def encode_prompts(
    proc: Processor, examples: Sequence[dict], templates: dict[str, str] | None = None
) -> tuple[list[list[int]], np.ndarray, np.ndarray]:
  """examples: dicts with images (list of HxWx3 arrays or PIL images), problem, task, answer (optional).
  -> unpadded prompt ids per row, pixel_values_NxF, image_grid_thw_Ix3."""
  images = [list(ex["images"]) for ex in examples]
  texts = prompt_strings(
      proc,
      [(_str(ex["problem"]), _str(ex["task"]), len(im), _str(ex.get("answer"))) for ex, im in zip(examples, images)],
      templates,
  )
  pixel_values_NxF, grid_Ix3 = encode_images(proc, [im for row in images for im in row])
  first = np.concatenate([[0], np.cumsum([len(im) for im in images])])
  expanded = [expand_image_tokens(proc, t, grid_Ix3[first[b] : first[b + 1]]) for b, t in enumerate(texts)]
  return encode_texts(proc, expanded), pixel_values_NxF, grid_Ix3


def prompt_batch(
    proc: Processor, examples: Sequence[dict], buckets: Sequence[int], templates: dict[str, str] | None = None
) -> dict[str, np.ndarray]:
  """-> input_ids [B, P], attention_mask [B, P], mm_token_type_ids [B, P] (1 at image tokens), pixel_values
  [N, F], image_grid_thw [I, 3]; prompts left padded, P = the smallest bucket >= the longest prompt."""
  ids, pixel_values_NxF, grid_Ix3 = encode_prompts(proc, examples, templates)
  length = bucket_for(examples, ids, buckets, "prompt", "data.prompt_buckets")
  input_ids_BP, mask_BP = pad(ids, length, proc.pad_token_id, "left")
  mm_BP = ((input_ids_BP == proc.image_token_id) & (mask_BP == 1)).astype(np.int32)
  return {
      "input_ids": input_ids_BP,
      "attention_mask": mask_BP,
      "mm_token_type_ids": mm_BP,
      "pixel_values": pixel_values_NxF,
      "image_grid_thw": grid_Ix3,
  }


def sft_batch(
    proc: Processor,
    examples: Sequence[dict],
    prompt_buckets: Sequence[int],
    completion_buckets: Sequence[int],
    templates: dict[str, str] | None = None,
) -> dict[str, np.ndarray]:
  """Prompt (left padded to P) + "<think>\\n{cot}\\n</think>\\n<answer>\\n{answer}\\n</answer>" + eos (right
  padded to C). Adds loss_mask [B, T] (1 on completion tokens, eos included) and prompt_length = P; the layout is
  the RL one, so log-probs of the targets start at T - C = P."""
  batch = prompt_batch(proc, examples, prompt_buckets, templates)
  targets = encode_texts(proc, [sft_target(_str(ex["cot"]), _str(ex["answer"])) for ex in examples])
  completions = [ids + [proc.eos_token_id] for ids in targets]  # encode_completion(..., add_eos=True) of each
  c_len = bucket_for(examples, completions, completion_buckets, "SFT target", "sft.max_completion")
  comp_BC, comp_mask_BC = pad(completions, c_len, proc.pad_token_id, "right")
  input_ids_BT = np.concatenate([batch["input_ids"], comp_BC], 1)
  return {
      **batch,
      "input_ids": input_ids_BT,
      "attention_mask": np.concatenate([batch["attention_mask"], comp_mask_BC], 1),
      "mm_token_type_ids": np.concatenate([batch["mm_token_type_ids"], np.zeros_like(comp_BC)], 1),
      "loss_mask": np.concatenate([np.zeros_like(batch["attention_mask"]), comp_mask_BC], 1),
      "prompt_length": np.int32(batch["input_ids"].shape[1]),
  }


def template_corpus(templates: dict[str, str] | None = None) -> list[str]:
  """Prompt texts for tokenizer training."""
  return list((PROMPT_TEMPLATES if templates is None else templates).values())


def _str(x) -> str | None:
  return x.decode() if isinstance(x, bytes) else x
