"""TFDS builders: `reason_rft_cot` (the local Reason-RFT-CoT folder, manual_dir) and `synthetic_reasoning`.

Both write array_record files (random access: `builder.as_data_source(split)`; order = file / generation order,
shuffling disabled) with one schema (strings come back as bytes from a data source; `iterate` decodes them):

  id        str   unique, split-prefixed for synthetic data ("train-000003"); the dataset's own id otherwise
  images    list of 1 or 2 uint8 arrays [H, W, 3]; two for TRANCE (initial state, final state)
  image     [1 or 2] str   the relative path(s) as written in the JSON
  problem   str   the question, without prompt template
  answer    str   the ground-truth answer ("3", "B", "change_color(1, red)...")
  solution  str   the RL-format target; Reason-RFT's RL JSON uses the bare answer ("solution": "{answer}")
  cot       str   chain of thought ("" when the file has none, e.g. most test files)
  task      str   counting | structure | spatial
  metadata  str   JSON; synthetic scenes: objects + question; Reason-RFT: the record's other fields

Reason-RFT folder layout (from the public repository's README; the JSON is read as the RL trainer reads it,
`load_dataset("json")` = a top-level list of records, images joined to an image root):

  <manual_dir>/train_jsons/A3-Visual-Counting-train-35k-cot.json, ...   image paths relative to images/train_images/
  <manual_dir>/test_jsons/Visual-Counting-id-test-1k.json, ...          image paths relative to images/test_images/

`image` may be a string, a list of strings, or {"path": ...} (all seen in Reason-RFT's loader).
"""

import concurrent.futures
import dataclasses
import io
import json
import os
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from ekipl_jax.data import synthetic

FILE_FORMAT = "array_record"

REASON_RFT_FILES: dict[str, dict[str, str]] = {
    "counting": {
        "train": "A3-Visual-Counting-train-35k-cot.json",
        "test_id": "Visual-Counting-id-test-1k.json",
        "test_ood": "Visual-Counting-ood-test-1k.json",
    },
    "structure": {
        "train": "A2-Structure-Perception-train-4k5-cot.json",
        "test_id": "Structure-Perception-id-test-820.json",
        "test_ood": "Structure-Perception-ood-test-800.json",
    },
    "spatial": {
        "train": "A1-Spatial-Transformation-train-60k-cot.json",
        "test_id": "Spatial-Transformation-id-test-1k.json",
        "test_ood_left": "Spatial-Transformation-ood-left-test-1k.json",
        "test_ood_right": "Spatial-Transformation-ood-right-test-1k.json",
    },
}


def json_path(root: str, split: str, file_name: str) -> str:
  return os.path.join(root, "train_jsons" if split == "train" else "test_jsons", file_name)


def image_root(root: str, split: str) -> str:
  return os.path.join(root, "images", "train_images" if split == "train" else "test_images")


def _features() -> tfds.features.FeaturesDict:
  text = tfds.features.Text()
  return tfds.features.FeaturesDict(
      {
          "id": text,
          "images": tfds.features.Sequence(tfds.features.Image(shape=(None, None, 3))),
          "image": tfds.features.Sequence(text),
          "problem": text,
          "answer": text,
          "solution": text,
          "cot": text,
          "task": text,
          "metadata": text,
      }
  )


class RecordError(ValueError):
  """A malformed record or a missing image; the message names the file and the record id."""


# ---------------------------------------------------------------------------------------------- reason_rft_cot
def _image_paths(rec: dict, where: str) -> list[str]:
  img = rec.get("image")
  items = img if isinstance(img, list) else [img]
  paths = [it["path"] if isinstance(it, dict) and isinstance(it.get("path"), str) else it for it in items]
  if not paths or len(paths) > 2 or not all(isinstance(p, str) and p for p in paths):
    raise RecordError(f"{where}: field 'image' must be a path or a list of 1-2 paths, got {img!r}")
  return paths


