"""Reason-RFT rewards (training), evaluation scorers, and the reward registry.

Every rule follows tanhuajie/Reason-RFT: training rules from `train/stage_rl/reward.py` (`format_reward`,
`accuracy_reward`, `only_full_func_accuracy_reward`, `func_accuracy_reward`), evaluation rules from
`eval/cal_score_benchmarks_for_open_source.py` (`get_score_clevr`, `get_score_geomath`, `get_score_geometry3k`,
`get_score_trance`). Values are floats in [0, 1]; the x100 happens in the results table.

The training rules follow train/stage_rl/reward.py at Reason-RFT commit d0a8070ee441774b94618349018c7d8dafb007c9
(2025-10-05, the newest we read); its training `<answer>` search has had re.DOTALL since commit 958a57d
"Fix the regex extraction issue. (#32)" (2025-05-07). Regex flags differ between the scripts (the source wins):
  - training `<answer>` search (accuracy, counting/structure, TRANCE) and the solution's: WITH re.DOTALL, so
    "<answer>\nN\n</answer>" is found and the answer is "N"; only a completion without a closed tag falls back
    to the whole text (accuracy: math_verify of the whole completion; TRANCE: triples of the whole completion).
    (Reason-RFT before #32, and this module before, searched without DOTALL; that rule is not kept.)
  - format uses re.DOTALL; evaluation CLEVR/GeoMath/Geometry3K use re.DOTALL; evaluation TRANCE does not
    (eval/cal_score_benchmarks_for_open_source.py, unchanged by #32).

Pure Python (numpy only for the batch arrays). math_verify runs only on fallback paths.
"""

from __future__ import annotations

import re
import threading
from typing import Callable, Mapping, Sequence

import numpy as np
from math_verify import parse, verify

RewardFn = Callable[[str, Mapping], float]

_FORMAT_RE = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)  # reward.py format_reward
_TRAIN_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)  # reward.py since #32: DOTALL
_EVAL_TRANCE_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>")  # eval get_score_trance: no DOTALL
_EVAL_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)  # eval get_score_clevr/geomath/geometry3k
_TRIPLE_RE = re.compile(r"(\w+)\((\w+),\s*'?(\w+)'?\)")  # func(object_id, value), value optionally quoted

Triple = tuple[str, str, str]


# ---------------------------------------------------------------------------------------------------------------
# math_verify, safe off the main thread
# ---------------------------------------------------------------------------------------------------------------
def _math_verify(pred: str, gold: str) -> bool:
  """`float(verify(parse(pred), parse(gold))) > 0`, argument order as in Reason-RFT.

  math_verify 0.9.0 times out with signal.alarm, which raises ValueError off the main thread (Reason-RFT's bare
  `except` would then silently give 0). On the main thread we keep its default 5 s timeouts; elsewhere
  `parsing_timeout=None` / `timeout_seconds=None` disable the signal (no timeout there: run pathological inputs
  on the main thread or in a process pool if that matters).
  """
  if threading.current_thread() is threading.main_thread():
    return float(verify(parse(pred), parse(gold))) > 0
  return float(verify(parse(pred, parsing_timeout=None), parse(gold, parsing_timeout=None), timeout_seconds=None)) > 0


def _answer_or_whole(text: str, answer_re: re.Pattern) -> tuple[str, bool]:
  """Stripped contents of the first <answer>...</answer>, else the whole stripped text; and whether a tag matched."""
  m = answer_re.search(text)
  return (m.group(1).strip(), True) if m else (text.strip(), False)


# ---------------------------------------------------------------------------------------------------------------
# Training rewards (reward.py)
# ---------------------------------------------------------------------------------------------------------------
def format_reward(completion: str) -> float:
  """1 if the whole completion is <think>...</think> <answer>...</answer> (fullmatch, DOTALL). reward.py."""
  return 1.0 if _FORMAT_RE.fullmatch(completion) else 0.0


