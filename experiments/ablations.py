"""The paper's ablations in miniature: every ablation axis on the embedded demo task, from the demo's SFT checkpoint.

  python experiments/ablations.py [--out results] [--seeds 0,1,2] [--rl_steps N] [--sft_steps N]
      [--axes selection,models,k,treatment,kl] [--doc docs/ABLATIONS.md] [--plan]

--out, --seeds, --rl_steps and --sft_steps are experiments/demo.py's flags with the same meaning: `--out results`
is `make demo`'s folder, whose SFT checkpoint and data the ablations reuse; the runs go to OUT/ablations/.
Each run is the demo's RL arm (experiments/demo.py run_arm: configs/demo.py's steps, prompts and evaluation) with
one knob changed:
  selection  every registered selection rule: GRPO (no external rows) | EKIPL top-G | all (the pool kept whole) |
             replace (LUFFY-style, 1 external row)
  models     M external models: 0 (GRPO) | 1 weak | 1 strong | both (the demo's scripted solvers)
  k          K stored responses per external model: 1 | 2 | 4
  treatment  every registered external-token treatment (paper, LUFFY, both importance variants, RL-PLUS)
  kl         beta 0 | 0.04
Identical runs across axes (the EKIPL baseline is in every axis) run once: a run is keyed by its whole config.

Steps:
1. SFT: experiments/demo.py sft_stage in OUT/sft (reused when finished; the trainer refuses a workdir whose config
   differs, and then the ablations train their own in OUT/ablations/sft).
2. The external-response store: the demo's write_aux with K = the largest K of the k axis, copied with behaviour
   log-probs log pi_b = 0 on every token (a scripted solver is a deterministic program of (example, seed); the
   importance treatments need them, the others ignore them).
3. Every (run, seed) through run_arm: a rerun skips finished runs (done.json) and a killed run resumes from its
   checkpoint; one progress line per run with the ETA.
4. docs/ABLATIONS.md (a table per axis, read from each run's metrics.jsonl and predictions), one PNG per axis beside
   it, and OUT/ablations/ablations.json.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import platform
import re
import sys
import time
from typing import Any, Sequence

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEHAVIOUR_TOKENIZER = "scripted solver: deterministic, log pi_b = 0"  # recorded with the store's behaviour log-probs
SEEDS = (0, 1, 2)
BOOTSTRAP = 10_000  # resamples of the nested (seeds, then examples) bootstrap behind the 95% intervals

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


# ------------------------------------------------------------------------------------------------ the demo's pieces
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


def _registered(name: str) -> tuple[str, ...]:
  from configs import ablations as ablations_config  # pylint: disable=g-import-not-at-top

  return tuple(getattr(ablations_config, name))  # derived from the rl/ registries


def _rl(overrides: dict) -> dict[str, Any]:
  return {f"rl.{k}": v for k, v in overrides.items()}


def axes_for(base) -> dict[str, list[tuple[str, dict[str, Any]]]]:
  """axis -> [(label, overrides of the demo config)]. The EKIPL baseline is the demo's EKIPL arm."""
  d = demo()
  ekipl, grpo = _rl(d.ARMS["EKIPL"]), _rl(d.ARMS["GRPO"])
  by_acc = sorted(d.SOLVERS, key=lambda s: s[1])
  weak, strong = by_acc[0][0], by_acc[-1][0]
  names = _registered("SELECTIONS")
  order = [s for s in SELECTION_LABELS if s in names] + [s for s in names if s not in SELECTION_LABELS]
  from ekipl_jax.rl import loss  # pylint: disable=g-import-not-at-top

  treat = []
  for t in _registered("TREATMENTS"):
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
      "k": [(f"K={k}", {**ekipl, "rl.num_external_per_model": k}) for k in (1, 2, 4)],
      "treatment": treat,
      "kl": [(f"beta={b:g}", {**ekipl, "rl.beta": b}) for b in (0.0, 0.04)],
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


def plan(base, axes: dict[str, list[tuple[str, dict]]]) -> tuple[dict[str, Run], dict[str, list[tuple[str, str]]]]:
  """Deduplicated runs (key -> Run) and, per axis, its (label, run key) rows."""
  runs: dict[str, Run] = {}
  rows: dict[str, list[tuple[str, str]]] = {}
  for axis, values in axes.items():
    rows[axis] = []
    for label, over in values:
      key = config_key(apply(base, over))
      if key not in runs:
        slug = re.sub(r"[^a-z0-9]+", "-", f"{axis}-{label}".lower()).strip("-")[:40]
        runs[key] = Run(name=f"{slug}-{key}", overrides=over, key=key)
      runs[key].axes.append(axis)
      rows[axis].append((label, key))
  return runs, rows


