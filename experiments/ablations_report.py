"""docs/ABLATIONS.md and one PNG per axis, from the rows ablations_stats.py reads out of the runs.

Every sentence about results is generated from the numbers: a difference is claimed only where two 95% intervals do
not overlap ("intervals overlap: no claim" otherwise), and each switch is checked against what the method says it
does (e.g. GRPO keeps no external row, 'replace' keeps exactly num_replace of G).
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import ablations_plan as plan_lib
import ablations_stats as stats_lib

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
        "weak one with the demo's lower accuracy; M=0 is GRPO. Not shown: how a real model's errors would act."
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
        "Not shown: KL's role over long runs."
    ),
}


def _fmt(x: float | None, nd: int = 2) -> str:
  return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def axis_table(splits: Sequence[str], labels: Sequence[str], rows: Sequence[dict]) -> str:
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
      if "steps_to_grpo_final" not in r[s]:
        cells.append("n/a")
      else:
        reach = r[s]["steps_to_grpo_final"]
        cells.append("not reached" if reach is None else str(reach))
    cells += [_fmt(r["external_ratio"], 3), _fmt(r["kept_reward_policy"], 3), _fmt(r["kept_reward_external"], 3)]
    out.append("| " + " | ".join(cells) + " |")
  return "\n".join(out)


def compare(a: Sequence[float], b: Sequence[float]) -> int:
  """+1 if interval a lies wholly above b, -1 wholly below, 0 if they overlap (touching counts as overlap)."""
  return 1 if a[0] > b[1] else -1 if a[1] < b[0] else 0


def claims(splits: Sequence[str], labels: Sequence[str], rows: Sequence[dict], ref: int) -> list[str]:
  """Each arm against the axis's reference arm, per split: a claim only where the 95% intervals do not overlap."""
  out = []
  for i, (label, r) in enumerate(zip(labels, rows)):
    if i == ref:
      continue
    for s in splits:
      c = compare(r[s]["ci95"], rows[ref][s]["ci95"])
      nums = f"({r[s]['mean']:.1f} vs {rows[ref][s]['mean']:.1f})"
      if c:
        out.append(f"- {s}: **{label} ends {'above' if c > 0 else 'below'} {labels[ref]}** {nums}.")
      else:
        out.append(f"- {s}: {label} vs {labels[ref]} {nums}: intervals overlap: no claim.")
  return out


def shows(splits: Sequence[str], labels: Sequence[str], rows: Sequence[dict], ref: int) -> str:
  """One generated sentence: what the axis shows about final accuracy, and what it does not."""
  seen = [
      (labels[i], s, compare(r[s]["ci95"], rows[ref][s]["ci95"]))
      for i, r in enumerate(rows)
      if i != ref
      for s in splits
  ]
  sep = [f"{l} {'above' if c > 0 else 'below'} on {s}" for l, s, c in seen if c]
  if not sep:
    return (
        f"What it shows: no arm's final accuracy lies apart from {labels[ref]}'s beyond the 95% intervals on any "
        "split, so the axis supports no accuracy claim at this scale (intervals overlap: no claim; not a proof that "
        "the arms are equal)."
    )
  return (
      f"What it shows: against {labels[ref]}, {'; '.join(sep)} (intervals apart). "
      f"What it does not: the other {len(seen) - len(sep)} of {len(seen)} comparisons (intervals overlap: no claim)."
  )


def speed(splits: Sequence[str], labels: Sequence[str], rows: Sequence[dict], steps: int) -> list[str]:
  """The paper's convergence figure, per split: the arms reaching GRPO's final accuracy and when (mean curves: no
  interval, so a description, not a claim)."""
  out = []
  for s in splits:
    got = [(l, r[s].get("steps_to_grpo_final")) for l, r in zip(labels, rows) if "steps_to_grpo_final" in r[s]]
    if not got:
      continue
    reach = [f"{l} at step {n} ({100 * n / steps:.0f}%)" for l, n in got if n is not None]
    never = [l for l, n in got if n is None]
    text = "; ".join(reach) if reach else "no arm"
    out.append(
        f"- {s}: reaching GRPO's final mean accuracy: {text}"
        + (f"; never within {steps} steps: {', '.join(never)}" if never else "")
        + " (mean curves over seeds, no interval: descriptive only)."
    )
  return out


def expected_share(cfg) -> tuple[float, float]:
  """The external share of kept rows the selection rule allows, (low, high), from the config (rl/selection.py)."""
  r, M = cfg.rl, len(cfg.aux.sources)
  pool_ext = M * r.num_external_per_model
  if r.selection == "none":
    return 0.0, 0.0
  if r.selection == "replace":
    return r.num_replace / r.group_size, r.num_replace / r.group_size
  if r.selection == "all":
    share = pool_ext / (r.num_policy_samples + pool_ext)
    return share, share
  return 0.0, min(pool_ext, r.group_size) / r.group_size  # ekipl: by reward, at most every external row