def accuracy_reward(completion: str, solution: str) -> float:
  """Exact match of the stripped <answer> contents (DOTALL); math_verify only if that fails and no tag matched.

  reward.py accuracy_reward: note the fallback verifies the WHOLE completion against the WHOLE solution.
  """
  try:
    ground_truth, _ = _answer_or_whole(solution, _TRAIN_ANSWER_RE)
    student_answer, has_tag = _answer_or_whole(completion, _TRAIN_ANSWER_RE)
    if student_answer == ground_truth:
      return 1.0
    if not has_tag and _math_verify(completion, solution):
      return 1.0
  except Exception:
    pass
  return 0.0


def _extract_triples(text: str) -> tuple[list[Triple], int]:
  """Unique (func, object_id, value) triples in first-appearance order, and the total number of matches.

  Reason-RFT uses `list(set(matches))`, whose order depends on PYTHONHASHSEED; we use first appearance so the
  greedy partial-credit pairing below is deterministic (see _trance_counts).
  """
  matches = _TRIPLE_RE.findall(text)
  return list(dict.fromkeys(matches)), len(matches)


def _trance_counts(pred: list[Triple], sol: list[Triple], partial: bool) -> tuple[int, int, int, int]:
  """Greedy one-to-one pairing in stages: exact, (func, obj), (func, value), func only. Returns the 4 counts.

  Same greedy as Reason-RFT (each pred, in order, takes the first unused sol with the same key). The exact-stage
  count never depends on order; the later stages can (the source's set order makes them PYTHONHASHSEED-dependent
  in rare cases; ours follows first appearance in the text).
  """
  keys: list[Callable[[Triple], tuple]] = [lambda t: t]
  if partial:
    keys += [lambda t: t[:2], lambda t: (t[0], t[2]), lambda t: t[0]]
  pred_left, sol_left, counts = list(pred), list(sol), []
  for key in keys:
    n = 0
    for p in list(pred_left):
      for s in sol_left:
        if key(p) == key(s):
          pred_left.remove(p)
          sol_left.remove(s)
          n += 1
          break
    counts.append(n)
  return tuple(counts + [0] * (4 - len(counts)))  # type: ignore[return-value]


def _trance_sum(counts: tuple[int, int, int, int], item: float) -> float:
  """Accumulate in the source's order (bit-exact floats): 1, 0.5, 0.5, 0.25 per paired triple."""
  full, func_obj, func_value, func_only = counts
  reward = 0.0
  reward += full * item
  reward += func_obj * item * 0.5
  reward += func_value * item * 0.5
  reward += func_only * item * 0.25
  return reward


def trance_reward(completion: str, solution: str, partial: bool = False) -> float:
  """TRANCE training reward with the repeat penalty (unique / total predicted matches).

  partial=False: reward.py only_full_func_accuracy_reward (the one its RL scripts use, task `trance-only-full`).
  partial=True: reward.py func_accuracy_reward. No predicted (or solution) triple -> 0 (ZeroDivisionError there).
  The solution's triples are read from the whole solution string, tags or not.
  """
  try:
    content, _ = _answer_or_whole(completion, _TRAIN_ANSWER_RE)
    pred, n_pred = _extract_triples(content)
    sol, n_sol = _extract_triples(solution)
    if n_pred == 0 or n_sol == 0:
      return 0.0
    repeat_penalty = len(pred) / n_pred
    item = repeat_penalty / max(len(pred), len(sol))
    return _trance_sum(_trance_counts(pred, sol, partial), item)
  except Exception:
    return 0.0


# ---------------------------------------------------------------------------------------------------------------
# Evaluation scorers (eval/cal_score_benchmarks_for_open_source.py)
# ---------------------------------------------------------------------------------------------------------------
MATH_SPLITS = ("clevr-math", "super-clevr", "geomath", "geometry3k")
TRANCE_SPLITS = ("trance", "trance-left", "trance-right")


def _score_math(completion: str, answer: str) -> float:
  """get_score_clevr == get_score_geomath == get_score_geometry3k (enhance=False): DOTALL tag, then math_verify."""
  try:
    m = _EVAL_ANSWER_RE.search(completion)
    if m:
      pred = m.group(1).strip()
      if answer == pred:  # the source does not strip the answer on this path
        return 1.0
    else:
      pred = completion
      if answer.strip() == completion.strip():
        return 1.0
    return 1.0 if _math_verify(pred, answer) else 0.0
  except Exception:
    return 0.0


