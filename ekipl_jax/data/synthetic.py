"""Offline CLEVR-Math-like counting scenes, a scripted solver and noisy solvers (stand-ins for external models).

A scene is a few coloured 2D shapes (cube = square, sphere = circle, cylinder = triangle), one per cell of a grid
whose cells are `cell` pixels wide. With the defaults (112 px image, 28 px cells) each cell is exactly one merged
vision token of Qwen-VL (14 px patches, 2x2 merge), so a tiny policy sees one object per token.

Splits (documented contract, checked by tests):
  train, test_id : num objects in [min_objects, max_objects]; colour-shape pairs in HELD_OUT_PAIRS never appear.
  test_ood       : num objects in [ood_min_objects, ood_max_objects] (ood_min_objects 0 = max_objects + 1) AND every
                   scene has >= 1 held-out pair (ood_held_out "one": exactly 1).
Everything is a pure function of (config, split, index): rng = numpy Generator seeded by (seed, split, index).

The chain of thought counts the objects by colour, one line per colour in a fixed order with a running total
("gray objects: 1, so far 4"), then states the total and does the question's arithmetic. Each line is a count over
the image of the most salient attribute (an aggregation a small attention model learns quickly); the enumeration in
reading order of version 1.1.0 (a pointer over the image tokens) and counts by size and shape were not learned by a
~1M-parameter policy from scratch in our runs (docs/RESULTS.md).

A flawed SFT teacher (optional, train split only): with `teacher_blind` set (e.g. "gray"), the scripted
solver that writes the training records' chain of thought misses each object of that kind with probability
`teacher_miss_rate` (it does not count it). Such a record's `cot` and `answer` are the teacher's (the SFT
target), its `solution` stays the ground truth (what the RL reward checks); the test splits are always truthful.
This is the situation Vision-EKIPL is built for: SFT teaches the policy a systematic error that it then rarely samples
its way out of, while an external solver that sees every object carries the missing knowledge.

`teacher_flaw` says what the flaw is:
  "miss"       (default) the teacher does not see each blind object, with probability `teacher_miss_rate` per object:
               the object is in neither its colour's line nor any total (a perception error).
  "uncounted"  the teacher sees every object and writes every colour's line right, but with probability
               `teacher_miss_rate` per scene it leaves the blind objects out of its running total ("gray objects: 2,
               so far 4" after "so far 4"), so its total and answer exclude them (a reasoning error: the policy
               learns to see them in SFT, and the correction needs only the addition it already does on every
               other line).
"""

import dataclasses
import io
import json
import zlib

import numpy as np
from PIL import Image, ImageDraw

from ekipl_jax.data import processor

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "blue": (40, 80, 220),
    "green": (40, 170, 60),
    "yellow": (230, 200, 30),
    "purple": (140, 60, 190),
    "gray": (70, 70, 70),
}
SHAPES = ("cube", "sphere", "cylinder")
SIZES = ("small", "large")
# The CLIP mean colour (the Qwen-VL image processor normalises with it): empty cells become ~zero input vectors, so
# a from-scratch vision tower sees objects as signal rather than as a small change on a large constant.
BACKGROUND = (122, 116, 104)
HELD_OUT_PAIRS = frozenset({("red", "sphere"), ("blue", "cylinder"), ("green", "cube")})
SPLITS = ("train", "test_id", "test_ood")
QUESTION_KINDS = ("count", "subtract_all", "add", "subtract_n")
TEACHER_FLAWS = ("miss", "uncounted")


