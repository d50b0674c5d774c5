"""Rewards and scorers against hand-computed values from the Reason-RFT rules (docs/METHOD.md sect. 5.3, 5.4).

Every expected number below is worked out by hand from the published rule; the arithmetic is in the comment.
"""

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from ekipl_jax import rewards
from ekipl_jax.rewards import (
    accuracy_reward,
    choice_type,
    compute_rewards,
    format_reward,
    register_reward,
    score,
    trance_reward,
)

EXACT = dict(abs=1e-12)


# ------------------------------------------------------------------------------------------------- format
@pytest.mark.parametrize(
    "completion,expected",
    [
        ("<think>a</think><answer>b</answer>", 1.0),
        ("<think>\nline 1\nline 2\n</think>\n\n<answer>\n 3 \n</answer>", 1.0),  # DOTALL; \s* between the blocks
        ("Sure! <think>a</think><answer>b</answer>", 0.0),  # text before: no fullmatch
        ("<think>a</think><answer>b</answer> Done.", 0.0),  # text after
        ("<think>a</think><answer>b</answer>\n", 0.0),  # even a trailing newline
        ("<think>a</think> so <answer>b</answer>", 0.0),  # only whitespace allowed between
        ("<answer>b</answer>", 0.0),  # missing <think>
        ("<think>a</think>", 0.0),  # missing <answer>
        # fullmatch lets the lazy .*? stretch over "1</answer><answer>2": two answer tags still match the format
        ("<think>a</think><answer>1</answer><answer>2</answer>", 1.0),
    ],
)
def test_format_reward(completion, expected):
  assert format_reward(completion) == expected


# ------------------------------------------------------------------------------------------------- accuracy (train)
@pytest.mark.parametrize(
    "completion,solution,expected",
    [
        ("<think>t</think><answer>3</answer>", "3", 1.0),
        ("<think>t</think><answer>  3 </answer>", "<answer> 3 </answer>", 1.0),  # both sides stripped
        ("<think>t</think><answer>3.0</answer>", "3", 0.0),  # tag present: string compare only, "3.0" != "3"
        ("<think>t</think><answer>4</answer>", "3", 0.0),
        ("3.0", "3", 1.0),  # no tag: string fails, math_verify says 3.0 == 3
        ("3", "<answer> 3 </answer>", 1.0),  # no tag in completion; exact vs stripped solution tag
        ("I count four", "3", 0.0),  # no tag, no number: math_verify finds nothing
        ("<think>t</think><answer>2</answer><answer>3</answer>", "3", 0.0),  # first <answer> wins: "2"
        ("<think>t</think><answer>2</answer><answer>3</answer>", "2", 1.0),
    ],
)
def test_accuracy_reward(completion, solution, expected):
  assert accuracy_reward(completion, solution) == expected


def test_accuracy_multiline_answer_is_found_in_training():
  # reward.py (Reason-RFT since #32) searches <answer>(.*?)</answer> WITH DOTALL: "<answer>\n3\n</answer>" -> "3".
  assert accuracy_reward("<think>count them</think>\n<answer>\n3\n</answer>", "3") == 1.0
  assert accuracy_reward("<think>count them</think>\n<answer>\n4\n</answer>", "3") == 0.0
  # The tag is found, so there is no math_verify fallback: "3.0" != "3" -> 0 (before #32: no tag, whole text -> 1).
  assert accuracy_reward("<think>count them</think>\n<answer>\n3.0\n</answer>", "3") == 0.0
  # The solution's tag is searched with DOTALL too: "<answer>\n 3 \n</answer>" -> "3".
  assert accuracy_reward("<answer>3</answer>", "<answer>\n 3 \n</answer>") == 1.0


def test_accuracy_answer_in_think_does_not_count():
  # The chain of thought says 3, the answer tag says 4; gold 3. Tag found -> "4" != "3", no fallback -> 0.
  # (Without DOTALL the tag was missed and math_verify read the whole completion, think included.)
  assert accuracy_reward("<think>\nSo the answer is 3.\n</think>\n<answer>\n4\n</answer>", "3") == 0.0
  assert accuracy_reward("<think>\nSo the answer is 4.\n</think>\n<answer>\n3\n</answer>", "3") == 1.0
  # re.search takes the FIRST <answer> block, wherever it is: one written inside <think> wins (Reason-RFT's rule).
  draft = "<think>\ndraft <answer>\n4\n</answer>\n</think>\n<answer>\n3\n</answer>"
  assert accuracy_reward(draft, "3") == 0.0
  assert accuracy_reward(draft, "4") == 1.0


