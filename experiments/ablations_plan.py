"""What `make ablations` runs: the axes (one demo knob changed per arm), deduplicated runs, and a time estimate.

Each arm is the demo's RL arm (experiments/demo.py run_arm) with config overrides; a run is keyed by its whole config
(workdir, seed and name aside), so an arm met on several axes (the EKIPL baseline is on every axis, GRPO is both the
selection rule 'none' and M = 0) runs once. Every run's config passes train/validate.py before anything runs.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEHAVIOUR_TOKENIZER = "scripted solver: deterministic, log pi_b = 0"  # recorded with the store's behaviour log-probs
K_AXIS = (1, 2, 4)  # K stored responses per external model (issue 14)
BETAS = (0.0, 0.04)  # KL coefficients of the kl axis (issue 14)

SELECTION_LABELS = {"none": "GRPO (no external)", "ekipl": "EKIPL top-G", "all": "all (pool kept whole)"}
SELECTION_LABELS["replace"] = "replace (1 external row)"
TREATMENT_LABELS = {"paper": "paper (pi_old teacher-forced)", "luffy": "LUFFY shaping", "rlplus": "RL-PLUS"}
TREATMENT_LABELS |= {"importance": "importance (truncated ratio)", "importance_tis": "importance (TRL capped weight)"}
AXIS_TITLES = {
    "selection": "Selection rule",
    "models": "Number of external models M",
    "k": "Responses per external model K",
    "treatment": "External-token treatment",
    "kl": "KL to the reference (beta)",
}


@dataclasses.dataclass
class Run:
  """One deduplicated configuration (all seeds): its name (from where it is first met) and its config overrides."""

  name: str
  overrides: dict[str, Any]
  key: str  # hash of the whole RL config except workdir / seed / name
  axes: list[str] = dataclasses.field(default_factory=list)
  demo_arm: str = ""  # "GRPO" / "EKIPL" when the run is that demo arm (its finished runs are reused)


def demo():
  """experiments/demo.py as a module (its absl flags are defined once per process: the name is the one
  tests/test_demo_results.py loads it under, and a module of the same name is not loaded twice)."""
  if "demo_driver" not in sys.modules:
    spec = importlib.util.spec_from_file_location("demo_driver", os.path.join(ROOT, "experiments", "demo.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["demo_driver"] = mod
    try:
      spec.loader.exec_module(mod)
    except BaseException:
      del sys.modules["demo_driver"]  # no half-loaded module left behind
      raise
  return sys.modules["demo_driver"]


def registered(name: str) -> tuple[str, ...]:
  """SELECTIONS / TREATMENTS as configs/ablations.py derives them from the rl/ registries."""
  from configs import ablations as ablations_config  # pylint: disable=g-import-not-at-top

  return tuple(getattr(ablations_config, name))


def rl_overrides(arm: dict) -> dict[str, Any]:
  return {f"rl.{k}": v for k, v in arm.items()}


def axes_for(base) -> dict[str, list[tuple[str, dict[str, Any]]]]:
  """axis -> [(label, overrides of the demo config)]. The EKIPL baseline is the demo's EKIPL arm."""
  from ekipl_jax.rl import loss  # pylint: disable=g-import-not-at-top

  d = demo()
  ekipl, grpo = rl_overrides(d.ARMS["EKIPL"]), rl_overrides(d.ARMS["GRPO"])
  by_acc = sorted(d.SOLVERS, key=lambda s: s[1])
  weak, strong = by_acc[0][0], by_acc[-1][0]
  names = registered("SELECTIONS")
  order = [s for s in SELECTION_LABELS if s in names] + [s for s in names if s not in SELECTION_LABELS]
  treat = []
  for t in registered("TREATMENTS"):
    over = {**ekipl, "rl.external_treatment": t}
    if loss.TREATMENTS.info[t].get("needs_behaviour"):  # the stored log-probs, matched by their tokenizer string
      over["aux.behaviour_tokenizer"] = BEHAVIOUR_TOKENIZER
    treat.append((TREATMENT_LABELS.get(t, t), over))
  return {
      "selection": [(SELECTION_LABELS.get(s, s), {"rl.selection": s}) for s in order],
      "models": [
          ("M=0 (GRPO)", grpo),
          (f"M=1 weak ({weak})", {**ekipl, "aux.sources": (weak,)}),
          (f"M=1 strong ({strong})", {**ekipl, "aux.sources": (strong,)}),
          (f"M={len(d.SOLVERS)} (both)", {**ekipl, "aux.sources": tuple(n for n, _ in d.SOLVERS)}),
      ],
      "k": [(f"K={k}", {**ekipl, "rl.num_external_per_model": k}) for k in K_AXIS],
      "treatment": treat,
      "kl": [(f"beta={b:g}", {**ekipl, "rl.beta": b}) for b in BETAS],
  }