# ------------------------------------------------------------------------------------------------ stages
SFT_KEYS = ("seed", "model", "data", "sft", "mesh")  # what the SFT checkpoint depends on


def _sft_view(cfg: dict) -> dict:
  view = {k: copy.deepcopy(cfg.get(k)) for k in SFT_KEYS}
  for k in ("data_dir", "eval_splits"):  # where the generated data lies; the SFT stage evaluates nothing
    view["data"].pop(k, None)
  return view


def sft_stage(base, out: str) -> str:
  """The demo's SFT checkpoint: experiments/demo.py sft_stage in OUT/sft (trained there if missing, reused when
  finished), unless OUT/sft holds an SFT run of another config (its config.json differs in seed, model, data, sft or
  mesh): then the same stage in OUT/ablations/sft."""
  path = os.path.join(out, "sft", "config.json")
  if os.path.exists(path):
    with open(path) as f:
      if _sft_view(json.load(f)) != _sft_view(json.loads(base.to_json())):
        print(f"[ablations] {path} is another config's SFT: training ours in {out}/ablations/sft", flush=True)
        return demo().sft_stage(base, os.path.join(out, "ablations"))
  return demo().sft_stage(base, out)


def write_store(base, store: str, k: int, sft_hf: str) -> None:
  """The demo's solver responses (write_aux, K = k each) plus behaviour log-probs 0 on the policy's tokens."""
  from ekipl_jax.data import processor as processor_lib  # pylint: disable=g-import-not-at-top
  from ekipl_jax.data import aux_store  # pylint: disable=g-import-not-at-top
  from ekipl_jax.train import input_pipeline as data_lib  # pylint: disable=g-import-not-at-top

  marker = os.path.join(store, "complete.json")
  want = {"solvers": [list(s) for s in demo().SOLVERS], "k": k, "sft_hf": os.path.abspath(sft_hf)}
  if os.path.exists(marker):
    with open(marker) as f:
      if json.load(f) == want:
        return
    raise ValueError(f"{store}: written for another setting ({marker}); remove the folder to rewrite it")
  texts = copy.deepcopy(base)
  texts.aux.store, texts.rl.num_external_per_model = store + "_texts", k
  demo().write_aux(texts)
  builder = data_lib.prepare(base.data)
  train = data_lib.first(data_lib.source(builder, base.data.train_split), 0)
  eval_ids = {ex["id"] for s in base.data.eval_splits for ex in data_lib.first(data_lib.source(builder, s), 0)}
  proc = processor_lib.load(sft_hf)
  with aux_store.open_store(texts.aux.store) as src, aux_store.AuxStoreWriter(store, refuse_ids=eval_ids) as w:
    for ex in train:
      for r in src.get(ex["id"]):
        n = len(processor_lib.encode_completion(proc, r.text, add_eos=True))  # as sampling/groups.py tokenizes it
        w.append(dataclasses.replace(r, behaviour_logprobs=[0.0] * n, behaviour_tokenizer=BEHAVIOUR_TOKENIZER))
  with open(marker, "w") as f:
    json.dump(want, f)


def run_one(base, run: Run, seed: int, sft_hf: str, out: str) -> tuple[str, float | None]:
  """The demo's run_arm for one (run, seed) under OUT/ablations/rl; (workdir, wall seconds or None when it had
  finished before)."""
  workdir = os.path.join(out, "rl", f"{run.name.lower()}_seed{seed}")  # where run_arm puts it
  done = os.path.join(workdir, "done.json")
  if os.path.exists(done):
    return workdir, None
  rl = {k[3:]: v for k, v in run.overrides.items() if k.startswith("rl.")}
  if any("." in k for k in rl):
    raise ValueError(f"experiments/ablations.py: run_arm sets top-level rl fields only, got {sorted(rl)}")
  cfg = apply(base, {k: v for k, v in run.overrides.items() if not k.startswith("rl.")})
  t0, cpu0 = time.time(), time.process_time()
  lines = demo().run_arm(cfg, run.name, rl, seed, sft_hf, out)
  wall, cpu = time.time() - t0, time.process_time() - cpu0  # CPU: every thread of this process
  if not lines or lines[-1]["step"] != cfg.rl.steps:
    raise RuntimeError(f"{workdir}/metrics.jsonl does not end at step {cfg.rl.steps}")
  with open(done, "w") as f:
    json.dump({"key": run.key, "seed": seed, "wall_s": wall, "cpu_s": cpu, "overrides": _jsonable(run.overrides)}, f)
  return workdir, wall