def checks(base, axis: str, overrides: Sequence[dict], labels: Sequence[str], rows: Sequence[dict]) -> list[str]:
  """Each arm's switch against what the method says it does, from the trainer's metrics: the external share of kept
  rows on every axis, the use of the stored behaviour log-probs on the treatment axis, the KL term on the kl axis."""
  from ekipl_jax.rl import loss  # pylint: disable=g-import-not-at-top

  out = []
  for over, label, r in zip(overrides, labels, rows):
    cfg = plan_lib.apply(base, over)
    lo, hi = expected_share(cfg)
    share = r["external_ratio"]
    ok = not math.isnan(share) and lo - 1e-9 <= share <= hi + 1e-9
    want = f"{lo:.3f}" if lo == hi else f"within [{lo:.3f}, {hi:.3f}]"
    out.append(
        f"- {label}: external share {_fmt(share, 3)}, {want} expected: {'holds' if ok else '**DOES NOT HOLD**'}."
    )
    if axis == "treatment" and not math.isnan(r["external_with_behaviour"]):
      need = bool(loss.TREATMENTS.info[cfg.rl.external_treatment].get("needs_behaviour"))
      got = r["external_with_behaviour"]
      ok = math.isclose(got, 1.0 if need else 0.0, abs_tol=1e-9)
      out.append(
          f"- {label}: {100 * got:.0f}% of external rows used the store's behaviour log-probs, "
          f"{100 if need else 0}% expected: {'holds' if ok else '**DOES NOT HOLD**'}."
      )
    if axis != "kl":
      continue
    has_kl = not math.isnan(r["kl"])
    ok = has_kl == (cfg.rl.beta > 0)
    out.append(
        f"- {label}: KL to the reference {'logged, mean ' + _fmt(r['kl'], 4) if has_kl else 'not computed'} "
        f"(beta {cfg.rl.beta:g}): {'holds' if ok else '**DOES NOT HOLD**'}."
    )
  return out


def header(base, meta: dict, n_eval: dict[str, int]) -> list[str]:
  r, splits = base.rl, list(base.data.eval_splits)
  lines = ["# Ablations on the embedded demo task (measured by `make ablations`)", ""]
  if meta["partial"]:
    lines += [f"**PARTIAL RUN, not the full ablation: {meta['partial']}.** The exact settings are below.", ""]
  return lines + [
      f"- command: `{meta['command']}`, {meta['date']}; total wall time {meta['wall_min']:.1f} min "
      f"({meta['trained']} runs trained in this invocation, {meta['skipped']} found finished, {meta['reused']} "
      f"reused from `make demo`'s own GRPO / EKIPL runs; {meta.get('jobs', 1)} trained at a time)",
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
      "- accuracy: mean over seeds of each run's final evaluation (`eval/SPLIT/accuracy` in its metrics.jsonl); the "
      "95% interval is experiments/demo.py's (a bootstrap over the evaluated examples, each keeping its per-seed "
      "scores); the per-seed numbers beside it show the seeds' spread. Intervals that overlap support no claim.",
      "- steps to GRPO's final: the first evaluation step at which the arm's mean-over-seeds accuracy reaches "
      "GRPO's final mean accuracy (the paper's convergence-speed figure; step 0 is the SFT checkpoint).",
      "- external share of kept rows (the action-source ratio, `source_ratio/external`) and the mean reward of the "
      "kept policy / external rows (`kept/reward_mean/*`, accuracy + format): means over all training steps and "
      "seeds of the trainer's own metrics.",
      "- checks: each switch against what the method says it does, read from the same metrics.",
      "",
  ]


def write_doc(doc: str, base, axes_rows: dict, runs: dict, results: dict, meta: dict) -> None:
  """docs/ABLATIONS.md and docs/ablations_<axis>.png. axes_rows: axis -> [(label, run key)]; runs: key -> Run;
  results: key -> ablations_stats.summarize row."""
  from ekipl_jax.train import report  # pylint: disable=g-import-not-at-top

  doc_dir = os.path.dirname(os.path.abspath(doc))
  os.makedirs(doc_dir, exist_ok=True)
  splits = list(base.data.eval_splits)
  n_eval = {s: next(iter(results.values()))[s]["n_examples"] for s in splits}
  lines = header(base, meta, n_eval)
  for axis, rows in axes_rows.items():
    labels = [l for l, _ in rows]
    data = [results[k] for _, k in rows]
    ref = next((i for i, (_, k) in enumerate(rows) if k == meta["baseline"]), 0)
    png = f"ablations_{axis}.png"
    curves = {l: [stats_lib.read_lines(w) for w in results[k]["workdirs"]] for l, k in rows}
    keys = [(f"eval/{s}/accuracy", f"{s} accuracy (%)") for s in splits]
    keys += [("source_ratio/external", "external share of kept rows"), ("reward/accuracy", "policy train accuracy")]
    report.plot_curves(os.path.join(doc_dir, png), curves, keys)
    lines += [f"## {plan_lib.AXIS_TITLES.get(axis, axis)}", "", AXIS_NOTES.get(axis, ""), ""]
    lines += [axis_table(splits, labels, data), "", shows(splits, labels, data, ref), ""]
    lines += [f"Against {labels[ref]} (95% intervals):", ""] + claims(splits, labels, data, ref) + [""]
    lines += ["Convergence speed:", ""] + (
        speed(splits, labels, data, base.rl.steps) or ["- no GRPO run to compare with."]
    )
    lines += ["", "Checks (the switch does what the method says):", ""]
    lines += checks(base, axis, [runs[k].overrides for _, k in rows], labels, data) + ["", f"![{axis}]({png})", ""]
  r = base.rl
  lines += [
      "What these tables do not show: a tiny from-scratch policy on synthetic counting with scripted external "
      f"models, {r.steps} RL steps and {len(meta['seeds'])} seed(s); they check that each switch behaves as the "
      "method says at this scale, not that the paper's numbers hold for Qwen-VL models on Reason-RFT.",
      "",
  ]
  with open(doc, "w") as f:
    f.write("\n".join(lines))


def summary_json(meta: dict, axes_rows: dict, runs: dict, results: dict) -> dict[str, Any]:
  from ablations_runs import jsonable  # pylint: disable=g-import-not-at-top

  return {
      "meta": meta,
      "axes": {a: [{"label": l, "run": runs[k].name, "key": k} for l, k in r] for a, r in axes_rows.items()},
      "runs": {runs[k].name: {**v, "overrides": jsonable(runs[k].overrides)} for k, v in results.items()},
  }