def apply(cfg, overrides: dict[str, Any]):
  cfg = copy.deepcopy(cfg)
  for dotted, value in overrides.items():
    *path, leaf = dotted.split(".")
    node = cfg
    for p in path:
      node = node[p]
    if leaf not in node:
      raise ValueError(f"experiments/ablations.py: override {dotted!r} is not a config key")
    node[leaf] = value
  return cfg


def config_key(cfg) -> str:
  d = json.loads(cfg.to_json())
  for k in ("workdir", "seed", "name"):
    d.pop(k, None)
  return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


def run_config(base, run: Run, seed: int, sft_hf: str, workdir: str):
  """The config run_arm builds for this run (stage rl, seed, init_from, workdir, the overrides)."""
  cfg = apply(base, run.overrides)
  cfg.stage, cfg.seed, cfg.model.init_from, cfg.workdir = "rl", seed, sft_hf, workdir
  return cfg


def plan(base, axes: dict[str, list[tuple[str, dict]]]) -> tuple[dict[str, Run], dict[str, list[tuple[str, str]]]]:
  """Deduplicated runs (key -> Run) and, per axis, its (label, run key) rows. Raises ValueError naming the axis and
  arm when an arm's config is one train/validate.py refuses (e.g. a group G larger than its pool)."""
  from ekipl_jax.train import validate  # pylint: disable=g-import-not-at-top

  arms = {config_key(apply(base, rl_overrides(o))): arm for arm, o in demo().ARMS.items()}
  runs: dict[str, Run] = {}
  rows: dict[str, list[tuple[str, str]]] = {}
  for axis, values in axes.items():
    rows[axis] = []
    for label, over in values:
      cfg = apply(base, over)
      key = config_key(cfg)
      if key not in runs:
        check = copy.deepcopy(cfg)
        check.stage = "rl"
        try:
          validate.config(check)
        except ValueError as e:
          raise ValueError(f"experiments/ablations.py: axis {axis!r}, arm {label!r}: {e}") from e
        slug = re.sub(r"[^a-z0-9]+", "-", f"{axis}-{label}".lower()).strip("-")[:40]
        runs[key] = Run(name=f"{slug}-{key}", overrides=over, key=key, demo_arm=arms.get(key, ""))
      runs[key].axes.append(axis)
      rows[axis].append((label, key))
  return runs, rows


def with_references(axes: dict, all_axes: dict) -> dict:
  """`axes` plus, when it lacks them, the GRPO arm (whose final accuracy every table's 'steps to GRPO's final'
  needs) as a reference row of the selection axis."""
  grpo = rl_overrides(demo().ARMS["GRPO"])
  if any(o == grpo for vals in axes.values() for _, o in vals):
    return axes
  label = next(l for l, o in all_axes["selection"] if o == grpo)
  sel = axes.get("selection", [])
  return {**axes, "selection": [(label, grpo)] + sel}


# ------------------------------------------------------------------------------------------------ time estimate
def measured_run_seconds(out: str, runs: dict[str, Run], seeds) -> tuple[list[float], str]:
  """Wall seconds of finished RL runs on this machine: the ablations' own (done.json) when there are any, else the
  demo's arms in OUT/rl (from config.json, written when a run starts, to metrics.jsonl's last write)."""
  walls = []
  for run in runs.values():
    for s in seeds:
      done = os.path.join(out, "ablations", "rl", f"{run.name.lower()}_seed{s}", "done.json")
      if os.path.exists(done):
        with open(done) as f:
          walls.append(float(json.load(f)["wall_s"]))
  if walls:
    return walls, "finished ablation runs (done.json)"
  rl_dir = os.path.join(out, "rl")
  for name in sorted(os.listdir(rl_dir)) if os.path.isdir(rl_dir) else []:
    cfg_path, metrics = os.path.join(rl_dir, name, "config.json"), os.path.join(rl_dir, name, "metrics.jsonl")
    if os.path.exists(cfg_path) and os.path.exists(metrics) and os.path.isdir(os.path.join(rl_dir, name, "hf")):
      walls.append(os.path.getmtime(metrics) - os.path.getmtime(cfg_path))
  return walls, f"the demo's finished RL runs in {rl_dir} (file times)"


def estimate_line(n_todo: int, walls: list[float], source: str, jobs: int = 1) -> str:
  """One line: the runs left and, from measured runs, the wall time they need in sequence (and with `jobs` processes
  at best, when the cores keep up)."""
  if not walls:
    return f"{n_todo} runs to train; no finished RL run to time them by (run `make demo` first for an estimate)"
  per = sum(walls) / len(walls)
  par = f"; with --jobs {jobs} at best {n_todo * per / 60 / jobs:.0f} min (if the cores keep up)" if jobs > 1 else ""
  return (
      f"{n_todo} runs to train x {per / 60:.1f} min (mean of {len(walls)} runs: {source}) = about "
      f"{n_todo * per / 60:.0f} min in sequence{par}; variants with more rows per step (all, K=4) or a reference pass "
      "(beta > 0) take longer than the mean, runs after the first compile less (the shared compilation cache)"
  )
