"""Synthetic CLEVR-Math-like data: determinism, solver correctness (metadata and pixels), OOD split, noisy solvers."""

import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from ekipl_jax.data import synthetic as syn

CFG = syn.SceneConfig(seed=3)


def _recount(meta: dict) -> int:
  """Independent of the solver: count from the metadata by the question's words."""
  objs, q = meta["objects"], meta["question"]
  text = q["text"]
  if q["kind"] == "count":
    return len(objs)
  words = re.match(r"(Subtract|Add) (all |\d+ )?(.*?)\.", text).group(3).split()
  k = int(re.search(r"\d+", text).group()) if re.search(r"\d+", text) else None
  want = {}
  for w in words:
    w1 = w.rstrip("s") if w.rstrip("s") in syn.SHAPES else w
    if w in syn.COLORS:
      want["color"] = w
    elif w in syn.SIZES:
      want["size"] = w
    elif w1 in syn.SHAPES:
      want["shape"] = w1
  hits = sum(all(o[a] == v for a, v in want.items()) for o in objs)
  if text.startswith("Add"):
    return len(objs) + k
  return len(objs) - (k if k is not None else hits)


def test_deterministic_and_seed_dependent():
  a = [syn.make_example(CFG, s, i) for s in syn.SPLITS for i in range(5)]
  b = [syn.make_example(CFG, s, i) for s in syn.SPLITS for i in range(5)]
  assert a == b
  c = [syn.make_example(syn.SceneConfig(seed=4), s, i) for s in syn.SPLITS for i in range(5)]
  assert sum(x["image_png"] != y["image_png"] for x, y in zip(a, c)) >= 12
  assert len({ex["id"] for ex in a}) == len(a)


def test_solver_answer_matches_independent_recount():
  for split in syn.SPLITS:
    for i in range(300):
      ex = syn.make_example(CFG, split, i)
      meta = json.loads(ex["metadata"])
      assert int(ex["answer"]) == _recount(meta) >= 0, ex
      assert ex["solution"] == ex["answer"]
      assert ex["cot"].endswith(f" {ex['answer']}.") or ex["cot"].endswith(f"{ex['answer']} objects.")
      resp = syn.format_response(ex["cot"], ex["answer"])
      assert re.fullmatch(r"<think>.*?</think>\s*<answer>.*?</answer>", resp, re.DOTALL)


def test_rendered_pixels_match_metadata():
  for i in range(8):
    ex = syn.make_example(CFG, syn.SPLITS[i % 3], i)
    objs = json.loads(ex["metadata"])["objects"]
    img_HW3 = np.asarray(Image.open(io.BytesIO(ex["image_png"])).convert("RGB"))
    assert img_HW3.shape == (CFG.image_size, CFG.image_size, 3)
    seen = {}
    for r in range(CFG.grid):
      for c in range(CFG.grid):
        cell_3 = img_HW3[r * CFG.cell : (r + 1) * CFG.cell, c * CFG.cell : (c + 1) * CFG.cell].reshape(-1, 3)
        names = {name for name, rgb in syn.COLORS.items() if (cell_3 == rgb).all(-1).sum() > 20}
        assert len(names) <= 1
        if names:
          seen[(r, c)] = names.pop()
    assert seen == {tuple(o["cell"]): o["color"] for o in objs}
    for name, rgb in syn.COLORS.items():  # per-colour object counts from the pixels
      cells = sum(v == name for v in seen.values())
      assert cells == sum(o["color"] == name for o in objs)


def test_ood_split_differs_as_documented():
  for split in syn.SPLITS:
    for i in range(200):
      meta = json.loads(syn.make_example(CFG, split, i)["metadata"])
      pairs = {(o["color"], o["shape"]) for o in meta["objects"]}
      n = len(meta["objects"])
      if split == "test_ood":
        assert CFG.max_objects < n <= CFG.ood_max_objects and pairs & syn.HELD_OUT_PAIRS
      else:
        assert CFG.min_objects <= n <= CFG.max_objects and not pairs & syn.HELD_OUT_PAIRS


def test_noisy_solver_accuracy():
  rng = np.random.default_rng(0)
  n_ok, n = 0, 1500
  for i in range(n):
    ex = syn.make_example(CFG, "train", i)
    meta = json.loads(ex["metadata"])
    cot, ans = syn.noisy_solve(meta["objects"], meta["question"], 0.6, rng)
    assert cot.endswith(f"{ans}.") or cot.endswith(f"{ans} objects.")
    n_ok += ans == int(ex["answer"])
  assert abs(n_ok / n - 0.6) < 0.04


def test_ood_range_can_overlap_the_training_range():
  cfg = syn.SceneConfig(seed=3, ood_min_objects=4, ood_max_objects=7)
  counts = set()
  for i in range(200):
    meta = json.loads(syn.make_example(cfg, "test_ood", i)["metadata"])
    counts.add(len(meta["objects"]))
    assert {(o["color"], o["shape"]) for o in meta["objects"]} & syn.HELD_OUT_PAIRS
  assert counts == {4, 5, 6, 7}


def test_question_kinds_subset_and_unknown_kind_named():
  cfg = syn.SceneConfig(seed=3, question_kinds=("count", "add"))
  kinds = {json.loads(syn.make_example(cfg, "train", i)["metadata"])["question"]["kind"] for i in range(60)}
  assert kinds == {"count", "add"}
  with pytest.raises(ValueError, match="'subtract_some'"):
    syn.SceneConfig(question_kinds=("count", "subtract_some"))


def test_ood_held_out_one_gives_exactly_one_held_out_object():
  one = syn.SceneConfig(seed=3, ood_min_objects=4, ood_max_objects=7, ood_held_out="one")
  some = syn.SceneConfig(seed=3, ood_min_objects=4, ood_max_objects=7)
  n_held = {"one": [], "some": []}
  for name, cfg in (("one", one), ("some", some)):
    for i in range(100):
      objs = json.loads(syn.make_example(cfg, "test_ood", i)["metadata"])["objects"]
      n_held[name].append(sum((o["color"], o["shape"]) in syn.HELD_OUT_PAIRS for o in objs))
      assert 4 <= len(objs) <= 7
  assert set(n_held["one"]) == {1}
  assert min(n_held["some"]) >= 1 and max(n_held["some"]) > 1  # the default replaces 1..n objects
  for split in ("train", "test_id"):  # only test_ood changes
    assert all(syn.make_example(one, split, i) == syn.make_example(some, split, i) for i in range(10))
  with pytest.raises(ValueError, match="ood_held_out 'two'"):
    syn.SceneConfig(ood_held_out="two")
