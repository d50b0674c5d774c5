"""The enumerated chain of thought and the flawed SFT teacher of the synthetic data (ekipl_jax/data/synthetic.py)."""

import json
import re

import pytest

from ekipl_jax.data import processor
from ekipl_jax.data import synthetic as syn

TRUE = syn.SceneConfig(seed=5)
BLIND = syn.SceneConfig(seed=5, teacher_blind="small cylinder", teacher_miss_rate=1.0)


def _objects(ex):
  return json.loads(ex["metadata"])["objects"]


def test_cot_enumerates_every_object_and_the_count_is_the_last_index():
  for i in range(40):
    ex = syn.make_example(TRUE, "train", i)
    objs = _objects(ex)
    listed = re.findall(r"^(\d+)\. (small|large) (\w+) (cube|sphere|cylinder)$", ex["cot"], re.M)
    assert [(int(k), s, c, sh) for k, s, c, sh in listed] == [
        (j, o["size"], o["color"], o["shape"]) for j, o in enumerate(objs, 1)
    ]
    assert f"In total there are {len(objs)} objects." in ex["cot"]


def test_sft_target_is_the_processors():
  ex = syn.make_example(TRUE, "train", 0)
  assert syn.format_response(ex["cot"], ex["answer"]) == processor.sft_target(ex["cot"], ex["answer"])
  assert syn.format_response("c", 3) == "<think>\nc\n</think>\n<answer>\n3\n</answer>"


def test_blind_teacher_never_lists_the_kind_and_miscounts_by_it():
  n_wrong = 0
  for i in range(60):
    ex, ref = syn.make_example(BLIND, "train", i), syn.make_example(TRUE, "train", i)
    objs = _objects(ex)
    assert ex["metadata"] == ref["metadata"] and ex["image_png"] == ref["image_png"]  # same scene and image
    assert ex["solution"] == ref["answer"]  # the RL reward's ground truth is untouched
    hidden = sum(o["size"] == "small" and o["shape"] == "cylinder" for o in objs)
    assert "small" not in ex["cot"] or "cylinder" not in [
        l.split()[-1] for l in ex["cot"].splitlines() if l.split()[1:2] == ["small"]
    ]
    assert f"In total there are {len(objs) - hidden} objects." in ex["cot"]
    q = json.loads(ex["metadata"])["question"]
    if q["kind"] == "count":  # by hand: the teacher's answer is the count without the small cylinders
      assert int(ex["answer"]) == len(objs) - hidden
    if q["kind"] in ("add", "subtract_n"):  # n + k or n - k, with the teacher's n
      assert int(ex["answer"]) == int(ref["answer"]) - hidden
    n_wrong += ex["answer"] != ex["solution"]
  assert n_wrong > 10  # about half the scenes hold a small cylinder


def test_blind_teacher_leaves_the_test_splits_truthful_and_rate_zero_is_perfect():
  for split in ("test_id", "test_ood"):
    for i in range(10):
      assert syn.make_example(BLIND, split, i) == syn.make_example(TRUE, split, i)
  off = syn.SceneConfig(seed=5, teacher_blind="small cylinder", teacher_miss_rate=0.0)
  assert all(syn.make_example(off, "train", i) == syn.make_example(TRUE, "train", i) for i in range(10))


def test_miss_rate_is_per_object():
  cfg = syn.SceneConfig(seed=5, teacher_blind="cylinder", teacher_miss_rate=0.5)
  listed = total = 0
  for i in range(120):
    ex = syn.make_example(cfg, "train", i)
    total += sum(o["shape"] == "cylinder" for o in _objects(ex))
    listed += len(re.findall(r"^\d+\. \w+ \w+ cylinder$", ex["cot"], re.M))
  assert 0.35 < listed / total < 0.65  # each cylinder is listed with probability 1 - 0.5 (~160 cylinders: 4 std)


def test_parse_blind():
  assert syn.parse_blind("small cylinder") == {"size": "small", "shape": "cylinder"}
  assert syn.parse_blind("red") == {"color": "red"}
  with pytest.raises(ValueError, match="teacher_blind 'small cylnder'"):
    syn.parse_blind("small cylnder")
  with pytest.raises(ValueError, match="once each"):
    syn.parse_blind("small large")