def _jsonable(d: dict) -> dict:
  return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


# ------------------------------------------------------------------------------------------------ statistics
def read_lines(workdir: str) -> list[dict]:
  from ekipl_jax.train import metrics as metrics_lib  # pylint: disable=g-import-not-at-top

  return metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))


def nested_bootstrap(scores_SE: np.ndarray, rng: np.random.Generator, reps: int = BOOTSTRAP) -> tuple[float, float]:
  """95% percentile interval of the accuracy (%) over seeds and examples: each resample draws the seeds with
  replacement, then the examples with replacement (the same draw for every seed: they see the same examples)."""
  S, E = scores_SE.shape
  seeds = rng.integers(0, S, size=(reps, S))
  examples = rng.integers(0, E, size=(reps, E))
  per_seed = np.stack([scores_SE[:, ex].mean(1) for ex in examples])  # [reps, S]
  stat = np.take_along_axis(per_seed, seeds, 1).mean(1) * 100
  lo, hi = np.percentile(stat, [2.5, 97.5])
  return float(lo), float(hi)


def _mean(lines_per_seed: list[list[dict]], key: str) -> float:
  """Mean of a training metric over every step of every seed where it is defined (NaN: no such rows that step)."""
  v = [l[key] for lines in lines_per_seed for l in lines if "loss" in l and not math.isnan(l.get(key, math.nan))]
  return float(np.mean(v)) if v else float("nan")


def summarize(base, workdirs: list[str], grpo_final: dict[str, float] | None, rng) -> dict:
  """One table row from the runs' own files: final accuracies (mean over seeds, nested-bootstrap 95% interval),
  first evaluation step reaching GRPO's final accuracy, action-source ratio and kept reward by source."""
  from ekipl_jax.train import report  # pylint: disable=g-import-not-at-top

  steps = base.rl.steps
  lines = [read_lines(w) for w in workdirs]
  row: dict[str, Any] = {"seeds": len(workdirs), "workdirs": workdirs}
  for split in base.data.eval_splits:
    key = f"eval/{split}/accuracy"
    finals = [next(l[key] for l in ls if l["step"] == steps and key in l) for ls in lines]
    scores = np.stack([demo().example_scores(w, split, steps) for w in workdirs])  # [seeds, examples]
    if not np.allclose(scores.mean(1) * 100, finals, atol=1e-6):
      raise ValueError(f"{workdirs}: predictions/{split}_step{steps}.json disagree with metrics.jsonl {key}")
    lo, hi = nested_bootstrap(scores, rng)
    row[split] = {"mean": float(np.mean(finals)), "per_seed": finals, "ci95": [lo, hi], "n_examples": scores.shape[1]}
    st, mean, _ = report.curves({"x": lines}, key)["x"]
    row[split]["curve"] = {"steps": st.tolist(), "mean": mean.tolist()}
    if grpo_final is not None:
      row[split]["steps_to_grpo_final"] = report.first_step_reaching(st, mean, grpo_final[split])
  row["external_ratio"] = _mean(lines, "source_ratio/external")
  row["kept_reward_policy"] = _mean(lines, "kept/reward_mean/policy")
  row["kept_reward_external"] = _mean(lines, "kept/reward_mean/external")
  row["pool_reward_external"] = _mean(lines, "pool/reward_mean/external")
  ext = sum(l.get("groups/external_rows", 0.0) for ls in lines for l in ls)
  with_lp = sum(l.get("groups/external_with_behaviour", 0.0) for ls in lines for l in ls)
  row["external_with_behaviour"] = with_lp / ext if ext else float("nan")  # rows the importance treatments weigh
  row["wall_s"] = [_wall(w) for w in workdirs]
  return row


def _wall(workdir: str) -> float | None:
  with open(os.path.join(workdir, "done.json")) as f:
    return json.load(f).get("wall_s")


