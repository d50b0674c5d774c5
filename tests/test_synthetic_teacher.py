"""The counting chain of thought and the flawed SFT teacher of the synthetic data (ekipl_jax/data/synthetic.py)."""

import json
import re

import pytest

from ekipl_jax.data import processor
from ekipl_jax.data import synthetic as syn

TRUE = syn.SceneConfig(seed=5)
BLIND = syn.SceneConfig(seed=5, teacher_blind="gray", teacher_miss_rate=1.0)


def _objects(ex):
  return json.loads(ex["metadata"])["objects"]


def test_cot_counts_every_colour_and_the_last_running_total_is_the_count():
  for i in range(40):
    ex = syn.make_example(TRUE, "train", i)
    objs = _objects(ex)
    got = re.findall(r"^(\w+) objects: (\d+), so far (\d+)$", ex["cot"], re.M)
    want, total = [], 0  # an independent recount, in the documented colour order
    for color in ("red", "blue", "green", "yellow", "purple", "gray"):
      k = len([o for o in objs if o["color"] == color])
      total += k
      want.append((color, str(k), str(total)))
    assert got == want and total == len(objs)
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
    hidden = sum(o["color"] == "gray" for o in objs)
    assert re.search(r"^gray objects: 0, ", ex["cot"], re.M)  # miss rate 1: never counted
    assert f"In total there are {len(objs) - hidden} objects." in ex["cot"]
    q = json.loads(ex["metadata"])["question"]
    if q["kind"] == "count":  # by hand: the teacher's answer is the count without the gray objects
      assert int(ex["answer"]) == len(objs) - hidden
    if q["kind"] in ("add", "subtract_n"):  # n + k or n - k, with the teacher's n
      assert int(ex["answer"]) == int(ref["answer"]) - hidden
    n_wrong += ex["answer"] != ex["solution"]
  assert n_wrong > 10  # about half the scenes hold a gray object


def test_blind_teacher_leaves_the_test_splits_truthful_and_rate_zero_is_perfect():
  for split in ("test_id", "test_ood"):
    for i in range(10):
      assert syn.make_example(BLIND, split, i) == syn.make_example(TRUE, split, i)
  off = syn.SceneConfig(seed=5, teacher_blind="gray", teacher_miss_rate=0.0)
  assert all(syn.make_example(off, "train", i) == syn.make_example(TRUE, "train", i) for i in range(10))


def test_miss_rate_is_per_object():
  cfg = syn.SceneConfig(seed=5, teacher_blind="cylinder", teacher_miss_rate=0.5)
  seen = total = 0
  for i in range(120):
    ex = syn.make_example(cfg, "train", i)
    objs = _objects(ex)
    n_seen = int(re.search(r"In total there are (\d+) objects", ex["cot"]).group(1))
    total += sum(o["shape"] == "cylinder" for o in objs)
    seen += n_seen - sum(o["shape"] != "cylinder" for o in objs)  # only cylinders can be missed
  assert 0.35 < seen / total < 0.65  # each cylinder is counted with probability 1 - 0.5 (~160 cylinders: 4 std)


def test_parse_blind():
  assert syn.parse_blind("small cylinder") == {"size": "small", "shape": "cylinder"}
  assert syn.parse_blind("red") == {"color": "red"}
  with pytest.raises(ValueError, match="teacher_blind 'small cylnder'"):
    syn.parse_blind("small cylnder")
  with pytest.raises(ValueError, match="once each"):
    syn.parse_blind("small large")


UNCOUNTED = syn.SceneConfig(seed=5, teacher_blind="gray", teacher_miss_rate=1.0, teacher_flaw="uncounted")


def test_uncounted_teacher_lists_the_kind_but_leaves_it_out_of_every_total():
  n_wrong = 0
  for i in range(60):
    ex, ref = syn.make_example(UNCOUNTED, "train", i), syn.make_example(TRUE, "train", i)
    objs = _objects(ex)
    assert ex["metadata"] == ref["metadata"] and ex["image_png"] == ref["image_png"]  # same scene and image
    assert ex["solution"] == ref["answer"]  # the RL reward's ground truth is untouched
    got = re.findall(r"^(\w+) objects: (\d+), so far (\d+)$", ex["cot"], re.M)
    want, total = [], 0  # by hand: every line holds the true count, the running total skips the gray ones
    for color in ("red", "blue", "green", "yellow", "purple", "gray"):
      k = len([o for o in objs if o["color"] == color])
      total += 0 if color == "gray" else k
      want.append((color, str(k), str(total)))
    assert got == want
    gray = sum(o["color"] == "gray" for o in objs)
    assert f"In total there are {len(objs) - gray} objects." in ex["cot"]
    q = json.loads(ex["metadata"])["question"]
    if q["kind"] in ("count", "add", "subtract_n"):  # n, n + k or n - k with the teacher's n
      assert int(ex["answer"]) == int(ref["answer"]) - gray
    n_wrong += ex["answer"] != ex["solution"]
  assert n_wrong > 10  # about half the scenes hold a gray object


def test_uncounted_rate_is_per_scene_and_test_splits_stay_truthful():
  cfg = syn.SceneConfig(seed=5, teacher_blind="gray", teacher_miss_rate=0.5, teacher_flaw="uncounted")
  flawed = with_gray = 0
  for i in range(200):
    ex, ref = syn.make_example(cfg, "train", i), syn.make_example(TRUE, "train", i)
    gray = sum(o["color"] == "gray" for o in _objects(ex))
    if gray == 0:
      assert ex == ref  # nothing to leave out
      continue
    n_total = int(re.search(r"In total there are (\d+) objects", ex["cot"]).group(1))
    assert n_total in (len(_objects(ex)), len(_objects(ex)) - gray)  # all of a scene's gray objects, or none
    with_gray += 1
    flawed += n_total != len(_objects(ex))
  assert 0.35 < flawed / with_gray < 0.65  # probability 0.5 per scene (~100 scenes with gray: 3 std)
  for split in ("test_id", "test_ood"):
    assert all(syn.make_example(UNCOUNTED, split, i) == syn.make_example(TRUE, split, i) for i in range(10))


def test_unknown_teacher_flaw_is_named():
  with pytest.raises(ValueError, match="teacher_flaw 'blind'"):
    syn.SceneConfig(teacher_flaw="blind")