def parse_record(rec: Any, task: str, file_path: str, index: int, img_root: str) -> dict:
  """One JSON record -> one example dict (fields checked, answer non-empty, image paths resolved and present; the
  images are decoded by read_reason_rft_file)."""
  rec_id = rec.get("id") if isinstance(rec, dict) else None
  where = f"{file_path} (record #{index}, id={rec_id!r})"
  if not isinstance(rec, dict):
    raise RecordError(f"{where}: record must be a JSON object, got {type(rec).__name__}")
  for key in ("id", "image", "problem"):
    if key not in rec or rec[key] in (None, ""):
      raise RecordError(f"{where}: missing field {key!r}")
  answer = rec.get("answer", rec.get("solution"))
  if answer is None or not isinstance(rec["problem"], str):
    raise RecordError(f"{where}: needs a string 'problem' and an 'answer' or 'solution'")
  if not str(answer).strip():
    raise RecordError(f"{where}: empty answer ({'answer' if 'answer' in rec else 'solution'} is {answer!r})")
  rel = _image_paths(rec, where)
  full = [p if os.path.isabs(p) else os.path.join(img_root, p) for p in rel]
  for p in full:
    if not os.path.isfile(p):
      raise RecordError(f"{where}: image not found: {p}")
  known = {"id", "image", "problem", "answer", "solution", "cot"}
  return {
      "id": str(rec["id"]),
      "images": full,
      "image": rel,
      "problem": rec["problem"],
      "answer": str(answer),
      "solution": str(rec.get("solution", answer)),
      "cot": str(rec.get("cot") or ""),
      "task": task,
      "metadata": json.dumps({k: v for k, v in rec.items() if k not in known}, sort_keys=True, default=str),
  }


def read_reason_rft_file(file_path: str, task: str, img_root: str) -> list[dict]:
  if not os.path.isfile(file_path):
    raise FileNotFoundError(f"Reason-RFT file not found: {file_path}")
  with open(file_path) as f:
    try:
      records = json.load(f)
    except json.JSONDecodeError as e:
      raise RecordError(f"{file_path}: not valid JSON ({e})") from e
  if not isinstance(records, list):
    raise RecordError(f"{file_path}: expected a top-level list of records, got {type(records).__name__}")
  examples = [parse_record(r, task, file_path, i, img_root) for i, r in enumerate(records)]
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # PIL decodes without the GIL
    wheres = [f"{file_path} (record #{i}, id={ex['id']!r})" for i, ex in enumerate(examples)]
    for _ in pool.map(_decode_images, [ex["images"] for ex in examples], wheres):
      pass  # the first failure in file order is raised here, before anything is written
  return examples


def _decode_images(paths: list[str], where: str) -> None:
  """Decode each image fully (a corrupt or truncated file fails here, naming the record and the file)."""
  for p in paths:
    try:
      with Image.open(p) as im:
        im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
      raise RecordError(f"{where}: cannot decode image {p}: {e}") from None


class ReasonRftCot(tfds.core.GeneratorBasedBuilder):
  """Reason-RFT-CoT (tanhuajie2001/Reason-RFT-CoT-Dataset) from a local copy given as manual_dir."""

  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Download tanhuajie2001/Reason-RFT-CoT-Dataset, unzip train_images.zip and "
      "test_images.zip, and pass the folder as manual_dir."
  )
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name=task, description=f"Reason-RFT {task} task") for task in REASON_RFT_FILES
  ]

  def __init__(self, **kwargs):
    kwargs.setdefault("file_format", FILE_FORMAT)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(features=_features(), description=__doc__, disable_shuffling=True)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = os.fspath(dl_manager.manual_dir)
    task = self.builder_config.name
    return {
        split: self._generate_examples(json_path(root, split, name), task, image_root(root, split))
        for split, name in REASON_RFT_FILES[task].items()
    }

  def _generate_examples(self, file_path: str, task: str, img_root: str):
    for ex in read_reason_rft_file(file_path, task, img_root):  # all records are checked before writing
      yield ex["id"], ex