# ------------------------------------------------------------------------------------------------ report
def _fmt(x: float, nd: int = 2) -> str:
  return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def axis_table(base, labels: list[str], rows: list[dict]) -> str:
  splits = list(base.data.eval_splits)
  head = ["arm"] + [f"{s} accuracy % [95% CI] (per seed)" for s in splits]
  head += [f"steps to GRPO's final {s}" for s in splits]
  head += ["external share of kept rows", "kept reward: policy", "kept reward: external"]
  out = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
  for label, r in zip(labels, rows):
    cells = [label]
    for s in splits:
      lo, hi = r[s]["ci95"]
      cells.append(f"{r[s]['mean']:.2f} [{lo:.1f}, {hi:.1f}] ({' / '.join(f'{v:.1f}' for v in r[s]['per_seed'])})")
    for s in splits:
      reach = r[s].get("steps_to_grpo_final")
      cells.append("not reached" if reach is None else str(reach))
    cells += [_fmt(r["external_ratio"], 3), _fmt(r["kept_reward_policy"], 3), _fmt(r["kept_reward_external"], 3)]
    out.append("| " + " | ".join(cells) + " |")
  return "\n".join(out)


def claims(base, labels: list[str], rows: list[dict], ref: int) -> list[str]:
  """Interval comparisons against the axis's reference arm: a claim only where the 95% intervals do not overlap."""
  out = []
  for i, (label, r) in enumerate(zip(labels, rows)):
    if i == ref:
      continue
    for s in base.data.eval_splits:
      (lo, hi), (rlo, rhi) = r[s]["ci95"], rows[ref][s]["ci95"]
      if lo > rhi:
        out.append(f"- {s}: **{label} ends above {labels[ref]}** ({r[s]['mean']:.1f} vs {rows[ref][s]['mean']:.1f}).")
      elif hi < rlo:
        out.append(f"- {s}: **{label} ends below {labels[ref]}** ({r[s]['mean']:.1f} vs {rows[ref][s]['mean']:.1f}).")
      else:
        out.append(f"- {s}: {label} vs {labels[ref]}: intervals overlap, no claim.")
  return out


AXIS_NOTES = {
    "selection": (
        "Which pool rows enter the update. GRPO keeps the N policy samples; EKIPL the top G of the pool by reward "
        "(a correct external response displaces a wrong policy sample; ties go to policy rows); 'all' keeps the "
        "whole pool (a group of N + M*K rows, so its advantages are normalised over more rows); 'replace' keeps "
        "G - 1 policy rows and 1 external row whatever their rewards (LUFFY's mix). Not shown: which part of a "
        "difference comes from the group size rather than from the rule."
    ),
    "models": (
        "How many scripted external models feed the EKIPL pool, and which: the strong solver is always right, the "
        "weak one with the demo's lower accuracy; M=0 is GRPO. Not shown: how a real model's errors (which are not "
        "off-by-one miscounts) would act."
    ),
    "k": (
        "Responses stored per external model per prompt (EKIPL top-G). The strong solver is a deterministic "
        "program, so its K responses are one text K times; K mostly adds copies of it (and K different weak "
        "responses). Not shown: K with diverse strong responses."
    ),
    "treatment": (
        "How external tokens enter the loss (ekipl_jax/rl/loss.py). The importance variants read behaviour "
        "log-probs from the store: the scripted solvers are deterministic programs of (example, seed), so the "
        "store carries log pi_b = 0 on every token, and then 'importance' weighs external tokens by pi_theta "
        "itself (the ratio never reaches its cap) and 'importance_tis' scales the clipped term by the detached "
        "pi_old. Not shown: the treatments with a sampled external LLM's log-probs."
    ),
    "kl": (
        "The KL penalty to the frozen SFT policy (k3 estimator); beta > 0 adds a reference forward pass per step. "
        "Not shown: KL's role over long runs; over the demo's few steps the policy stays close to the reference."
    ),
}


