"""The embedded demo: the paper's central ablation (GRPO vs Vision-EKIPL) in miniature, on a CPU (~45 min on 2 cores).

1. synthetic CLEVR-Math-like counting data (TFDS, generated offline from a seed); the training records' chains of
   thought come from a flawed scripted teacher that lists gray objects but mostly leaves them out of its total
   (configs/demo.py)
2. a tiny Qwen2.5-VL-architecture policy from scratch: BPE tokenizer trained on the data, saved as an HF folder
3. CoT-SFT warm start on the flawed teacher's chains of thought
4. the auxiliary trajectory store: a perfect and a 60%-accurate scripted solver stand in for external models
5. RL from the same SFT checkpoint with the same seeds: GRPO (policy samples only) and EKIPL (top-G of the pool)
6. evaluation on the ID and OOD test splits; results/RESULTS.md, results.json and curves.png

  python experiments/demo.py --out results [--seeds 0,1,2] [--rl_steps 40]

The pieces are functions (sft_stage, write_aux, run_arm, summarize, results_json, write_results) for other drivers
(experiments/ablations.py) to run the same SFT checkpoint, steps and evaluation.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import sys
import time
from typing import Mapping, Sequence

import numpy as np
from absl import app, flags, logging

_OUT = flags.DEFINE_string("out", "results", "output folder")
_SEEDS = flags.DEFINE_string("seeds", "0,1,2", "comma-separated RL seeds (each runs both arms)")
_RL_STEPS = flags.DEFINE_integer("rl_steps", -1, "override config.rl.steps (-1: the config's)")
_SFT_STEPS = flags.DEFINE_integer("sft_steps", -1, "override config.sft.steps (-1: the config's)")

ARMS = {"GRPO": dict(selection="none"), "EKIPL": dict(selection="ekipl")}
SOLVERS = (("solver_strong", 1.0), ("solver_weak", 0.6))  # (source name, accuracy) of the scripted external models


def base_config(out: str, rl_steps: int = -1, sft_steps: int = -1):
  """configs/demo.py with every path under `out`."""
  from configs import demo as demo_config  # pylint: disable=g-import-not-at-top

  base = demo_config.get_config()
  base.data.data_dir = os.path.join(out, "tfds")
  base.aux.store = os.path.join(out, "aux")
  if rl_steps > 0:
    base.rl.steps = rl_steps
  if sft_steps > 0:
    base.sft.steps = sft_steps
  return base


def use_compile_cache(path: str) -> None:
  """A persistent XLA compilation cache in `path` for this process (empty: none). The RL runs compile the same
  sampler, evaluation and update programs (same shapes), so all but the first load them from disk; the executables
  are the same programs, so no number changes."""
  if not path:
    return
  import jax  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def sft_stage(base, out: str) -> str:
  """Data, from-scratch policy and CoT-SFT (a rerun reuses the finished checkpoint); returns its HF folder."""
  from ekipl_jax.train import trainer  # pylint: disable=g-import-not-at-top

  cfg = copy.deepcopy(base)
  cfg.stage, cfg.workdir = "sft", os.path.join(out, "sft")
  cfg.eval.every = 0  # no evaluation here: the RL runs evaluate the SFT checkpoint at their step 0
  return trainer.run(cfg)["hf"]


def write_aux(base) -> str:
  """The external responses for every training example, written once into base.aux.store (a rerun skips stored
  ids); no evaluation example may be in it."""
  from ekipl_jax.data import aux_sources  # pylint: disable=g-import-not-at-top
  from ekipl_jax.train import input_pipeline as data_lib  # pylint: disable=g-import-not-at-top

  builder = data_lib.prepare(base.data)
  train = data_lib.first(data_lib.source(builder, base.data.train_split), 0)
  eval_ids = {ex["id"] for s in base.data.eval_splits for ex in data_lib.first(data_lib.source(builder, s), 0)}
  for name, accuracy in SOLVERS:
    aux_sources.write_from_solver(
        train,
        base.aux.store,
        name=name,
        accuracy=accuracy,
        seed=17,
        k=base.rl.num_external_per_model,
        refuse_ids=eval_ids,
    )
  return base.aux.store


def run_arm(base, arm: str, overrides: Mapping, seed: int, sft_hf: str, out: str) -> list[dict]:
  """One RL run from the SFT checkpoint (workdir out/rl/<arm>_seed<seed>); returns its metric lines."""
  from ekipl_jax.train import trainer  # pylint: disable=g-import-not-at-top

  cfg = copy.deepcopy(base)
  cfg.stage, cfg.seed, cfg.model.init_from = "rl", seed, sft_hf
  cfg.workdir = os.path.join(out, "rl", f"{arm.lower()}_seed{seed}")
  cfg.rl.update(dict(overrides))
  return trainer.run(cfg)["metrics"]


# ---------------------------------------------------------------------------------------------- results
def eval_curve(lines: Sequence[dict], split: str) -> tuple[list[int], list[float]]:
  """(evaluation steps, accuracy % at each) from one run's metric lines."""
  pts = [(int(l["step"]), float(l[f"eval/{split}/accuracy"])) for l in lines if f"eval/{split}/accuracy" in l]
  return [s for s, _ in pts], [a for _, a in pts]


