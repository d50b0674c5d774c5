"""The paper's ablations in miniature: every ablation axis on the embedded demo task, from the demo's SFT checkpoint.

  python experiments/ablations.py [--out results] [--seeds 0,1,2] [--rl_steps N] [--sft_steps N]
      [--axes selection,models,k,treatment,kl] [--doc docs/ABLATIONS.md] [--plan] [--jobs 1] [--nocompile_cache]

--out, --seeds, --rl_steps and --sft_steps are experiments/demo.py's flags with the same meaning: `--out results`
is `make demo`'s folder, whose SFT checkpoint, data and finished GRPO / EKIPL runs the ablations reuse; their own
runs go to OUT/ablations/. Each run is the demo's RL arm (experiments/demo.py run_arm: configs/demo.py's steps,
prompts and evaluation) with one knob changed (ablations_plan.py):
  selection  every registered selection rule: GRPO (no external rows) | EKIPL top-G | all (the pool kept whole) |
             replace (LUFFY-style, 1 external row)
  models     M external models: 0 (GRPO) | 1 weak | 1 strong | both (the demo's scripted solvers)
  k          K stored responses per external model: 1 | 2 | 4
  treatment  every registered external-token treatment (paper, LUFFY, both importance variants, RL-PLUS)
  kl         beta 0 | 0.04
Identical runs across axes (the EKIPL baseline is on every axis) run once: a run is keyed by its whole config.
--plan prints the runs, which of them are found finished or reused from the demo, and a time estimate from the
runs already timed on this machine; it trains nothing. --jobs N trains N runs at once, each in a process of its own
(spawned; worth it where one run leaves cores idle). The runs share a persistent XLA compilation cache
(OUT/ablations/jax_cache; --nocompile_cache turns it off): they compile the same programs, so all but the first load
them from disk (measured on a 2-step demo-config EKIPL run with beta 0.04, no evaluation: 79.7 CPU-s in a fresh
process with an empty cache, 36.6 with the cache the first one left).

Steps (ablations_runs.py):
1. SFT: the demo's checkpoint in OUT/sft (trained if missing; its own in OUT/ablations/sft if OUT/sft is another
   config's).
2. One external-response store for every run: the demo's write_aux with K = the largest K of the k axis, with
   behaviour log-probs log pi_b = 0 on every token (for the importance treatments).
3. Every (run, seed): the demo's own finished run in OUT/rl when it is the same run (GRPO and EKIPL), else run_arm
   under OUT/ablations/rl; a rerun skips finished runs (done.json), a killed run resumes from its checkpoint; one
   progress line per run with the ETA.
4. docs/ABLATIONS.md (ablations_report.py: a table per axis from each run's metrics.jsonl and predictions,
   ablations_stats.py), one PNG per axis beside it, and OUT/ablations/ablations.json.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from typing import Sequence

import ablations_plan as plan_lib  # the ablations_*.py beside this file (the script's folder is first on sys.path)
import ablations_report as report_lib
import ablations_runs as runs_lib
import ablations_stats as stats_lib

SEEDS = (0, 1, 2)


def select_axes(base, only_axes: Sequence[str], only_labels: Sequence[str]) -> dict:
  """The axes to run: all, or those named (and within them the arms labelled), plus the GRPO reference."""
  every = plan_lib.axes_for(base)
  axes = every
  if only_axes:
    unknown = set(only_axes) - set(every)
    if unknown:
      raise ValueError(f"--axes: unknown {sorted(unknown)} (axes: {', '.join(every)})")
    axes = {a: every[a] for a in only_axes}
  if only_labels:
    axes = {a: [v for v in vals if v[0] in only_labels] for a, vals in axes.items()}
    axes = {a: v for a, v in axes.items() if v}
  return plan_lib.with_references(axes, every)


def ablation_base(base, out: str):
  """The demo's config with the ablations' store (OUT/ablations/aux)."""
  return plan_lib.apply(base, {"aux.store": os.path.join(out, "ablations", "aux")})


def print_plan(base, out: str, runs: dict, rows: dict, seeds: Sequence[int], jobs: int = 1) -> int:
  """The run list, what is finished or reused, and the estimate; returns the number of runs left to train."""
  sft_hf = os.path.join(runs_lib.sft_out(base, out), "sft", "hf")
  todo = 0
  for run in runs.values():
    states = []
    for s in seeds:
      if runs_lib.demo_run(base, run, s, sft_hf, out, None):
        states.append(f"seed {s}: the demo's")
      elif os.path.exists(os.path.join(out, "ablations", "rl", f"{run.name.lower()}_seed{s}", "done.json")):
        states.append(f"seed {s}: done")
      else:
        states.append(f"seed {s}: to train")
        todo += 1
    print(f"{run.name} [{', '.join(run.axes)}]: {'; '.join(states)}")
  for axis, r in rows.items():
    print(f"{axis}: " + ", ".join(f"{label} -> {runs[k].name}" for label, k in r))
  walls, source = plan_lib.measured_run_seconds(out, runs, seeds)
  print(f"{len(runs)} distinct runs x {len(seeds)} seeds = {len(runs) * len(seeds)} runs")
  print(plan_lib.estimate_line(todo, walls, source, jobs), flush=True)
  return todo


def train_all(
    base, out: str, runs: dict, seeds: Sequence[int], sft_hf: str, jobs: int = 1, cache: str = ""
) -> tuple[dict, dict]:
  """Every (run, seed), reusing the demo's and skipping finished ones, the rest trained `jobs` at a time (each in a
  process of its own when jobs > 1); (key -> per-seed workdirs in seed order, counts)."""
  todo = [(run, s) for run in runs.values() for s in seeds]
  print(f"[ablations] {len(runs)} distinct runs x {len(seeds)} seeds = {len(todo)} runs", flush=True)
  found, counts, checked, train = {}, {"trained": 0, "skipped": 0, "reused": 0}, {}, []
  for run, seed in todo:
    reused = runs_lib.demo_run(base, run, seed, sft_hf, out, checked)
    if reused:
      found[(run.key, seed)] = reused
      counts["reused"] += 1
      print(f"[ablations] {run.name} seed {seed}: the demo's {reused}", flush=True)
    elif os.path.exists(_done(out, run, seed)):
      found[(run.key, seed)] = os.path.dirname(_done(out, run, seed))
      counts["skipped"] += 1
      print(f"[ablations] {run.name} seed {seed}: finished before, skipped", flush=True)
    else:
      train.append((run, seed))
  print(f"[ablations] {len(train)} runs to train, {jobs} at a time", flush=True)
  walls = []

  def finished(run, seed, workdir, wall):
    found[(run.key, seed)] = workdir
    walls.append(wall)
    counts["trained"] += 1
    left = len(train) - len(walls)
    eta = left * sum(walls) / len(walls) / jobs / 60
    print(
        f"[ablations] trained {len(walls)}/{len(train)}: {run.name} seed {seed} in {wall:.0f}s "
        f"(ETA {eta:.1f} min for {left} more)",
        flush=True,
    )

  if jobs == 1:
    runs_lib.use_compile_cache(cache)
    for run, seed in train:
      finished(run, seed, *runs_lib.run_one(base, run, seed, sft_hf, out))
  elif train:
    import concurrent.futures  # pylint: disable=g-import-not-at-top
    import multiprocessing  # pylint: disable=g-import-not-at-top

    spawn = multiprocessing.get_context("spawn")  # a fresh process: JAX does not survive fork
    with concurrent.futures.ProcessPoolExecutor(jobs, spawn, runs_lib.use_compile_cache, (cache,)) as pool:
      futures = {pool.submit(runs_lib.run_one, base, run, seed, sft_hf, out): (run, seed) for run, seed in train}
      for fut in concurrent.futures.as_completed(futures):
        finished(*futures[fut], *fut.result())
  workdirs = {run.key: [found[(run.key, s)] for s in seeds] for run in runs.values()}
  return workdirs, counts


def _done(out: str, run, seed: int) -> str:
  return os.path.join(out, "ablations", "rl", f"{run.name.lower()}_seed{seed}", "done.json")


def machine() -> str:
  import jax  # pylint: disable=g-import-not-at-top

  cpu = "?"
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "?")
  load = " / ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
  return (
      f"{platform.machine()}, {cpu}, {os.cpu_count()} cores, load average at the end {load}; "
      f"jax {jax.__version__} ({jax.default_backend()})"
  )


def run_all(
    base,
    *,
    out: str,
    doc: str,
    seeds: Sequence[int] = SEEDS,
    only_axes: Sequence[str] = (),
    only_labels: Sequence[str] = (),
    partial: str = "",
    command: str = "",
    jobs: int = 1,
    compile_cache: bool = False,
) -> dict:
  """Runs the plan from the demo's SFT checkpoint (resuming), writes `doc`, its PNGs and OUT/ablations/ablations.json;
  returns the JSON's content. base: the demo's config (experiments/demo.py base_config(out)); jobs: runs trained at
  once; compile_cache: a persistent XLA cache in OUT/ablations/jax_cache shared by the runs."""
  import json  # pylint: disable=g-import-not-at-top

  t_start = time.time()
  out = os.path.abspath(out)
  abl = os.path.join(out, "ablations")
  base = ablation_base(base, out)
  runs, rows = plan_lib.plan(base, select_axes(base, only_axes, only_labels))
  keys = {
      arm: plan_lib.config_key(plan_lib.apply(base, plan_lib.rl_overrides(o)))
      for arm, o in plan_lib.demo().ARMS.items()
  }

  sft_hf = runs_lib.sft_stage(base, out)
  ks = [base.rl.num_external_per_model] + [r.overrides.get("rl.num_external_per_model", 0) for r in runs.values()]
  runs_lib.write_store(base, base.aux.store, max(ks), sft_hf)
  cache = os.path.join(abl, "jax_cache") if compile_cache else ""
  workdirs, counts = train_all(base, out, runs, seeds, sft_hf, jobs, cache)

  grpo_final = None
  if keys["GRPO"] in workdirs:
    grpo_final = {s: stats_lib.summarize(base, workdirs[keys["GRPO"]], None)[s]["mean"] for s in base.data.eval_splits}
  results = {key: stats_lib.summarize(base, wds, grpo_final) for key, wds in workdirs.items()}
  sft_rel = os.path.relpath(sft_hf, plan_lib.ROOT) if sft_hf.startswith(plan_lib.ROOT) else sft_hf
  meta = {
      "command": command or "make ablations",
      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
      "machine": machine(),
      "wall_min": (time.time() - t_start) / 60,
      **counts,
      "sft_hf": sft_rel,
      "seeds": list(seeds),
      "unique": len(runs),
      "baseline": keys["EKIPL"],
      "partial": partial,
      "jobs": jobs,
  }
  report_lib.write_doc(doc, base, rows, runs, results, meta)
  summary = report_lib.summary_json(meta, rows, runs, results)
  with open(os.path.join(abl, "ablations.json"), "w") as f:
    json.dump(summary, f, indent=1)
  print(f"[ablations] wrote {doc} and its PNGs, {abl}/ablations.json ({meta['wall_min']:.1f} min)", flush=True)
  return summary


def main(argv):
  from absl import flags, logging  # pylint: disable=g-import-not-at-top

  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint write at INFO
  f = flags.FLAGS
  out = os.path.abspath(f.out)
  base = plan_lib.demo().base_config(out, f.rl_steps, f.sft_steps)
  seeds = tuple(int(s) for s in f.seeds.split(",") if s)
  only_axes = tuple(a for a in f.axes.split(",") if a)
  if f.plan:
    base = ablation_base(base, out)
    print_plan(base, out, *plan_lib.plan(base, select_axes(base, only_axes, ())), seeds, f.jobs)
    return
  partial = [f"{n} {f[n].value}" for n in ("rl_steps", "sft_steps") if f[n].value > 0]
  if seeds != SEEDS:
    partial.append(f"seeds {f.seeds}")
  if only_axes:
    partial.append(f"axes {f.axes} only")
  run_all(
      base,
      out=out,
      doc=f.doc,
      seeds=seeds,
      only_axes=only_axes,
      partial="; ".join(partial),
      command=" ".join(["python experiments/ablations.py"] + sys.argv[1:]),
      jobs=f.jobs,
      compile_cache=f.compile_cache,
  )


def define_flags():
  """Our flags beside experiments/demo.py's (--out, --seeds, --rl_steps, --sft_steps, read from there)."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  plan_lib.demo()
  flags.DEFINE_string("doc", "docs/ABLATIONS.md", "the report (its PNGs go beside it)")
  flags.DEFINE_string("axes", "", "comma-separated axes to run (empty: all)")
  flags.DEFINE_bool("plan", False, "print the runs, what is finished or reused, and a time estimate; train nothing")
  flags.DEFINE_integer("jobs", 1, "runs trained at once, each in a process of its own")
  flags.DEFINE_bool("compile_cache", True, "a persistent XLA compilation cache in OUT/ablations/jax_cache for the runs")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top

  define_flags()
  app.run(main)