def write_doc(doc: str, base, axes_rows, results, meta: dict) -> None:
  from ekipl_jax.train import report  # pylint: disable=g-import-not-at-top

  doc_dir = os.path.dirname(os.path.abspath(doc))
  os.makedirs(doc_dir, exist_ok=True)
  splits = list(base.data.eval_splits)
  n_eval = {s: next(iter(results.values()))[s]["n_examples"] for s in splits}
  r = base.rl
  lines = ["# Ablations on the embedded demo task (measured by `make ablations`)", ""]
  if meta["partial"]:
    lines += [f"**PARTIAL RUN, not the full ablation: {meta['partial']}.** The exact settings are below.", ""]
  lines += [
      f"- command: `{meta['command']}`, {meta['date']}; total wall time {meta['wall_min']:.1f} min "
      f"({meta['trained']} runs trained in this invocation, {meta['skipped']} found finished)",
      f"- machine: {meta['machine']}",
      f"- every run: the demo's RL stage (configs/demo.py) from one SFT checkpoint ({meta['sft_hf']}): "
      f"{r.steps} RL steps x {r.batch_prompts} prompts, G = {r.group_size}, N = {r.num_policy_samples}, "
      f"K = {r.num_external_per_model}, selection {r.selection!r}, treatment {r.external_treatment!r}, "
      f"beta {r.beta:g}, lr {r.optimizer.lr:g}; evaluated every {base.eval.every} steps on "
      f"{', '.join(f'{s} ({n_eval[s]} examples)' for s in splits)}; "
      f"seeds {', '.join(map(str, meta['seeds']))}; one knob changed per arm; {meta['unique']} distinct runs "
      f"x {len(meta['seeds'])} seeds (identical configs across axes run once).",
      "",
      "How to read the tables:",
      f"- accuracy: mean over seeds of each run's final evaluation (`eval/SPLIT/accuracy` in its metrics.jsonl); the "
      f"95% interval is a nested percentile bootstrap ({BOOTSTRAP} resamples) over seeds and examples: each "
      "resample draws the seeds with replacement, then the evaluated examples with replacement. Intervals that "
      "overlap support no claim; the sentences under each table state only the non-overlapping ones.",
      "- steps to GRPO's final: the first evaluation step at which the arm's mean-over-seeds accuracy reaches "
      "GRPO's final mean accuracy (the paper's convergence-speed figure; step 0 is the SFT checkpoint).",
      "- external share of kept rows (the action-source ratio, `source_ratio/external`) and the mean reward of the "
      "kept policy / external rows (`kept/reward_mean/*`, accuracy + format, at most 2): means over all training "
      "steps and seeds of the trainer's own metrics.",
      "",
  ]
  for axis, rows in axes_rows.items():
    labels = [l for l, _ in rows]
    data = [results[k] for _, k in rows]
    ref = next((i for i, (_, k) in enumerate(rows) if k == meta["baseline"]), 0)
    png = f"ablations_{axis}.png"
    runs = {l: [read_lines(w) for w in results[k]["workdirs"]] for l, k in rows}
    keys = [(f"eval/{s}/accuracy", f"{s} accuracy (%)") for s in splits]
    keys += [("source_ratio/external", "external share of kept rows"), ("reward/accuracy", "policy train accuracy")]
    report.plot_curves(os.path.join(doc_dir, png), runs, keys)
    lines += [f"## {AXIS_TITLES.get(axis, axis)}", "", AXIS_NOTES.get(axis, ""), "", axis_table(base, labels, data), ""]
    lines += [f"Against {labels[ref]} (95% intervals):", ""] + claims(base, labels, data, ref) + [""]
    if axis == "treatment":
      share = ", ".join(f"{l} {_fmt(100 * d['external_with_behaviour'], 0)}" for l, d in zip(labels, data))
      lines += [
          f"External rows that carried the store's behaviour log-probs (`groups/external_with_behaviour`, %): {share}.",
          "",
      ]
    lines += [f"![{axis}]({png})", ""]
  lines += [
      "What these tables do not show: a tiny from-scratch policy on synthetic counting with scripted external "
      f"models, {r.steps} RL steps and {len(meta['seeds'])} seed(s); they check that each switch behaves as the "
      "method says at this scale, not that the paper's numbers hold for Qwen-VL models on Reason-RFT.",
      "",
  ]
  with open(doc, "w") as f:
    f.write("\n".join(lines))


