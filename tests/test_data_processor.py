"""Tokenizer folder + processor: offline loading, special ids, chat template, image tokens, padding, SFT layout."""

import io

import numpy as np
import pytest
from PIL import Image
from transformers import AutoProcessor, Qwen2_5_VLProcessor, Qwen2VLProcessor

from ekipl_jax.data import processor as P
from ekipl_jax.data import synthetic as S
from ekipl_jax.data import tokenizer as T
from ekipl_jax.sampling import sampler

CFG = S.SceneConfig(seed=1)
REF_CLASS = {"qwen2_vl": Qwen2VLProcessor, "qwen2_5_vl": Qwen2_5_VLProcessor}


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def folder(request, tmp_path_factory) -> tuple[str, str]:
  corpus = S.corpus(CFG, 200) + P.template_corpus()
  out = T.build_processor_folder(
      corpus, str(tmp_path_factory.mktemp(request.param)), 1024, request.param, min_pixels=56 * 56, max_pixels=224 * 224
  )
  return out, request.param


def _reference(folder: str, family: str):
  """transformers' own processor for the folder. AutoProcessor needs torchvision (for the Qwen2-VL video
  processor); without it, load the same folder through ProcessorMixin.from_pretrained minus the video part."""
  try:
    import torchvision  # noqa: F401

    return AutoProcessor.from_pretrained(folder, local_files_only=True)
  except (ImportError, RuntimeError):
    pass

  class NoVideo(REF_CLASS[family]):

    @classmethod
    def get_attributes(cls):
      return ["image_processor", "tokenizer"]

  return NoVideo.from_pretrained(folder, local_files_only=True)


def _examples(n: int, sizes=((112, 112),)) -> list[dict]:
  out = []
  for i in range(n):
    ex = S.make_example(CFG, "train", i)
    img = Image.open(io.BytesIO(ex.pop("image_png")))
    ex["images"] = [img.resize(sizes[(i + j) % len(sizes)]) for j in range(1 + (i % 2 if len(sizes) > 1 else 0))]
    out.append(ex)
  return out


def test_autoprocessor_loads_offline(folder):
  path, family = folder
  try:
    import torchvision  # noqa: F401

    has_tv = True
  except (ImportError, RuntimeError):
    has_tv = False
  if has_tv:
    proc = AutoProcessor.from_pretrained(path, local_files_only=True)
    assert type(proc).__name__ == T.PROCESSOR_CLASS[family]
  else:  # the only missing piece must be the torchvision video processor
    with pytest.raises(ImportError, match="(?i)torchvision"):
      AutoProcessor.from_pretrained(path, local_files_only=True)
  ref = _reference(path, family)
  assert ref.image_processor.size.shortest_edge == 56 * 56 and ref.image_processor.size.longest_edge == 224 * 224
  assert ref.chat_template == T.CHAT_TEMPLATE


def test_special_token_ids(folder):
  path, family = folder
  ids = T.read_special_token_ids(path)
  proc = P.load(path)
  tok = proc.tokenizer
  assert ids["image_token_id"] == tok.convert_tokens_to_ids("<|image_pad|>") == proc.image_token_id
  assert ids["vision_start_token_id"] == tok.convert_tokens_to_ids("<|vision_start|>")
  assert ids["eos_token_id"] == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
  assert ids["pad_token_id"] == tok.pad_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
  assert ids["vocab_size"] == len(tok) <= 1024
  n_added = len(T.added_tokens(family))
  assert ids["endoftext_token_id"] == len(tok) - n_added  # added tokens follow the BPE vocabulary, Qwen order
  assert tok.encode("<|im_start|>user\n", add_special_tokens=False)[0] == ids["im_start_token_id"]


def test_chat_template_matches_hand_written(folder):
  proc = P.load(folder[0])
  got = P.prompt_string(proc, "How many objects are there?", "counting", 1)
  want = (
      "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
      "<|vision_start|><|image_pad|><|vision_end|>How many objects are there? Output the thinking process in "
      "<think> </think> and final answer (number) in <answer> </answer> tags.<|im_end|>\n"
      "<|im_start|>assistant\n"
  )
  assert got == want
  two = P.prompt_string(proc, "Q", "spatial", 2)
  assert "user\n<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>The first" in two
  assert P.template_key("structure", "B") == "structure_choice" and P.template_key("structure", "3.5") == "structure"