@dataclasses.dataclass(frozen=True)
class SceneConfig:
  seed: int = 0  # base seed; each example has its own Generator from (seed, split, index)
  image_size: int = 112  # square image side in pixels
  cell: int = 28  # grid cell side; 28 = one merged Qwen-VL vision token
  min_objects: int = 2  # in-distribution object count range (inclusive)
  max_objects: int = 6
  ood_min_objects: int = 0  # test_ood draws counts in [ood_min_objects, ood_max_objects]; 0 = max_objects + 1
  ood_max_objects: int = 9
  question_kinds: tuple[str, ...] = QUESTION_KINDS
  teacher_blind: str = ""  # attribute values the SFT teacher misses, e.g. "gray" or "small cylinder" ("" = perfect)
  teacher_miss_rate: float = 0.0  # probability that the teacher misses each such object (train split only)
  teacher_flaw: str = "miss"  # "miss": each blind object unseen | "uncounted": per scene, seen but left out of totals
  ood_held_out: str = "some"  # test_ood: "some" (1..n objects get a held-out pair) | "one" (exactly one object)

  def __post_init__(self):
    if self.ood_held_out not in ("some", "one"):
      raise ValueError(f"ood_held_out {self.ood_held_out!r}: expected 'some' or 'one'")
    if self.teacher_flaw not in TEACHER_FLAWS:
      raise ValueError(f"teacher_flaw {self.teacher_flaw!r}: expected one of {TEACHER_FLAWS}")
    bad = [k for k in self.question_kinds if k not in QUESTION_KINDS]
    if bad or not self.question_kinds:
      raise ValueError(f"question_kinds {tuple(self.question_kinds)}: expected a non-empty subset of {QUESTION_KINDS}")

  @property
  def grid(self) -> int:
    return self.image_size // self.cell


def _rng(cfg: SceneConfig, split: str, index: int) -> np.random.Generator:
  return np.random.default_rng([cfg.seed, zlib.crc32(split.encode()), index])


# ---------------------------------------------------------------------------------------------- scenes
def sample_scene(cfg: SceneConfig, split: str, rng: np.random.Generator) -> list[dict]:
  """Objects as dicts {cell: [row, col], color, shape, size}, sorted by cell (reading order)."""
  ood = split == "test_ood"
  ood_lo = cfg.ood_min_objects or cfg.max_objects + 1
  lo, hi = (ood_lo, cfg.ood_max_objects) if ood else (cfg.min_objects, cfg.max_objects)
  n = int(rng.integers(lo, hi + 1))
  if n > cfg.grid * cfg.grid:
    raise ValueError(f"{n} objects do not fit a {cfg.grid}x{cfg.grid} grid")
  allowed = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in HELD_OUT_PAIRS]
  held = sorted(HELD_OUT_PAIRS)
  pairs = [allowed[int(rng.integers(len(allowed)))] for _ in range(n)]
  if ood:  # OOD: every scene shows at least one colour-shape pair never seen in training
    k = int(rng.integers(1, n + 1)) if n > 1 else 1
    k = 1 if cfg.ood_held_out == "one" else k
    for j in rng.choice(n, size=min(k, n), replace=False):
      pairs[int(j)] = held[int(rng.integers(len(held)))]
  cells = rng.choice(cfg.grid * cfg.grid, size=n, replace=False)
  objects = [
      {
          "cell": [int(c) // cfg.grid, int(c) % cfg.grid],
          "color": col,
          "shape": shp,
          "size": SIZES[int(rng.integers(len(SIZES)))],
      }
      for c, (col, shp) in zip(cells, pairs)
  ]
  return sorted(objects, key=lambda o: tuple(o["cell"]))


def render(cfg: SceneConfig, objects: list[dict]) -> Image.Image:
  """Flat colours, no anti-aliasing, so pixel colours identify objects exactly."""
  img = Image.new("RGB", (cfg.image_size, cfg.image_size), BACKGROUND)
  draw = ImageDraw.Draw(img)
  for o in objects:
    r, c = o["cell"]
    cx, cy = c * cfg.cell + cfg.cell / 2, r * cfg.cell + cfg.cell / 2
    h = cfg.cell * (0.42 if o["size"] == "large" else 0.25)  # half extent
    box = [cx - h, cy - h, cx + h - 1, cy + h - 1]
    fill = COLORS[o["color"]]
    if o["shape"] == "cube":
      draw.rectangle(box, fill=fill)
    elif o["shape"] == "sphere":
      draw.ellipse(box, fill=fill)
    else:
      draw.polygon([(cx, cy - h), (cx - h, cy + h - 1), (cx + h - 1, cy + h - 1)], fill=fill)
  return img


def png_bytes(img: Image.Image) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format="PNG", optimize=False)
  return buf.getvalue()


# ---------------------------------------------------------------------------------------------- questions
def _phrase(filt: dict, k: int | None = None) -> str:
  """'red cubes', 'small objects', '1 blue sphere'."""
  plural = k is None or k != 1
  noun = filt.get("shape", "object") + ("s" if plural else "")
  words = [w for w in (filt.get("size"), filt.get("color")) if w] + [noun]
  return " ".join(([str(k)] if k is not None else []) + words)