# ------------------------------------------------------------------------------------------------ driver
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
) -> dict:
  """Runs the plan from the demo's SFT checkpoint (resuming), writes `doc`, its PNGs and OUT/ablations/ablations.json;
  returns the JSON's content. base: the demo's config (experiments/demo.py base_config(out))."""
  import jax  # pylint: disable=g-import-not-at-top

  t_start = time.time()
  out = os.path.abspath(out)
  abl = os.path.join(out, "ablations")
  axes = axes_for(base)
  if only_axes:
    unknown = set(only_axes) - set(axes)
    if unknown:
      raise ValueError(f"--axes: unknown {sorted(unknown)} (axes: {', '.join(axes)})")
    axes = {a: axes[a] for a in only_axes}
  if only_labels:
    axes = {a: [v for v in vals if v[0] in only_labels] for a, vals in axes.items()}
    axes = {a: v for a, v in axes.items() if v}
  base = apply(base, {"aux.store": os.path.join(abl, "aux")})
  runs, rows = plan(base, axes)
  baseline = config_key(apply(base, _rl(demo().ARMS["EKIPL"])))
  grpo = config_key(apply(base, _rl(demo().ARMS["GRPO"])))

  sft_hf = sft_stage(base, out)
  ks = [base.rl.num_external_per_model] + [r.overrides.get("rl.num_external_per_model", 0) for r in runs.values()]
  write_store(base, base.aux.store, max(ks), sft_hf)

  todo = [(run, s) for run in runs.values() for s in seeds]
  print(f"[ablations] {len(runs)} distinct runs x {len(seeds)} seeds = {len(todo)} runs", flush=True)
  walls, workdirs, skipped = [], {}, 0
  for i, (run, seed) in enumerate(todo):
    workdir, wall = run_one(base, run, seed, sft_hf, abl)
    workdirs.setdefault(run.key, []).append(workdir)
    if wall is None:
      skipped += 1
      print(f"[ablations] {i + 1}/{len(todo)} {run.name} seed {seed}: finished before, skipped", flush=True)
      continue
    walls.append(wall)
    left = len(todo) - i - 1
    print(
        f"[ablations] {i + 1}/{len(todo)} {run.name} seed {seed}: {wall:.0f}s "
        f"(ETA {left * np.mean(walls) / 60:.1f} min for {left} more)",
        flush=True,
    )

  rng = np.random.default_rng(0)
  grpo_final = None
  if grpo in workdirs:
    grpo_final = {s: summarize(base, workdirs[grpo], None, rng)[s]["mean"] for s in base.data.eval_splits}
  results = {key: summarize(base, wds, grpo_final, rng) for key, wds in workdirs.items()}

  cpu = "?"
  if os.path.exists("/proc/cpuinfo"):
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
  load = " / ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
  meta = {
      "command": command or "make ablations",
      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
      "machine": f"{platform.machine()}, {cpu}, {os.cpu_count()} cores, load average at the end {load}; "
      f"jax {jax.__version__} ({jax.default_backend()})",
      "wall_min": (time.time() - t_start) / 60,
      "trained": len(walls),
      "skipped": skipped,
      "sft_hf": os.path.relpath(sft_hf, ROOT) if sft_hf.startswith(ROOT) else sft_hf,
      "seeds": list(seeds),
      "unique": len(runs),
      "baseline": baseline,
      "partial": partial,
  }
  write_doc(doc, base, rows, results, meta)
  summary = {
      "meta": meta,
      "axes": {a: [{"label": l, "run": runs[k].name, "key": k} for l, k in r] for a, r in rows.items()},
      "runs": {runs[k].name: {**v, "overrides": _jsonable(runs[k].overrides)} for k, v in results.items()},
  }
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
  base = demo().base_config(out, f.rl_steps, f.sft_steps)
  seeds = tuple(int(s) for s in f.seeds.split(",") if s)
  only_axes = tuple(a for a in f.axes.split(",") if a)
  partial = [f"{n} {f[n].value}" for n in ("rl_steps", "sft_steps") if f[n].value > 0]
  if seeds != SEEDS:
    partial.append(f"seeds {f.seeds}")
  if only_axes:
    partial.append(f"axes {f.axes} only")
  if f.plan:
    runs, rows = plan(base, axes_for(base))
    for a, r in rows.items():
      print(f"{a}: " + ", ".join(f"{l} -> {runs[k].name}" for l, k in r))
    print(f"{len(runs)} distinct runs x {len(seeds)} seeds = {len(runs) * len(seeds)} runs")
    return
  run_all(
      base,
      out=out,
      doc=f.doc,
      seeds=seeds,
      only_axes=only_axes,
      partial="; ".join(partial),
      command=" ".join(["python experiments/ablations.py"] + sys.argv[1:]),
  )


def define_flags():
  """Our flags beside experiments/demo.py's (--out, --seeds, --rl_steps, --sft_steps, read from there)."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  demo()
  flags.DEFINE_string("doc", "docs/ABLATIONS.md", "the report (its PNGs go beside it)")
  flags.DEFINE_string("axes", "", "comma-separated axes to run (empty: all)")
  flags.DEFINE_bool("plan", False, "print the deduplicated runs and exit")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top

  define_flags()
  app.run(main)