def results_json(
    splits: Sequence[str],
    n_eval: Mapping[str, int],
    seeds: Sequence[int],
    steps: Sequence[int],
    runs: Mapping[str, Sequence[Sequence[dict]]],
) -> dict:
  """The results file tools and plots read (docs/RESULTS.md):

  {"splits": [..], "n_eval": {split: int}, "seeds": [..], "steps": [evaluation steps, 0 first],
   "arms": {"SFT": {split: [accuracy % per seed]}, "GRPO": {split: [[accuracy % per step] per seed]}, "EKIPL": ..}}

  runs: arm -> per-seed metric lines (in `seeds` order); the SFT row is each seed's step-0 evaluation of the first
  arm (the SFT checkpoint, before any RL step). Every run must have evaluated at exactly `steps`.
  """
  steps = [int(s) for s in steps]
  if not steps or steps[0] != 0:
    raise ValueError(f"evaluation steps must start at 0 (the SFT checkpoint), got {steps}")
  arms: dict = {}
  for arm, per_seed in runs.items():
    if len(per_seed) != len(seeds):
      raise ValueError(f"arm {arm}: {len(per_seed)} runs for {len(seeds)} seeds")
    arms[arm] = {}
    for split in splits:
      rows = []
      for seed, lines in zip(seeds, per_seed):
        got_steps, acc = eval_curve(lines, split)
        if got_steps != steps:
          raise ValueError(f"arm {arm} seed {seed} split {split}: evaluated at steps {got_steps}, expected {steps}")
        rows.append(acc)
      arms[arm][split] = rows
  first = next(iter(runs))
  sft = {split: [rows[0] for rows in arms[first][split]] for split in splits}
  return {
      "splits": list(splits),
      "n_eval": {s: int(n_eval[s]) for s in splits},
      "seeds": [int(s) for s in seeds],
      "steps": steps,
      "arms": {"SFT": sft, **arms},
  }


def check_results_json(res: dict) -> None:
  """Raises ValueError unless `res` has exactly the documented layout (see results_json)."""
  if set(res) != {"splits", "n_eval", "seeds", "steps", "arms"}:
    raise ValueError(f"results.json keys {sorted(res)}")
  splits, seeds, steps = res["splits"], res["seeds"], res["steps"]
  if set(res["n_eval"]) != set(splits) or not all(isinstance(v, int) and v > 0 for v in res["n_eval"].values()):
    raise ValueError(f"n_eval {res['n_eval']} for splits {splits}")
  if not steps or steps[0] != 0 or sorted(set(steps)) != steps:
    raise ValueError(f"steps {steps}: increasing, 0 first")
  if set(res["arms"]) != {"SFT", "GRPO", "EKIPL"}:
    raise ValueError(f"arms {sorted(res['arms'])}")
  for arm, per_split in res["arms"].items():
    if set(per_split) != set(splits):
      raise ValueError(f"arm {arm}: splits {sorted(per_split)}")
    for split, v in per_split.items():
      shape = (len(seeds),) if arm == "SFT" else (len(seeds), len(steps))
      a = np.asarray(v, dtype=float)
      if a.shape != shape or not np.all((a >= 0) & (a <= 100)):
        raise ValueError(f"arm {arm} split {split}: shape {a.shape}, expected {shape} of percentages")