def matches(o: dict, filt: dict) -> bool:
  return all(o[key] == val for key, val in filt.items())


def sample_question(cfg: SceneConfig, objects: list[dict], rng: np.random.Generator) -> dict:
  """{kind, filter, k, text}. Filters name 1-2 attributes of an object in the scene (CLEVR-Math style)."""
  kind = cfg.question_kinds[int(rng.integers(len(cfg.question_kinds)))]
  if kind == "count":
    return {"kind": kind, "filter": {}, "k": 0, "text": "How many objects are there?"}
  ref = objects[int(rng.integers(len(objects)))]
  keys = [["color", "shape"], ["shape"], ["color"], ["size", "shape"], ["size", "color", "shape"]]
  filt = {key: ref[key] for key in keys[int(rng.integers(len(keys)))]}
  if kind == "subtract_all":
    return {"kind": kind, "filter": filt, "k": 0, "text": f"Subtract all {_phrase(filt)}. How many objects are left?"}
  if kind == "add":
    k = int(rng.integers(1, 4))
    return {"kind": kind, "filter": filt, "k": k, "text": f"Add {_phrase(filt, k)}. How many objects exist?"}
  n_match = sum(matches(o, filt) for o in objects)
  k = int(rng.integers(1, n_match + 1))
  return {
      "kind": "subtract_n",
      "filter": filt,
      "k": k,
      "text": f"Subtract {_phrase(filt, k)}. How many objects are left?",
  }


# ---------------------------------------------------------------------------------------------- solvers
def answer_of(objects: list[dict], question: dict) -> int:
  """The ground truth, computed directly from the metadata."""
  n, m = len(objects), sum(matches(o, question["filter"]) for o in objects)
  return {"count": n, "subtract_all": n - m, "add": n + question["k"], "subtract_n": n - question["k"]}[
      question["kind"]
  ]


def count_lines(objects: list[dict], uncounted: dict | None = None) -> list[str]:
  """One line per colour in COLORS order with its count and the running total: the last total is the number of
  objects the solver sees. Objects matching `uncounted` are listed in their colour's line but not added to the
  running total (the "uncounted" teacher flaw)."""
  lines, so_far = [], 0
  for color in COLORS:
    mine = [o for o in objects if o["color"] == color]
    so_far += sum(not (uncounted and matches(o, uncounted)) for o in mine)
    lines.append(f"{color} objects: {len(mine)}, so far {so_far}")
  return lines


def write_cot(
    objects: list[dict], question: dict, n_seen: int, m_seen: int, uncounted: dict | None = None
) -> tuple[str, int]:
  """Chain of thought from the objects the solver sees and the counts it believes; (cot, final answer)."""
  kind, filt, k = question["kind"], question["filter"], question["k"]
  lines = ["I count the objects by colour:", *count_lines(objects, uncounted), f"In total there are {n_seen} objects."]
  if kind == "count":
    return "\n".join(lines + [f"So there are {n_seen} objects."]), n_seen
  if kind == "subtract_all":
    ans = n_seen - m_seen
    lines += [f"The {_phrase(filt)} in the image: {m_seen}.", f"Removing them leaves {n_seen} - {m_seen} = {ans}."]
  elif kind == "add":
    ans = n_seen + k
    lines += [f"Adding {_phrase(filt, k)} gives {n_seen} + {k} = {ans}."]
  else:
    ans = n_seen - k
    lines += [f"Removing {_phrase(filt, k)} leaves {n_seen} - {k} = {ans}."]
  return "\n".join(lines + [f"So the answer is {ans}."]), ans


def solve(objects: list[dict], question: dict) -> tuple[str, int]:
  """The scripted (always correct) solver."""
  return write_cot(objects, question, len(objects), sum(matches(o, question["filter"]) for o in objects))


def parse_blind(blind: str) -> dict:
  """ "small cylinder" -> {"size": "small", "shape": "cylinder"}: the filter of objects a flawed teacher misses."""
  filt = {}
  for word in blind.split():
    key = "size" if word in SIZES else "color" if word in COLORS else "shape" if word in SHAPES else None
    if key is None or key in filt:
      raise ValueError(f"teacher_blind {blind!r}: {word!r} is not a size {SIZES}, colour or shape {SHAPES} (once each)")
    filt[key] = word
  return filt