def test_accuracy_anything_raising_is_zero():
  assert accuracy_reward("<answer>3</answer>", None) == 0.0  # type: ignore[arg-type]
  assert accuracy_reward(None, "3") == 0.0  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------- TRANCE (train)
SOL2 = "<answer>change_color(A, red), change_size(B, large)</answer>"


@pytest.mark.parametrize(
    "answer,full,partial",
    [
        # 2 unique of 2 matches: penalty 2/2 = 1; item = 1 / max(2, 2) = 0.5; 2 exact -> 2 * 0.5 = 1.0.
        # 'red' (quoted) and red give the same triple.
        ("change_color(A, 'red'), change_size(B, large)", 1.0, 1.0),
        # spaces: "\s*" after the comma only; two spaces are fine -> same as above
        ("change_color(A,red)  change_size(B,   large)", 1.0, 1.0),
        # repeat: 3 matches, 2 unique: penalty 2/3; item = (2/3) / 2 = 1/3; 2 exact -> 2/3
        ("change_color(A, red), change_color(A, red), change_size(B, large)", 2 / 3, 2 / 3),
        # one wrong value: item = 1/2; exact 1 -> 0.5. Partial: (change_color, A) pairs -> + 0.5 * 0.5 = 0.75
        ("change_color(A, blue), change_size(B, large)", 0.5, 0.75),
        # one extra prediction: 3 unique, item = 1 / max(3, 2) = 1/3; 2 exact -> 2/3; the extra has no partner left
        ("change_color(A, red), change_size(B, large), change_shape(C, cube)", 2 / 3, 2 / 3),
        # half the answer: item = 1 / max(1, 2) = 0.5 -> 0.5
        ("change_color(A, red)", 0.5, 0.5),
        # no predicted triple: 0 (division by zero matches in the source)
        ("I am not sure", 0.0, 0.0),
        # space inside the parenthesis breaks the pattern (\w+ right after "(") -> no triple -> 0
        ("change_color( A, red)", 0.0, 0.0),
    ],
)
def test_trance_reward(answer, full, partial):
  completion = f"<think>look</think><answer>{answer}</answer>"
  assert trance_reward(completion, SOL2) == pytest.approx(full, **EXACT)
  assert trance_reward(completion, SOL2, partial=True) == pytest.approx(partial, **EXACT)


def test_trance_reward_all_partial_stages():
  sol = "change_color(A, red), change_size(B, large), change_shape(C, cube), change_material(D, metal)"
  pred = (
      "change_color(A, red), "  # exact
      "change_size(B, small), "  # (func, object) -> 0.5
      "change_shape(E, cube), "  # (func, value)  -> 0.5
      "change_material(F, glass)"
  )  # func only      -> 0.25
  c = f"<think>t</think><answer>{pred}</answer>"
  # 4 unique / 4 matches: penalty 1, item = 1/4.
  # full-only: 1 * 0.25 = 0.25
  # partial:   0.25 + 0.25*0.5 + 0.25*0.5 + 0.25*0.25 = 0.25 + 0.125 + 0.125 + 0.0625 = 0.5625
  assert trance_reward(c, sol) == 0.25
  assert trance_reward(c, sol, partial=True) == 0.5625
  # Same with the exact one written twice: 5 matches, 4 unique, penalty 4/5 = 0.8, item = 0.8 / 4 = 0.2.
  # full-only: 0.2; partial: 0.2 + 0.1 + 0.1 + 0.05 = 0.45
  c2 = f"<think>t</think><answer>change_color(A, red), {pred}</answer>"
  assert trance_reward(c2, sol) == pytest.approx(0.2, **EXACT)
  assert trance_reward(c2, sol, partial=True) == pytest.approx(0.45, **EXACT)
  # Evaluation: no repeat penalty, item = 1/4 -> 0.5625 for both
  assert score("trance", c2, sol) == 0.5625
  assert score("trance-left", c, sol) == 0.5625


def test_trance_greedy_follows_first_appearance():
  # pred p1 = (change_color, A, red), p2 = (change_color, A, blue); sol s1 = (change_color, A, green),
  # s2 = (change_color, B, blue). item = 1/2. No exact. (func, obj): p1 takes s1 (first appearance).
  # Left p2, s2: (func, value) = (change_color, blue) -> 0.5 * 0.5. Total 0.25 + 0.25 = 0.5.
  # (Reason-RFT's set order could instead pair p2-s1, leaving func-only p1-s2: 0.25 + 0.125 = 0.375.)
  c = "<think>t</think><answer>change_color(A, red), change_color(A, blue)</answer>"
  sol = "change_color(A, green), change_color(B, blue)"
  assert trance_reward(c, sol, partial=True) == 0.5