def bootstrap_ci(correct_SE: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
  """95% interval of the mean over seeds of the accuracy (%), resampling the evaluated examples (each example keeps
  its row of per-seed scores, so the interval covers the choice of test examples; the seeds' spread is shown
  beside it). correct_SE: scores in [0, 1] (or per-example differences in [-1, 1]), seeds x examples."""
  rng = np.random.default_rng(seed)
  per_example = np.asarray(correct_SE, dtype=float).mean(0)
  idx = rng.integers(0, per_example.size, size=(n_boot, per_example.size))
  means = 100.0 * per_example[idx].mean(1)
  return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def paired_diff_ci(a_SE: np.ndarray, b_SE: np.ndarray) -> tuple[float, float, float]:
  """Mean difference of two arms' accuracies (percentage points) with its paired 95% interval: each example keeps
  its score averaged over the seeds in both arms, and the examples are resampled together (bootstrap_ci of the
  per-example differences). a_SE, b_SE: scores in [0, 1], seeds x the same examples."""
  d_E = np.asarray(a_SE, dtype=float).mean(0) - np.asarray(b_SE, dtype=float).mean(0)
  lo, hi = bootstrap_ci(d_E[None, :])
  return 100.0 * float(d_E.mean()), lo, hi


def example_scores(workdir: str, split: str, step: int) -> np.ndarray:
  """Per-example scores of one evaluation, from the run's predictions/<split>_step<step>.json."""
  with open(os.path.join(workdir, "predictions", f"{split}_step{step}.json")) as f:
    return np.array([np.mean(p["scores"]) for p in json.load(f)], dtype=float)


def summarize(res: dict, workdirs: Mapping[str, Sequence[str]]) -> list[str]:
  """Markdown: the final table (mean over seeds, 95% interval, per-seed numbers) and the convergence steps.
  workdirs: arm -> per-seed RL workdirs (their predictions give the per-example scores of the intervals)."""
  splits, steps, seeds = res["splits"], res["steps"], res["seeds"]
  last = steps[-1]
  cells = {"SFT": {}, "GRPO": {}, "EKIPL": {}}
  pairs = {("GRPO", "SFT"): {}, ("EKIPL", "SFT"): {}, ("EKIPL", "GRPO"): {}}
  for split in splits:
    scores = {"SFT": [example_scores(w, split, 0) for w in workdirs["GRPO"]]}
    for arm in ("GRPO", "EKIPL"):
      scores[arm] = [example_scores(w, split, last) for w in workdirs[arm]]
    for arm, per_seed in scores.items():
      a = res["arms"][arm][split]
      finals = a if arm == "SFT" else [row[-1] for row in a]
      lo, hi = bootstrap_ci(np.stack(per_seed))
      cells[arm][split] = f"{np.mean(finals):.1f} [{lo:.1f}, {hi:.1f}] ({' / '.join(f'{v:.1f}' for v in finals)})"
    for a, b in pairs:
      d, lo, hi = paired_diff_ci(np.stack(scores[a]), np.stack(scores[b]))
      pairs[(a, b)][split] = f"{d:+.1f} [{lo:+.1f}, {hi:+.1f}]"
  lines = [
      "| method | " + " | ".join(splits) + " |",
      "|---|" + "---|" * len(splits),
      f"| SFT (the RL start) | " + " | ".join(cells["SFT"][s] for s in splits) + " |",
      f"| GRPO, {last} steps | " + " | ".join(cells["GRPO"][s] for s in splits) + " |",
      f"| EKIPL, {last} steps | " + " | ".join(cells["EKIPL"][s] for s in splits) + " |",
      "",
      f"Accuracy in percent: mean over seeds {seeds} [95% interval over the {res['n_eval'][splits[0]]} evaluated "
      "examples, bootstrap] (per seed).",
      "",
      f"Differences at step {last}, paired over the evaluated examples (each example's score averaged over the seeds; "
      "bootstrap 95% interval):",
      "",
      "| difference | " + " | ".join(splits) + " |",
      "|---|" + "---|" * len(splits),
      *[f"| {a} - {b} | " + " | ".join(pairs[(a, b)][s] for s in splits) + " |" for a, b in pairs],
      "",
      "Mean accuracy at each evaluation step, and the first step at which EKIPL's mean reaches GRPO's final mean:",
      "",
      "| split | arm | " + " | ".join(f"step {s}" for s in steps) + " |",
      "|---|---|" + "---|" * len(steps),
  ]
  reach = []
  for split in splits:
    means = {arm: np.mean(res["arms"][arm][split], axis=0) for arm in ("GRPO", "EKIPL")}
    for arm, m in means.items():
      lines.append(f"| {split} | {arm} | " + " | ".join(f"{v:.1f}" for v in m) + " |")
    hit = np.nonzero(means["EKIPL"] >= means["GRPO"][-1] - 1e-9)[0]
    first = steps[int(hit[0])] if hit.size else None
    if first is None:
      reach.append(f"- {split}: EKIPL never reaches GRPO's final {means['GRPO'][-1]:.1f} within the {last} steps")
    else:
      reach.append(
          f"- {split}: EKIPL reaches GRPO's final {means['GRPO'][-1]:.1f} at step {first} of {last} "
          f"({100 * first / last:.0f}% of the RL steps)"
      )
  return lines + [""] + reach


def teacher_flaw_text(dcfg) -> str:
  """What the SFT teacher gets wrong, in words (the data config's teacher_* and ood_held_out fields)."""
  blind, rate = dcfg.teacher_blind, dcfg.teacher_miss_rate
  if dcfg.get("teacher_flaw", "miss") == "uncounted":
    text = f"in {rate:.0%} of the scenes the SFT teacher lists the '{blind}' objects but leaves them out of its total"
  else:
    text = f"the SFT teacher misses each '{blind}' object with probability {rate}"
  if dcfg.get("ood_held_out", "some") == "one":
    text += "; one held-out colour-shape pair per test_ood scene"
  return text


def write_results(out: str, base, res: dict, workdirs, runs, elapsed: float) -> str:
  """results.json (the documented layout), curves.png, runs.json and RESULTS.md under `out`; returns RESULTS.md."""
  from ekipl_jax.train import report  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  check_results_json(res)
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(res, f, indent=1)
  with open(os.path.join(out, "runs.json"), "w") as f:
    json.dump(runs, f)
  keys = [(f"eval/{s}/accuracy", f"{s} accuracy (%)") for s in res["splits"]] + [
      ("reward/accuracy", "sampled training accuracy")
  ]
  report.plot_curves(os.path.join(out, "curves.png"), runs, keys)
  cpu = "?"
  if os.path.exists("/proc/cpuinfo"):
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
  load = os.getloadavg() if hasattr(os, "getloadavg") else ()
  lines = [
      "# Demo results (measured by `make demo`)",
      "",
      f"- command: `{' '.join(sys.argv)}`, {time.strftime('%Y-%m-%d %H:%M')}; total wall time {elapsed / 60:.1f} min",
      f"- machine: {platform.machine()}, {cpu}, {os.cpu_count()} cores, load average at the end "
      f"{' / '.join(f'{v:.1f}' for v in load)}; jax {jax.__version__} ({jax.default_backend()})",
      f"- synthetic counting (train {base.data.num_train}; {teacher_flaw_text(base.data)}); "
      f"{', '.join(f'{k} {v}' for k, v in res['n_eval'].items())} "
      "evaluated; a tiny Qwen2.5-VL from "
      f"scratch, SFT {base.sft.steps} steps x {base.sft.batch_size}, then RL {base.rl.steps} steps x "
      f"{base.rl.batch_prompts} prompts (G = {base.rl.group_size}, N = {base.rl.num_policy_samples}, K = "
      f"{base.rl.num_external_per_model} per external solver, lr {base.rl.optimizer.lr}, beta {base.rl.beta})",
      "",
      *summarize(res, workdirs),
      "",
      "![curves](curves.png)",
      "",
  ]
  md = "\n".join(lines)
  with open(os.path.join(out, "RESULTS.md"), "w") as f:
    f.write(md)
  return md


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint write at INFO
  t_start = time.time()
  out = os.path.abspath(_OUT.value)
  base = base_config(out, _RL_STEPS.value, _SFT_STEPS.value)
  seeds = [int(s) for s in _SEEDS.value.split(",") if s]
  use_compile_cache(os.path.join(out, "jax_cache"))

  sft_hf = sft_stage(base, out)
  print(f"[demo] SFT done in {time.time() - t_start:.0f}s: {sft_hf}")
  write_aux(base)

  runs = {arm: [] for arm in ARMS}
  workdirs = {arm: [] for arm in ARMS}
  for seed in seeds:
    for arm, overrides in ARMS.items():
      t0 = time.time()
      lines = run_arm(base, arm, overrides, seed, sft_hf, out)
      runs[arm].append(lines)
      workdirs[arm].append(os.path.join(out, "rl", f"{arm.lower()}_seed{seed}"))
      finals = {s: eval_curve(lines, s)[1][-1] for s in base.data.eval_splits}
      print(
          f"[demo] {arm} seed {seed}: {time.time() - t0:.0f}s, " + ", ".join(f"{s} {v:.1f}" for s, v in finals.items())
      )

  splits = list(base.data.eval_splits)
  steps = eval_curve(runs["GRPO"][0], splits[0])[0]
  n_eval = {s: min(base.eval.num_examples, base.data.num_test) for s in splits}
  res = results_json(splits, n_eval, seeds, steps, runs)
  md = write_results(out, base, res, workdirs, runs, time.time() - t_start)
  print(md)
  print(f"[demo] wrote {out}/RESULTS.md, {out}/results.json, {out}/curves.png")


if __name__ == "__main__":
  app.run(main)
