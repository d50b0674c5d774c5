"""The embedded demo: the paper's central ablation (GRPO vs Vision-EKIPL) in miniature, on a CPU, in minutes.

1. synthetic CLEVR-Math-like counting data (TFDS, generated offline from a seed)
2. a tiny Qwen2.5-VL-architecture policy from scratch: BPE tokenizer trained on the data, saved as an HF folder
3. CoT-SFT warm start on scripted chains of thought
4. the auxiliary trajectory store: a perfect and a 60%-accurate scripted solver stand in for external models
5. RL from the same SFT checkpoint with the same seeds: GRPO (policy samples only) and EKIPL (top-G of the pool)
6. evaluation on the ID and OOD test splits; results/RESULTS.md, results.json and curves.png

  python experiments/demo.py --out results [--seeds 0,1] [--rl_steps 40]
"""

import copy
import json
import os
import sys
import time

from absl import app, flags, logging

_OUT = flags.DEFINE_string("out", "results", "output folder")
_SEEDS = flags.DEFINE_string("seeds", "0,1", "comma-separated RL seeds (each runs both arms)")
_RL_STEPS = flags.DEFINE_integer("rl_steps", -1, "override config.rl.steps (-1: the config's)")
_SFT_STEPS = flags.DEFINE_integer("sft_steps", -1, "override config.sft.steps (-1: the config's)")

ARMS = {"GRPO": dict(selection="none"), "EKIPL": dict(selection="ekipl")}
SOLVERS = (("solver_strong", 1.0), ("solver_weak", 0.6))  # (source name, accuracy) of the scripted external models


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint write at INFO
  from configs import demo as demo_config  # pylint: disable=g-import-not-at-top
  from ekipl_jax.data import aux_sources  # pylint: disable=g-import-not-at-top
  from ekipl_jax.train import data as data_lib, report, trainer  # pylint: disable=g-import-not-at-top

  t_start = time.time()
  out = os.path.abspath(_OUT.value)
  base = demo_config.get_config()
  base.data.data_dir = os.path.join(out, "tfds")
  if _RL_STEPS.value > 0:
    base.rl.steps = _RL_STEPS.value
  if _SFT_STEPS.value > 0:
    base.sft.steps = _SFT_STEPS.value

  # 1-3: data, from-scratch policy, SFT (evaluated before RL: the RL curves start from it).
  sft_cfg = copy.deepcopy(base)
  sft_cfg.stage, sft_cfg.workdir = "sft", os.path.join(out, "sft")
  sft_cfg.eval.every = 0
  sft = trainer.run(sft_cfg)
  print(f"[demo] SFT done in {time.time() - t_start:.0f}s: {sft['hf']}")

  # 4: external responses for every training example, written once (a rerun skips stored ids).
  builder = data_lib.prepare(base.data)
  train = data_lib.first(data_lib.source(builder, base.data.train_split), 0)
  eval_ids = {ex["id"] for s in base.data.eval_splits for ex in data_lib.first(data_lib.source(builder, s), 0)}
  store = os.path.join(out, "aux")
  for name, accuracy in SOLVERS:
    aux_sources.write_from_solver(
        train, store, name=name, accuracy=accuracy, seed=17, k=base.rl.num_external_per_model, refuse_ids=eval_ids
    )

  # 5-6: both arms from the same SFT checkpoint, same seeds.
  runs = {arm: [] for arm in ARMS}
  finals = {"SFT (RL start)": {}, **{arm: {} for arm in ARMS}}
  for seed in [int(s) for s in _SEEDS.value.split(",") if s]:
    for arm, overrides in ARMS.items():
      cfg = copy.deepcopy(base)
      cfg.stage, cfg.seed, cfg.model.init_from = "rl", seed, sft["hf"]
      cfg.workdir = os.path.join(out, "rl", f"{arm.lower()}_seed{seed}")
      cfg.aux.store = store
      cfg.rl.update(overrides)
      t0 = time.time()
      res = trainer.run(cfg)
      lines = res["metrics"]
      runs[arm].append(lines)
      evals = [l for l in lines if any(k.startswith("eval/") for k in l)]
      last = evals[-1]
      if arm == "GRPO":  # the step-0 evaluation is the SFT checkpoint, shared by both arms of this seed
        for split in base.data.eval_splits:
          finals["SFT (RL start)"].setdefault(split, []).append(evals[0][f"eval/{split}/accuracy"])
      for split in base.data.eval_splits:
        finals[arm].setdefault(split, []).append(last[f"eval/{split}/accuracy"])
      print(
          f"[demo] {arm} seed {seed}: {time.time() - t0:.0f}s, "
          + ", ".join(f"{s} {last[f'eval/{s}/accuracy']:.1f}" for s in base.data.eval_splits)
      )

  write_results(out, base, runs, finals, report, time.time() - t_start)


def write_results(out, base, runs, finals, report, elapsed):
  splits = list(base.data.eval_splits)
  md = report.write_results(out, finals, name="results")
  keys = [(f"eval/{s}/accuracy", f"{s} accuracy (%)") for s in splits] + [("reward/accuracy", "train accuracy reward")]
  report.plot_curves(os.path.join(out, "curves.png"), runs, keys)
  import platform  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  cpu = (
      next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
      if os.path.exists("/proc/cpuinfo")
      else platform.processor()
  )
  lines = [
      "# Demo results (measured by `make demo`)",
      "",
      f"- command: `{' '.join(sys.argv)}` (the `make demo` target), {time.strftime('%Y-%m-%d')}",
      f"- machine: {platform.machine()}, {cpu}, {os.cpu_count()} cores; jax {jax.__version__} "
      f"({jax.default_backend()})",
      f"- synthetic counting (train {base.data.num_train}, test_id / test_ood {base.data.num_test} each, "
      f"{base.eval.num_examples} evaluated per split), a tiny Qwen2.5-VL from scratch, "
      f"SFT {base.sft.steps} steps, then RL {base.rl.steps} steps x {base.rl.batch_prompts} prompts "
      f"(G = {base.rl.group_size}, N = {base.rl.num_policy_samples}, K = {base.rl.num_external_per_model} per "
      f"external solver, lr {base.rl.optimizer.lr}); {len(runs['GRPO'])} seed(s) per arm; "
      f"total wall time {elapsed / 60:.1f} min.",
      "",
      "Final accuracy (%; mean ± std over seeds):",
      "",
      md,
      "",
      "RL step at which each arm first reaches GRPO's final accuracy (mean curve):",
      "",
  ]
  for s in splits:
    curves = report.curves(runs, f"eval/{s}/accuracy")
    target = curves["GRPO"][1][-1] if curves["GRPO"][1].size else float("nan")
    for arm, (steps, mean, _) in curves.items():
      lines.append(
          f"- {s}, {arm}: step {report.first_step_reaching(steps, mean, target)} " f"(GRPO final {target:.1f})"
      )
  lines += ["", "![curves](curves.png)", ""]
  with open(os.path.join(out, "RESULTS.md"), "w") as f:
    f.write("\n".join(lines))
  with open(os.path.join(out, "runs.json"), "w") as f:
    json.dump(runs, f)
  print("\n".join(lines))
  print(f"[demo] wrote {out}/RESULTS.md, {out}/results.md, {out}/results.json, {out}/curves.png")


if __name__ == "__main__":
  app.run(main)