def teacher_solve(
    objects: list[dict], question: dict, blind: dict, miss_rate: float, rng: np.random.Generator
) -> tuple[str, int]:
  """A flawed scripted solver: each object matching `blind` is missed with probability miss_rate (not counted in its
  colour's line nor in the total, nor among the question's matches); otherwise it reasons like `solve`."""
  seen = [o for o in objects if not (blind and matches(o, blind) and rng.random() < miss_rate)]
  return write_cot(seen, question, len(seen), sum(matches(o, question["filter"]) for o in seen))


def uncounted_teacher_solve(
    objects: list[dict], question: dict, blind: dict, miss_rate: float, rng: np.random.Generator
) -> tuple[str, int]:
  """A flawed scripted solver that sees every object but, with probability miss_rate (once per scene), leaves the
  objects matching `blind` out of its running total, its total and the question's matches; otherwise `solve`."""
  if not (blind and rng.random() < miss_rate):
    return solve(objects, question)
  counted = [o for o in objects if not matches(o, blind)]
  m = sum(matches(o, question["filter"]) for o in counted)
  return write_cot(objects, question, len(counted), m, uncounted=blind)


def noisy_solve(objects: list[dict], question: dict, accuracy: float, rng: np.random.Generator) -> tuple[str, int]:
  """Correct with probability `accuracy`; otherwise it miscounts (plausible reasoning, wrong final answer)."""
  n, m = len(objects), sum(matches(o, question["filter"]) for o in objects)
  if rng.random() < accuracy:
    return write_cot(objects, question, n, m)
  delta = int(rng.choice([-1, 1])) if answer_of(objects, question) > 0 else 1  # never a negative answer
  if question["kind"] == "subtract_all" and rng.random() < 0.5 and m + delta >= 0:
    return write_cot(objects, question, n, m + delta)  # miscounts the matching objects
  return write_cot(objects, question, n + delta, m)  # miscounts the whole scene


def format_response(cot: str, answer: int | str) -> str:
  """The Reason-RFT CoT-SFT target (processor.sft_target, the one the SFT stage trains on)."""
  return processor.sft_target(cot, str(answer))


# ---------------------------------------------------------------------------------------------- records
def make_example(cfg: SceneConfig, split: str, index: int) -> dict:
  """One record in the Reason-RFT layout (+ task, metadata, image_png) for (cfg, split, index)."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
  rng = _rng(cfg, split, index)
  objects = sample_scene(cfg, split, rng)
  question = sample_question(cfg, objects, rng)
  truth = answer_of(objects, question)
  if split == "train" and cfg.teacher_blind and cfg.teacher_miss_rate > 0:  # own stream: the scene stays the same
    teacher_rng = np.random.default_rng([cfg.seed, zlib.crc32(b"teacher"), index])
    flawed = teacher_solve if cfg.teacher_flaw == "miss" else uncounted_teacher_solve
    cot, ans = flawed(objects, question, parse_blind(cfg.teacher_blind), cfg.teacher_miss_rate, teacher_rng)
  else:
    cot, ans = solve(objects, question)
  ex_id = f"{split}-{index:06d}"
  meta = {"objects": objects, "question": question, "image_size": cfg.image_size, "cell": cfg.cell}
  return {
      "id": ex_id,
      "image": f"{split}/{ex_id}.png",
      "problem": question["text"],
      "answer": str(ans),  # the SFT target's answer (the teacher's)
      "solution": str(truth),  # the ground truth (the RL reward's)
      "cot": cot,
      "task": "counting",
      "metadata": json.dumps(meta, sort_keys=True),
      "image_png": png_bytes(render(cfg, objects)),
  }


def corpus(cfg: SceneConfig, n: int = 500) -> list[str]:
  """Text for tokenizer training: problems and full CoT responses of the first n train examples."""
  out = []
  for i in range(n):
    ex = make_example(cfg, "train", i)
    out += [ex["problem"], format_response(ex["cot"], ex["answer"])]
  return out


def noisy_response(metadata: str, accuracy: float, rng: np.random.Generator) -> tuple[str, int]:
  """An external model's full response for a record (its `metadata` JSON): (response text, its answer)."""
  meta = json.loads(metadata)
  cot, ans = noisy_solve(meta["objects"], meta["question"], accuracy, rng)
  return format_response(cot, ans), ans
