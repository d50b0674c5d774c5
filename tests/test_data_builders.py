"""TFDS builders on a fixture folder in the exact Reason-RFT layout, and the synthetic builder."""

import json
import os
import shutil
import sys

import numpy as np
import pytest
from PIL import Image

from ekipl_jax.data import builders, synthetic

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "fixtures", "reason_rft"))
import make_fixture  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
  return make_fixture.write_fixture(str(tmp_path_factory.mktemp("Reason-RFT-CoT-Dataset")))


@pytest.mark.parametrize("task", ["counting", "spatial", "structure"])
def test_records_round_trip(folder, tmp_path, task):
  builder = builders.prepare_reason_rft(folder, str(tmp_path), task)
  for split, name in builders.REASON_RFT_FILES[task].items():
    path = builders.json_path(folder, split, name)
    with open(path) as f:
      want = json.load(f)
    got = list(builders.iterate(builder.as_data_source(split)))
    assert [g["id"] for g in got] == [w["id"] for w in want]  # file order kept
    for g, w in zip(got, want):
      rel = w["image"] if isinstance(w["image"], list) else [w["image"]]
      assert g["image"] == rel and len(g["images"]) == (2 if task == "spatial" else 1)
      assert (g["problem"], g["answer"], g["solution"], g["cot"], g["task"]) == (
          w["problem"],
          w["answer"],
          w["answer"],
          w.get("cot", ""),
          task,
      )
      for arr_HW3, r in zip(g["images"], rel):
        png_HW3 = np.asarray(Image.open(os.path.join(builders.image_root(folder, split), r)).convert("RGB"))
        np.testing.assert_array_equal(arr_HW3, png_HW3)


def _copy(folder: str, tmp_path) -> str:
  dst = str(tmp_path / "copy")
  shutil.copytree(folder, dst)
  return dst


def test_missing_image_names_file_and_id(folder, tmp_path):
  root = _copy(folder, tmp_path)
  path = builders.json_path(root, "test_id", builders.REASON_RFT_FILES["spatial"]["test_id"])
  rec = json.load(open(path))[1]
  os.remove(os.path.join(builders.image_root(root, "test_id"), rec["image"][1]))
  with pytest.raises(builders.RecordError) as e:
    builders.prepare_reason_rft(root, str(tmp_path / "data"), "spatial")
  assert path in str(e.value) and rec["id"] in str(e.value) and "image not found" in str(e.value)


@pytest.mark.parametrize("breakage", ["no_problem", "bad_image", "no_answer"])
def test_malformed_record_names_file_and_id(folder, tmp_path, breakage):
  root = _copy(folder, tmp_path)
  path = builders.json_path(root, "train", builders.REASON_RFT_FILES["counting"]["train"])
  records = json.load(open(path))
  rec = records[2]
  if breakage == "no_problem":
    del rec["problem"]
  elif breakage == "bad_image":
    rec["image"] = 17
  else:
    del rec["answer"]
  json.dump(records, open(path, "w"))
  with pytest.raises(builders.RecordError) as e:
    builders.read_reason_rft_file(path, "counting", builders.image_root(root, "train"))
  assert path in str(e.value) and rec["id"] in str(e.value)


def test_synthetic_builder_matches_generator(tmp_path):
  config = builders.SyntheticConfig(name="tiny", seed=5, num_train=6, num_test_id=3, num_test_ood=3)
  builder = builders.prepare_synthetic(str(tmp_path), config)
  scene_cfg = config.scene_config()
  for split in synthetic.SPLITS:
    got = list(builders.iterate(builder.as_data_source(split)))
    assert len(got) == {"train": 6, "test_id": 3, "test_ood": 3}[split]
    for i, g in enumerate(got):
      want = synthetic.make_example(scene_cfg, split, i)
      for key in ("id", "problem", "answer", "solution", "cot", "task", "metadata"):
        assert g[key] == want[key]
      assert g["image"] == [want["image"]]
      np.testing.assert_array_equal(g["images"][0], builders._decode_png(want["image_png"]))