def test_batch_matches_transformers_processor(folder):
  path, family = folder
  proc, ref = P.load(path), _reference(path, family)
  examples = _examples(4, sizes=((112, 112), (84, 140), (200, 150)))
  batch = P.prompt_batch(proc, examples, buckets=[64, 128, 256, 512])
  texts = [P.prompt_string(proc, ex["problem"], ex["task"], len(ex["images"])) for ex in examples]
  want = ref(
      text=texts,
      images=[im for ex in examples for im in ex["images"]],
      return_tensors="np",
      padding="max_length",
      max_length=batch["input_ids"].shape[1],
      padding_side="left",
  )
  for key in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw"):
    np.testing.assert_array_equal(batch[key], want[key], err_msg=key)
  np.testing.assert_allclose(batch["pixel_values"], want["pixel_values"], atol=1e-6)
  # image pad tokens per row == sum over its images of grid_thw.prod() / 4
  grids = iter(batch["image_grid_thw"])
  for b, ex in enumerate(examples):
    n_pad = int((batch["input_ids"][b] == proc.image_token_id).sum())
    assert n_pad == sum(int(np.prod(next(grids))) // 4 for _ in ex["images"]) == batch["mm_token_type_ids"][b].sum()
  assert len(batch["pixel_values"]) == int(batch["image_grid_thw"].prod(-1).sum())


def test_left_padding_and_buckets(folder):
  proc = P.load(folder[0])
  examples = _examples(3)
  ids, _, _ = P.encode_prompts(proc, examples)
  longest = max(len(s) for s in ids)
  buckets = [longest - 1, longest + 5, longest + 50]
  batch = P.prompt_batch(proc, examples, buckets)
  assert batch["input_ids"].shape == (3, longest + 5)
  for b, s in enumerate(ids):
    pad_n = longest + 5 - len(s)
    assert (batch["attention_mask"][b, :pad_n] == 0).all() and (batch["attention_mask"][b, pad_n:] == 1).all()
    assert (batch["input_ids"][b, :pad_n] == proc.pad_token_id).all()
    assert batch["input_ids"][b, pad_n:].tolist() == s
  with pytest.raises(ValueError):
    P.prompt_batch(proc, examples, [longest - 1])


def test_pick_bucket_is_the_one_bucket_rule():
  """Every user of buckets (prompts, SFT targets, sampler patches, packed per-row patch budgets) calls pick_bucket."""
  assert P.pick_bucket(5, [8, 4, 16]) == 8 and P.pick_bucket(8, [8, 16]) == 8  # smallest that fits, any order
  assert P.pick_bucket(24, (36, 64, 128), unit=16) == 64  # 36 fits but is not a multiple of the merge unit
  assert P.pick_bucket(24, (), unit=16) == 32 and P.pick_bucket(32, (), unit=16) == 32  # no buckets: round up
  with pytest.raises(ValueError, match="largest bucket that is a multiple of 16"):
    P.pick_bucket(200, (64, 128), unit=16)
  assert [sampler.patch_bucket(n, 4) for n in (1, 4, 5, 17, 64)] == [4, 4, 8, 32, 64]  # 4 x powers of two


def test_min_max_pixels_from_config(folder):
  small = P.load(folder[0], max_pixels=56 * 56)
  _, grid = P.encode_images(small, [np.zeros((112, 112, 3), np.uint8)])
  assert grid.tolist() == [[1, 4, 4]]
  _, grid = P.encode_images(P.load(folder[0]), [np.zeros((112, 112, 3), np.uint8)])
  assert grid.tolist() == [[1, 8, 8]]


def test_completion_tokens_and_sft_layout(folder):
  proc = P.load(folder[0])
  examples = _examples(3)
  for ex in examples:
    prompt = P.prompt_string(proc, ex["problem"], ex["task"], 1)
    completion = P.sft_target(ex["cot"], ex["answer"])
    joint = P.encode_text(proc, prompt + completion)
    assert joint == P.encode_text(proc, prompt) + P.encode_completion(proc, completion)
  batch = P.sft_batch(proc, examples, [128, 256], [64, 128, 256])
  p_len = int(batch["prompt_length"])
  assert batch["input_ids"].shape[1] == p_len + 128 or batch["input_ids"].shape[1] in (p_len + 64, p_len + 256)
  for b, ex in enumerate(examples):
    target = batch["input_ids"][b][batch["loss_mask"][b] == 1]
    assert proc.tokenizer.decode(target) == P.sft_target(ex["cot"], ex["answer"]) + "<|im_end|>"
    assert (batch["loss_mask"][b, :p_len] == 0).all() and batch["loss_mask"][b, p_len] == 1
    assert ((batch["attention_mask"][b] == 0) <= (batch["loss_mask"][b] == 0)).all()


def _per_example_reference(proc, examples, templates=None):
  """The batch encoding as processor.py did it before it batched its calls: per example, the chat template rendered
  alone, one image-processor call on that example's images, one tokenizer.encode of the expanded prompt."""
  ids, pixels, grids = [], [], []
  for ex in examples:
    text = proc.tokenizer.apply_chat_template(
        P.messages(len(ex["images"]), P.format_question(ex["problem"], ex["task"], ex.get("answer"), templates)),
        chat_template=proc.chat_template,
        tokenize=False,
        add_generation_prompt=True,
    )
    if ex["images"]:
      out = proc.image_processor(images=[np.asarray(im) for im in ex["images"]], return_tensors="np")
      px, grid = np.asarray(out["pixel_values"], np.float32), np.asarray(out["image_grid_thw"], np.int64)
    else:
      px, grid = np.zeros((0, 1176), np.float32), np.zeros((0, 3), np.int64)
    ids.append(proc.tokenizer.encode(P.expand_image_tokens(proc, text, grid), add_special_tokens=False))
    pixels.append(px)
    grids.append(grid)
  return ids, np.concatenate(pixels), np.concatenate(grids)


@pytest.mark.parametrize("max_pixels", [112 * 112, 224 * 224])
def test_batched_encoding_equals_per_example_calls(folder, max_pixels):
  """Same token ids and the same pixels to the bit as per-example calls of the tokenizer and the HF image processor:
  kept-size images (numpy and PIL, the processor's own steps without its call), images it resizes (84x140, 200x150,
  and 112x112 when max_pixels is 56x56), an example with two images and one with none."""
  proc = P.load(folder[0], min_pixels=56 * 56, max_pixels=max_pixels)
  examples = _examples(6, sizes=((112, 112), (84, 140), (200, 150), (112, 112)))
  examples[1]["images"] = [np.asarray(im) for im in examples[1]["images"]]  # numpy arrays, as TFDS gives them
  examples[4]["images"] = []
  examples[5]["images"] = [np.asarray(examples[5]["images"][0].resize((56, 56)))]
  images = [im for ex in examples for im in ex["images"]]
  kept = [P._kept_size(proc.image_processor, im, np.asarray(im)) for im in images]
  assert 0 < sum(kept) < len(images)  # both paths of encode_images are taken
  want_ids, want_px, want_grid = _per_example_reference(proc, examples)
  ids, px, grid = P.encode_prompts(proc, examples)
  assert ids == want_ids
  np.testing.assert_array_equal(grid, want_grid)
  assert px.dtype == want_px.dtype == np.float32
  np.testing.assert_array_equal(px, want_px)
  small = P.load(folder[0], min_pixels=56 * 56, max_pixels=56 * 56)  # every 112 px image is resized here
  assert P.encode_prompts(small, examples)[0] == _per_example_reference(small, examples)[0]
  np.testing.assert_array_equal(P.encode_prompts(small, examples)[1], _per_example_reference(small, examples)[1])
  # SFT targets: one batch call equals encode_completion(..., add_eos=True) per example.
  batch = P.sft_batch(proc, examples, [256, 512], [256])
  p_len = int(batch["prompt_length"])
  for b, ex in enumerate(examples):
    want = P.encode_completion(proc, P.sft_target(ex["cot"], ex["answer"]), add_eos=True)
    assert batch["input_ids"][b, p_len : p_len + len(want)].tolist() == want
    assert batch["loss_mask"][b, p_len:].sum() == len(want)
