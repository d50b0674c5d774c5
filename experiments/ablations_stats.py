"""One table row per run, from the runs' own files: final accuracy with the demo's 95% interval, the first evaluation
step reaching GRPO's final accuracy, and the trainer's per-source metrics averaged over the training steps.

Nothing here recomputes what the trainer logs: the action-source ratio is `source_ratio/external` (the share of kept
rows that are external, rl/selection.py source_metrics) and the reward by source `kept/reward_mean/{policy,external}`.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Sequence

import numpy as np

import ablations_plan as plan_lib


def read_lines(workdir: str) -> list[dict]:
  from ekipl_jax.train import metrics as metrics_lib  # pylint: disable=g-import-not-at-top

  return metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))


def interval(scores_SE: np.ndarray) -> tuple[float, float]:
  """The 95% interval of the mean accuracy (%) as experiments/demo.py computes it (bootstrap over the evaluated
  examples, each keeping its row of per-seed scores). scores_SE: seeds x examples in [0, 1]."""
  return plan_lib.demo().bootstrap_ci(scores_SE)


def mean_curve(lines_per_seed: Sequence[Sequence[dict]], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(evaluation steps every seed has, mean over seeds of `key` there)."""
  from ekipl_jax.train import report  # pylint: disable=g-import-not-at-top

  steps, mean, _ = report.curves({"x": lines_per_seed}, key)["x"]
  return steps, mean


def steps_to(steps: np.ndarray, mean: np.ndarray, target: float) -> int | None:
  """First evaluation step at which the mean accuracy reaches `target` (GRPO's final mean), as the demo's table
  reads it; None if never."""
  from ekipl_jax.train import report  # pylint: disable=g-import-not-at-top

  return report.first_step_reaching(steps, mean, target)


def step_mean(lines_per_seed: Sequence[Sequence[dict]], key: str) -> float:
  """Mean of a training metric over every step of every seed where it is defined (the trainer logs NaN for a step
  without such rows, e.g. no kept external row); NaN when never defined."""
  v = [l[key] for lines in lines_per_seed for l in lines if "loss" in l and not math.isnan(l.get(key, math.nan))]
  return float(np.mean(v)) if v else float("nan")


def step_total(lines_per_seed: Sequence[Sequence[dict]], key: str) -> float:
  return float(sum(l.get(key, 0.0) for lines in lines_per_seed for l in lines if "loss" in l))


def summarize(base, workdirs: list[str], grpo_final: dict[str, float] | None) -> dict[str, Any]:
  """One table row. workdirs: the run's per-seed RL folders (seed order); grpo_final: split -> GRPO's final mean
  accuracy (None: no GRPO run to compare with)."""
  steps = base.rl.steps
  lines = [read_lines(w) for w in workdirs]
  row: dict[str, Any] = {"seeds": len(workdirs), "workdirs": workdirs}
  for split in base.data.eval_splits:
    key = f"eval/{split}/accuracy"
    finals = []
    for w, ls in zip(workdirs, lines):
      last = [l[key] for l in ls if l["step"] == steps and key in l]
      if not last:
        raise ValueError(f"{w}/metrics.jsonl has no {key} at the last step {steps}")
      finals.append(float(last[-1]))
    scores = np.stack([plan_lib.demo().example_scores(w, split, steps) for w in workdirs])  # [seeds, examples]
    if not np.allclose(scores.mean(1) * 100, finals, atol=1e-6):
      raise ValueError(f"{workdirs}: predictions/{split}_step{steps}.json disagree with metrics.jsonl {key}")
    lo, hi = interval(scores)
    st, mean = mean_curve(lines, key)
    row[split] = {
        "mean": float(np.mean(finals)),
        "per_seed": finals,
        "ci95": [lo, hi],
        "n_examples": int(scores.shape[1]),
        "curve": {"steps": st.tolist(), "mean": mean.tolist()},
    }
    if grpo_final is not None:
      row[split]["steps_to_grpo_final"] = steps_to(st, mean, grpo_final[split])
  row["external_ratio"] = step_mean(lines, "source_ratio/external")
  row["kept_reward_policy"] = step_mean(lines, "kept/reward_mean/policy")
  row["kept_reward_external"] = step_mean(lines, "kept/reward_mean/external")
  row["pool_reward_external"] = step_mean(lines, "pool/reward_mean/external")
  row["kl"] = step_mean(lines, "kl")
  ext = step_total(lines, "groups/external_rows")
  row["external_with_behaviour"] = step_total(lines, "groups/external_with_behaviour") / ext if ext else float("nan")
  row["wall_s"] = [wall(w) for w in workdirs]
  return row


def wall(workdir: str) -> float | None:
  """The run's wall seconds from its done.json (None for a reused demo run, which has none)."""
  path = os.path.join(workdir, "done.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f).get("wall_s")