def _score_trance(completion: str, answer: str) -> float:
  """get_score_trance: partial credit, item = 1 / max(#unique pred, #unique sol), no repeat penalty, no DOTALL."""
  try:
    content, _ = _answer_or_whole(completion, _EVAL_TRANCE_ANSWER_RE)
    pred, _ = _extract_triples(content)
    sol, _ = _extract_triples(answer)
    if not sol or not pred:
      return 0.0
    return _trance_sum(_trance_counts(pred, sol, partial=True), 1.0 / max(len(pred), len(sol)))
  except Exception:
    return 0.0


def score(split: str, completion: str, answer: str) -> float:
  """Evaluation score in [0, 1] of one prediction on a Reason-RFT test split."""
  if split in MATH_SPLITS:
    return _score_math(completion, answer)
  if split in TRANCE_SPLITS:
    return _score_trance(completion, answer)
  raise ValueError(f"unknown evaluation split {split!r}; expected one of {MATH_SPLITS + TRANCE_SPLITS}")


def choice_type(answer: str) -> str:
  """GeoMath sub-average: "choice" if the answer is exactly one of A, B, C, D, else "non_choice".

  get_score_from_json_geomath. (For Geometry3K the source instead groups by the record's own "type" field,
  default "Non-CHOICE"; the caller can do that from the record.)
  """
  return "choice" if answer in ("A", "B", "C", "D") else "non_choice"


# ---------------------------------------------------------------------------------------------------------------
# Registry: fn(completion, example) -> float, example = the dataset record (solution/answer, task, extra fields)
# ---------------------------------------------------------------------------------------------------------------
REWARDS: dict[str, RewardFn] = {}

ACCURACY_TASKS = ("counting", "structure", "geometry", "clevr-math", "super-clevr", "geomath", "geometry3k")
TRANCE_TASKS = ("spatial", "trance", "trance-left", "trance-right")


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
  """Decorator: `@register_reward("mine") def mine(completion, example) -> float`. Names are unique."""

  def deco(fn: RewardFn) -> RewardFn:
    if name in REWARDS:
      raise ValueError(f"reward {name!r} is already registered")
    REWARDS[name] = fn
    return fn

  return deco


def solution_of(example: Mapping) -> str:
  """RL records carry `solution`, test records `answer`."""
  return example["solution"] if "solution" in example else example["answer"]


@register_reward("format")
def _format(completion: str, example: Mapping) -> float:
  return format_reward(completion)


@register_reward("accuracy")
def _accuracy(completion: str, example: Mapping) -> float:
  """Reason-RFT grpo.py: clevr-math / geoqa -> accuracy_reward; trance-only-full -> full-match TRANCE reward."""
  task = example["task"]
  if task in ACCURACY_TASKS:
    return accuracy_reward(completion, solution_of(example))
  if task in TRANCE_TASKS:
    return trance_reward(completion, solution_of(example), partial=False)
  raise ValueError(f"unknown task {task!r} for reward 'accuracy'")


@register_reward("trance_full")
def _trance_full(completion: str, example: Mapping) -> float:
  return trance_reward(completion, solution_of(example), partial=False)


@register_reward("trance_partial")
def _trance_partial(completion: str, example: Mapping) -> float:
  return trance_reward(completion, solution_of(example), partial=True)


def compute_rewards(
    names_and_weights: Sequence[tuple[str, float]], completions: Sequence[str], examples: Sequence[Mapping]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """total_B = sum_k weight_k * reward_k; also each unweighted reward_B by name (float64, host numpy)."""
  if len(completions) != len(examples):
    raise ValueError(f"{len(completions)} completions but {len(examples)} examples")
  total_B = np.zeros(len(completions), np.float64)
  per_reward: dict[str, np.ndarray] = {}
  for name, weight in names_and_weights:
    fn = REWARDS[name]
    r_B = np.array([fn(c, ex) for c, ex in zip(completions, examples)], np.float64)
    per_reward[name] = r_B
    total_B += weight * r_B
  return total_B, per_reward