def test_trance_triples_in_think_do_not_count_in_training():
  # DOTALL (Reason-RFT since #32): the multi-line tag is found, so only its two triples are read; the think's
  # (change_color, A, blue) is ignored. 2 unique of 2, item = 1/2, 2 exact -> 1.0 (full and partial).
  c = "<think>maybe change_color(A, blue)</think>\n<answer>\nchange_color(A, red)\nchange_size(B, large)\n</answer>"
  assert trance_reward(c, SOL2) == 1.0
  assert trance_reward(c, SOL2, partial=True) == 1.0
  # Evaluation's get_score_trance has no DOTALL: the tag is missed and the whole text is read, think included:
  # 3 unique triples, item = 1 / max(3, 2) = 1/3, 2 exact -> 2/3 (blue has no solution partner left).
  assert score("trance", c, SOL2) == pytest.approx(2 / 3, **EXACT)
  # Half the answer in the think, half in the tag: only the tag's triple is a prediction, item 1 / max(1, 2) -> 0.5.
  # (Before #32 the multi-line tag was missed and both triples counted: 1.0.)
  c2 = "<think>\nchange_color(A, red)?\n</think>\n<answer>\nchange_size(B, large)\n</answer>"
  assert trance_reward(c2, SOL2) == 0.5
  # On one line the tag is found and the think text is ignored: 1.0
  c1 = "<think>maybe change_color(A, blue)</think>\n<answer>change_color(A, red), change_size(B, large)</answer>"
  assert trance_reward(c1, SOL2) == 1.0


def test_trance_first_answer_tag_and_missing_tag():
  # first tag wins: "change_color(A, red)" only -> item 1/max(1, 2) = 0.5 -> 0.5
  c = "<think>t</think><answer>change_color(A, red)</answer><answer>change_size(B, large)</answer>"
  assert trance_reward(c, SOL2) == 0.5
  # no tag at all: whole text -> both triples -> 1.0
  assert trance_reward("change_color(A, red) then change_size(B, large)", SOL2) == 1.0
  # solution without any triple -> 0
  assert trance_reward(c, "<answer>nothing</answer>") == 0.0


# ------------------------------------------------------------------------------------------------- evaluation
@pytest.mark.parametrize("split", ["clevr-math", "super-clevr", "geomath", "geometry3k"])
@pytest.mark.parametrize(
    "completion,answer,expected",
    [
        ("<think>t</think><answer>3.0</answer>", "3", 1.0),  # unlike training: math_verify after the string test
        ("<think>t</think><answer>3</answer>", "3", 1.0),
        ("<think>t</think><answer>4</answer>", "3", 0.0),
        ("<think>maybe 4</think><answer>\n3\n</answer>", "3", 1.0),  # DOTALL here: the tag spanning lines is found
        ("<think>t</think><answer>2</answer> <answer>3</answer>", "3", 0.0),  # first tag: "2"
        ("<think>t</think><answer>2</answer> <answer>3</answer>", "2", 1.0),
        ("  3\n", "3", 1.0),  # no tag: stripped whole text equals the answer
        ("The count is 3.0", "3", 1.0),  # no tag: math_verify on the whole text
        ("no idea", "3", 0.0),
        ("<think>t</think><answer>B</answer>", "B", 1.0),  # choice letters: exact string
        ("<think>t</think><answer>C</answer>", "B", 0.0),
    ],
)
def test_score_math_splits(split, completion, answer, expected):
  assert score(split, completion, answer) == expected


def test_score_trance():
  sol = "change_color(A, red), change_size(B, large)"
  # exact: item = 1/2, 2 exact -> 1.0
  assert score("trance", "<think>t</think><answer>change_color(A, 'red'), change_size(B, large)</answer>", sol) == 1.0
  # repeats are not penalised in eval: 2 unique -> item 1/2 -> 1.0
  rep = "<answer>change_color(A, red), change_color(A, red), change_size(B, large)</answer>"
  assert score("trance-right", rep, sol) == 1.0
  # partial: exact 1 * 0.5 + (func, value) (change_size, large) with object C: 0.5 * 0.5 -> 0.75
  assert score("trance", "<answer>change_color(A, red), change_size(C, large)</answer>", sol) == 0.75
  # no predicted triple -> 0
  assert score("trance", "<think>t</think><answer>none</answer>", sol) == 0.0
  # eval TRANCE has no DOTALL: the multi-line tag is missed and the whole text is read, think included:
  # pred (change_color, A, blue), (change_color, A, red); sol (change_color, A, red): item 1/max(2, 1) = 0.5,
  # 1 exact -> 0.5; blue has no sol left -> 0.5
  c = "<think>try change_color(A, blue)</think><answer>\nchange_color(A, red)\n</answer>"
  assert score("trance", c, "change_color(A, red)") == 0.5
  with pytest.raises(ValueError):
    score("mathvista", c, "1")