# ---------------------------------------------------------------------------------------------- synthetic
@dataclasses.dataclass
class SyntheticConfig(tfds.core.BuilderConfig):
  seed: int = 0  # generator seed
  num_train: int = 2000  # examples per split
  num_test_id: int = 200
  num_test_ood: int = 200
  image_size: int = 112  # square image side (px)
  cell: int = 28  # grid cell (px); 28 = one merged vision token
  min_objects: int = 2  # in-distribution object range
  max_objects: int = 6
  ood_min_objects: int = 0  # test_ood: [ood_min_objects (0: max_objects + 1), ood_max_objects] objects + held-out pairs
  ood_max_objects: int = 9
  teacher_blind: str = ""  # train split: objects the flawed SFT teacher misses, e.g. "small cylinder" (see synthetic)
  teacher_miss_rate: float = 0.0  # probability that the teacher misses each such object
  teacher_flaw: str = "miss"  # what the teacher gets wrong: "miss" | "uncounted" (see synthetic)
  ood_held_out: str = "some"  # test_ood: "some" (1..n held-out pairs per scene) | "one" (see synthetic)
  question_kinds: tuple[str, ...] = synthetic.QUESTION_KINDS  # kinds of question drawn (uniformly)

  def scene_config(self) -> synthetic.SceneConfig:
    return synthetic.SceneConfig(
        seed=self.seed,
        image_size=self.image_size,
        cell=self.cell,
        min_objects=self.min_objects,
        max_objects=self.max_objects,
        ood_min_objects=self.ood_min_objects,
        ood_max_objects=self.ood_max_objects,
        teacher_blind=self.teacher_blind,
        teacher_miss_rate=self.teacher_miss_rate,
        teacher_flaw=self.teacher_flaw,
        ood_held_out=self.ood_held_out,
        question_kinds=tuple(self.question_kinds),
    )


class SyntheticReasoning(tfds.core.GeneratorBasedBuilder):
  """CLEVR-Math-like counting scenes generated offline from a seed (see ekipl_jax.data.synthetic)."""

  VERSION = tfds.core.Version("1.2.0")  # 1.2.0: counts by colour, OOD range; 1.1.0: enumeration, flawed teacher
  BUILDER_CONFIGS = [SyntheticConfig(name="default", description="112 px, 2-6 objects, OOD 7-9")]

  def __init__(self, **kwargs):
    kwargs.setdefault("file_format", FILE_FORMAT)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(features=_features(), description=synthetic.__doc__, disable_shuffling=True)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    c = self.builder_config
    sizes = {"train": c.num_train, "test_id": c.num_test_id, "test_ood": c.num_test_ood}
    return {split: self._generate_examples(split, n) for split, n in sizes.items()}

  def _generate_examples(self, split: str, n: int):
    cfg = self.builder_config.scene_config()
    for i in range(n):
      ex = synthetic.make_example(cfg, split, i)
      png = ex.pop("image_png")
      yield ex["id"], {**ex, "images": [_decode_png(png)], "image": [ex["image"]]}


def _decode_png(png: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


# ---------------------------------------------------------------------------------------------- helpers
def prepare_reason_rft(manual_dir: str, data_dir: str, task: str = "counting") -> ReasonRftCot:
  builder = ReasonRftCot(config=task, data_dir=data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def prepare_synthetic(data_dir: str, config: SyntheticConfig | None = None) -> SyntheticReasoning:
  builder = SyntheticReasoning(config=config or "default", data_dir=data_dir)
  builder.download_and_prepare()
  return builder


def example_ids(builder: tfds.core.DatasetBuilder, split: str) -> list[str]:
  """The ids of a split in file order, read from the records without decoding their images (fast)."""
  src = builder.as_data_source(split=split, deserialize_method=tfds.decode.DeserializeMethod.DESERIALIZE_NO_DECODE)
  return [src[i].features.feature["id"].bytes_list.value[0].decode() for i in range(len(src))]


def iterate(source, indices: Iterator[int] | None = None) -> Iterator[dict]:
  """Examples of a data source as python values (bytes -> str), in index order."""
  for i in (range(len(source)) if indices is None else indices):
    ex = source[i]
    yield {
        k: (v.decode() if isinstance(v, bytes) else [x.decode() for x in v] if k == "image" else v)
        for k, v in ex.items()
    }