@pytest.mark.parametrize(
    "answer,kind",
    [
        ("A", "choice"),
        ("D", "choice"),
        ("E", "non_choice"),
        ("a", "non_choice"),
        (" A", "non_choice"),
        ("3.5", "non_choice"),
    ],
)
def test_choice_type(answer, kind):
  assert choice_type(answer) == kind


# ------------------------------------------------------------------------------------------------- math_verify off main thread
def test_math_verify_fallback_works_in_threads():
  with ThreadPoolExecutor(2) as pool:
    train = pool.submit(accuracy_reward, "3.0", "3").result()
    evaluation = pool.submit(score, "geomath", "<answer>3.0</answer>", "3").result()
  assert (train, evaluation) == (1.0, 1.0)


# ------------------------------------------------------------------------------------------------- registry
COUNT_EX = {"task": "counting", "solution": "<answer> 3 </answer>"}
TRANCE_EX = {"task": "spatial", "solution": "<answer>change_color(A, red), change_size(B, large)</answer>"}


def test_compute_rewards_reason_rft_total():
  completions = [
      "<think>t</think><answer>3</answer>",  # acc 1, format 1 -> 2
      "<think>t</think> <answer>4</answer>",  # acc 0, format 1 -> 1
      "3",  # acc 1 (exact), format 0 -> 1
      "<think>t</think><answer>change_color(A, blue), change_size(B, large)</answer>",  # full-only 0.5 + 1
  ]
  examples = [COUNT_EX, COUNT_EX, COUNT_EX, TRANCE_EX]
  total_B, per = compute_rewards((("accuracy", 1.0), ("format", 1.0)), completions, examples)
  assert total_B.tolist() == [2.0, 1.0, 1.0, 1.5]
  assert per["accuracy"].tolist() == [1.0, 0.0, 1.0, 0.5]
  assert per["format"].tolist() == [1.0, 1.0, 0.0, 1.0]
  # weights: 0.5 * acc + 2 * format -> [2.5, 2.0, 0.5, 2.25]
  total_B, _ = compute_rewards([("accuracy", 0.5), ("format", 2.0)], completions, examples)
  assert total_B.tolist() == [2.5, 2.0, 0.5, 2.25]
  # the partial variant by name: 0.5 + (change_color, A) 0.5 * 0.5 = 0.75
  _, per = compute_rewards([("trance_partial", 1.0), ("trance_full", 1.0)], completions[3:], examples[3:])
  assert (per["trance_partial"].tolist(), per["trance_full"].tolist()) == ([0.75], [0.5])
  # test records use `answer` instead of `solution`
  assert rewards.REWARDS["accuracy"]("<answer>3</answer>", {"task": "structure", "answer": "3"}) == 1.0
  with pytest.raises(ValueError):
    rewards.REWARDS["accuracy"]("3", {"task": "poetry", "solution": "3"})


def test_user_reward_plugs_in_and_sees_extra_fields():
  seen = []

  @register_reward("brevity_test")
  def brevity(completion: str, example) -> float:
    seen.append(example["max_chars"])
    return 1.0 if len(completion) <= example["max_chars"] else 0.0

  try:
    examples = [dict(COUNT_EX, max_chars=10), dict(COUNT_EX, max_chars=100)]
    completions = ["<think>t</think><answer>3</answer>"] * 2  # 34 characters
    total_B, per = compute_rewards([("brevity_test", 1.0), ("accuracy", 1.0)], completions, examples)
    assert seen == [10, 100]
    assert per["brevity_test"].tolist() == [0.0, 1.0]
    assert total_B.tolist() == [1.0, 2.0]
    with pytest.raises(ValueError):
      register_reward("brevity_test")(brevity)  # names are unique
  finally:
    rewards.REWARDS.pop("brevity_test", None)
  with pytest.raises(KeyError):
    compute_rewards([("brevity_test", 1.0)], completions, examples)


def test_speed_1000_completions_per_second():
  completions = [
      "<think>" + "reasoning " * 50 + "</think>\n<answer>3</answer>",
      "<think>" + "reasoning " * 50 + "</think>\n<answer>change_color(A, red), change_size(B, large)" "</answer>",
  ] * 500
  examples = [COUNT_EX, TRANCE_EX] * 500
  t0 = time.perf_counter()
  compute_rewards([("accuracy", 1.0), ("format", 1.0)], completions, examples)
  assert time.perf_counter() - t0 < 1.0
