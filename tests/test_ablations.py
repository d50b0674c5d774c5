"""experiments/ablations.py (and the ablations_*.py it is split into).

Fast: the plan (deduplication, validity, the demo arms), the table / interval / steps-to-final math against
hand-computed values on hand-written run folders, the generated claims and checks, configs/ablations.py's variants.
Slow: a two-run, two-step version end to end (SFT, the store, GRPO and EKIPL, one seed, docs written), a rerun that
skips both, and the demo's own finished runs reused instead of rerun.
"""

import copy
import importlib.util
import json
import os
import re
import shutil
import sys

import numpy as np
import pytest

from configs import ablations as ablations_config
from ekipl_jax.data import aux_store
from ekipl_jax.data import processor as processor_lib
from ekipl_jax.sampling import groups as groups_lib
from ekipl_jax.train import metrics as metrics_lib
from ekipl_jax.train import validate
from test_trainer import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module():
  if os.path.join(ROOT, "experiments") not in sys.path:  # its ablations_*.py siblings, as when run as a script
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
  spec = importlib.util.spec_from_file_location("ablations", os.path.join(ROOT, "experiments", "ablations.py"))
  mod = importlib.util.module_from_spec(spec)
  sys.modules["ablations"] = mod
  spec.loader.exec_module(mod)
  return mod


def _workdir(out: str, run: str) -> str:
  return os.path.join(out, "ablations", "rl", f"{run.lower()}_seed0")


def _config(root: str):
  c = tiny_config(root)  # data under root/tfds, as experiments/demo.py base_config(root) puts it
  c.rl.steps, c.eval.every = 2, 2
  c.rl.group_size = c.rl.num_policy_samples = 3  # GRPO keeps N = G policy rows
  c.rl.sampling.max_new_tokens = 100  # the solvers' responses fit (<= 98 tokens with the tiny tokenizer)
  return c


# ------------------------------------------------------------------------------------------------ the plan
@pytest.mark.parametrize("variant", ablations_config.VARIANTS)
def test_paper_variants_pass_validation(variant):
  cfg = ablations_config.get_config(variant)
  validate.config(cfg)  # raises ValueError naming the key (e.g. a group G larger than its pool N + M*K)
  M, r = len(cfg.aux.sources), cfg.rl
  if r.selection == "ekipl":
    assert r.num_policy_samples + M * r.num_external_per_model >= r.group_size


def test_plan_deduplicates_the_baseline_across_axes(tmp_path):
  abl = _module()
  plan = abl.plan_lib
  base = abl.ablation_base(_config(str(tmp_path)), str(tmp_path))
  runs, rows = plan.plan(base, plan.axes_for(base))
  # Every axis holds the demo's EKIPL arm (M = both solvers, K = 1, paper treatment, beta 0) once.
  baseline = plan.config_key(plan.apply(base, {"rl.selection": "ekipl"}))
  assert base.rl.beta == 0 and base.rl.num_external_per_model == 1 and base.rl.external_treatment == "paper"
  assert all(sum(k == baseline for _, k in r) == 1 for r in rows.values())
  assert sorted(runs[baseline].axes) == sorted(rows)
  # GRPO is the same run in the selection axis and as M = 0; both are the demo's arms, nothing else is.
  grpo = plan.config_key(plan.apply(base, {"rl.selection": "none"}))
  assert [k for _, k in rows["models"]][0] == grpo and grpo in [k for _, k in rows["selection"]]
  assert {k: r.demo_arm for k, r in runs.items() if r.demo_arm} == {grpo: "GRPO", baseline: "EKIPL"}
  # Distinct runs: 4 selection rules + 2 single-model pools + K 2, 4 + the non-paper treatments + beta 0.04.
  assert len(runs) == 4 + 2 + 2 + (len(plan.registered("TREATMENTS")) - 1) + 1
  assert len({r.name for r in runs.values()}) == len(runs)
  # The axis items are all there.
  labels = {a: [l for l, _ in r] for a, r in rows.items()}
  assert labels["selection"] == [
      "GRPO (no external)",
      "EKIPL top-G",
      "all (pool kept whole)",
      "replace (1 external row)",
  ]
  assert labels["models"] == ["M=0 (GRPO)", "M=1 weak (solver_weak)", "M=1 strong (solver_strong)", "M=2 (both)"]
  assert labels["k"] == ["K=1", "K=2", "K=4"] and labels["kl"] == ["beta=0", "beta=0.04"]
  assert set(plan.registered("TREATMENTS")) >= {"paper", "luffy", "importance", "importance_tis", "rlplus"}
  assert len(labels["treatment"]) == len(plan.registered("TREATMENTS"))


def test_plan_refuses_an_invalid_arm_naming_it(tmp_path):
  abl = _module()
  base = abl.ablation_base(_config(str(tmp_path)), str(tmp_path))
  axes = {"k": [("K=0", {"rl.num_external_per_model": 0})]}
  with pytest.raises(ValueError, match=r"axis 'k', arm 'K=0'.*rl.num_external_per_model"):
    abl.plan_lib.plan(base, axes)


def test_references_added_and_estimate(tmp_path):
  abl = _module()
  plan = abl.plan_lib
  base = abl.ablation_base(_config(str(tmp_path)), str(tmp_path))
  axes = abl.select_axes(base, ("kl",), ())
  assert [l for l, _ in axes["selection"]] == ["GRPO (no external)"]  # steps to GRPO's final needs GRPO
  runs, _ = plan.plan(base, axes)
  # Timing: the ablations' own done.json when there are any (mean wall seconds), else the demo's run folders.
  assert plan.measured_run_seconds(str(tmp_path), runs, (0,)) == (
      [],
      f"the demo's finished RL runs in {tmp_path}/rl (file times)",
  )
  run = next(iter(runs.values()))
  for seed, wall in ((0, 60.0), (1, 180.0)):
    os.makedirs(tmp_path / "ablations" / "rl" / f"{run.name.lower()}_seed{seed}")
    (tmp_path / "ablations" / "rl" / f"{run.name.lower()}_seed{seed}" / "done.json").write_text(
        json.dumps({"wall_s": wall})
    )
  walls, _ = plan.measured_run_seconds(str(tmp_path), runs, (0, 1))
  assert walls == [60.0, 180.0]
  assert plan.estimate_line(10, walls, "x").startswith("10 runs to train x 2.0 min (mean of 2 runs: x) = about 20 min")
  assert "in sequence; with --jobs 2 at best 10 min" in plan.estimate_line(10, walls, "x", jobs=2)


def test_plan_mode_counts_the_demo_runs_it_reuses(tmp_path, capsys):
  abl = _module()
  out = str(tmp_path)
  base = abl.ablation_base(_config(out), out)
  runs, rows = abl.plan_lib.plan(base, abl.select_axes(base, (), ()))
  assert abl.print_plan(base, out, runs, rows, (0, 1)) == 2 * len(runs)  # nothing finished: every run to train
  # A finished demo GRPO run of seed 1 (config.json as run_arm writes it, last predictions, hf/) is reused.
  grpo = next(r for r in runs.values() if r.demo_arm == "GRPO")
  workdir = os.path.join(out, "rl", "grpo_seed1")
  cfg = abl.plan_lib.run_config(base, grpo, 1, os.path.join(out, "sft", "hf"), workdir)
  cfg.aux.store = os.path.join(out, "aux")  # the demo's store: not compared for GRPO, which reads none
  os.makedirs(os.path.join(workdir, "hf"))
  os.makedirs(os.path.join(workdir, "predictions"))
  for split in cfg.data.eval_splits:
    open(os.path.join(workdir, "predictions", f"{split}_step{cfg.rl.steps}.json"), "w").write("[]")
  open(os.path.join(workdir, "config.json"), "w").write(cfg.to_json())
  assert abl.print_plan(base, out, runs, rows, (0, 1)) == 2 * len(runs) - 1
  assert f"{grpo.name} [selection, models]: seed 0: to train; seed 1: the demo's" in capsys.readouterr().out
  cfg.rl.optimizer.lr *= 2  # another config in the demo's folder: trained again
  open(os.path.join(workdir, "config.json"), "w").write(cfg.to_json())
  assert abl.print_plan(base, out, runs, rows, (0, 1)) == 2 * len(runs)


# ------------------------------------------------------------------------------------------------ the table's math
def _fake_run(path, accs: dict, preds: dict, train: list[dict], steps: int):
  """A run folder as the trainer leaves it: metrics.jsonl (eval lines at the given steps, training lines) and the
  last evaluation's predictions."""
  os.makedirs(path / "predictions")
  lines = []
  for i, step in enumerate(sorted({s for a in accs.values() for s in a})):
    line = {"step": step, **{f"eval/{sp}/accuracy": a[step] for sp, a in accs.items() if step in a}}
    if step > 0:
      line.update({"loss": 0.1, **train[i - 1]})
    lines.append(json.dumps(line))
  (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
  for sp, scores in preds.items():
    (path / "predictions" / f"{sp}_step{steps}.json").write_text(json.dumps([{"scores": [s]} for s in scores]))


def test_summarize_against_hand_computed_values(tmp_path):
  abl = _module()
  base = _config(str(tmp_path))
  base.rl.steps, base.data.eval_splits = 20, ("test_id",)
  # Two seeds, 4 examples: finals 50% and 75%; curves 0/10/20 -> mean curve 25, 50, 62.5.
  t1 = [
      {
          "source_ratio/external": 0.25,
          "kept/reward_mean/external": 2.0,
          "groups/external_rows": 4,
          "groups/external_with_behaviour": 4,
      }
  ]
  t1.append(
      {
          "source_ratio/external": 0.0,
          "kept/reward_mean/external": float("nan"),
          "groups/external_rows": 4,
          "groups/external_with_behaviour": 0,
      }
  )
  _fake_run(tmp_path / "s0", {"test_id": {0: 25.0, 10: 50.0, 20: 50.0}}, {"test_id": [1, 0, 1, 0]}, t1, 20)
  _fake_run(tmp_path / "s1", {"test_id": {0: 25.0, 10: 50.0, 20: 75.0}}, {"test_id": [1, 1, 1, 0]}, t1[:1] * 2, 20)
  row = abl.stats_lib.summarize(base, [str(tmp_path / "s0"), str(tmp_path / "s1")], {"test_id": 50.0})
  r = row["test_id"]
  assert r["mean"] == 62.5 and r["per_seed"] == [50.0, 75.0] and r["n_examples"] == 4
  assert r["curve"] == {"steps": [0, 10, 20], "mean": [25.0, 50.0, 62.5]}
  assert r["steps_to_grpo_final"] == 10  # the mean curve first reaches 50 at step 10
  # The interval is experiments/demo.py's bootstrap over examples of the per-example mean over seeds (1, .5, 1, 0).
  assert r["ci95"] == list(abl.plan_lib.demo().bootstrap_ci(np.array([[1, 0, 1, 0], [1, 1, 1, 0]])))
  assert 0 <= r["ci95"][0] <= 62.5 <= r["ci95"][1] <= 100
  # Means over the training steps where a metric is defined: share (0.25 + 0 + 0.25 + 0.25) / 4; the external
  # kept reward is NaN in one step (no external row kept) and left out; 12 of 16 external rows had log-probs.
  assert row["external_ratio"] == pytest.approx(0.1875)
  assert row["kept_reward_external"] == 2.0 and np.isnan(row["kl"]) and np.isnan(row["kept_reward_policy"])
  assert row["external_with_behaviour"] == pytest.approx(12 / 16)
  # Never reaching the target: None; predictions that disagree with metrics.jsonl: an error naming the file.
  assert (
      abl.stats_lib.summarize(base, [str(tmp_path / "s0")], {"test_id": 50.5})["test_id"]["steps_to_grpo_final"] is None
  )
  (tmp_path / "s0" / "predictions" / "test_id_step20.json").write_text(json.dumps([{"scores": [1]}] * 4))
  with pytest.raises(ValueError, match="test_id_step20.json disagree"):
    abl.stats_lib.summarize(base, [str(tmp_path / "s0")], None)


def test_steps_to_and_interval_against_hand_values():
  abl = _module()
  st = abl.stats_lib
  steps = np.array([0, 10, 20, 30])
  assert st.steps_to(steps, np.array([20.0, 25.0, 31.0, 30.0]), 30.0) == 20  # first step at or above, not the last
  assert st.steps_to(steps, np.array([20.0, 25.0, 31.0, 30.0]), 20.0) == 0
  assert st.steps_to(steps, np.array([20.0, 25.0, 31.0, 30.0]), 31.5) is None
  assert st.interval(np.ones((3, 50))) == (100.0, 100.0)  # every example right for every seed: a point
  # One seed, half of 400 examples right: close to the binomial normal interval 50 +- 1.96 * sqrt(.25 / 400).
  s = np.zeros((1, 400))
  s[0, :200] = 1
  lo, hi = st.interval(s)
  half = 1.96 * np.sqrt(0.25 / 400) * 100
  assert lo == pytest.approx(50 - half, abs=1.0) and hi == pytest.approx(50 + half, abs=1.0)


def _row(mean, ci, per_seed, reach=None, share=0.0, kl=float("nan"), behaviour=float("nan")):
  r = {"test_id": {"mean": mean, "ci95": ci, "per_seed": per_seed}}
  if reach != "absent":
    r["test_id"]["steps_to_grpo_final"] = reach
  return r | {
      "external_ratio": share,
      "kept_reward_policy": 1.5,
      "kept_reward_external": float("nan"),
      "kl": kl,
      "external_with_behaviour": behaviour,
  }


def test_table_claims_and_checks_from_the_numbers(tmp_path):
  abl = _module()
  rep = abl.report_lib
  rows = [
      _row(30.0, [25.0, 35.0], [28.0, 32.0], 20),
      _row(40.0, [35.0, 45.0], [40.0], 10),
      _row(50.0, [36.0, 60.0], [50.0]),
  ]
  labels = ["GRPO", "EKIPL", "other"]
  table = rep.axis_table(["test_id"], labels, rows).splitlines()
  assert table[2] == "| GRPO | 30.00 [25.0, 35.0] (28.0 / 32.0) | 20 | 0.000 | 1.500 | n/a |"
  assert table[4].split(" | ")[2] == "not reached"
  # Touching intervals overlap; apart ones give a claim.
  assert rep.compare([35.0, 45.0], [25.0, 35.0]) == 0 and rep.compare([35.1, 45], [25, 35]) == 1
  assert rep.compare([10, 20], [25, 35]) == -1
  text = rep.claims(["test_id"], labels, rows, ref=1)
  assert text == [
      "- test_id: GRPO vs EKIPL (30.0 vs 40.0): intervals overlap: no claim.",
      "- test_id: other vs EKIPL (50.0 vs 40.0): intervals overlap: no claim.",
  ]
  assert "no arm's final accuracy lies apart from EKIPL's" in rep.shows(["test_id"], labels, rows, ref=1)
  rows[2]["test_id"]["ci95"] = [46.0, 60.0]
  assert "**other ends above EKIPL**" in rep.claims(["test_id"], labels, rows, ref=1)[1]
  assert "against EKIPL, other above on test_id" in rep.shows(["test_id"], labels, rows, ref=1)
  assert rep.speed(["test_id"], labels, rows, 40)[0].startswith(
      "- test_id: reaching GRPO's final mean accuracy: GRPO at step 20 (50%); EKIPL at step 10 (25%); "
      "never within 40 steps: other"
  )
  # The switches against the method: the external share each selection rule allows (G = N = 3, M = 2, K = 1).
  base = _config(str(tmp_path))
  shares = {
      s: rep.expected_share(abl.plan_lib.apply(base, {"rl.selection": s})) for s in ("none", "ekipl", "all", "replace")
  }
  assert shares == {"none": (0.0, 0.0), "ekipl": (0.0, 2 / 3), "all": (2 / 5, 2 / 5), "replace": (1 / 3, 1 / 3)}
  over = [{"rl.selection": "replace"}, {"rl.external_treatment": "importance"}, {"rl.beta": 0.04}]
  got = [
      _row(1, [0, 2], [1], share=1 / 3),
      _row(1, [0, 2], [1], share=0.5, behaviour=1.0),
      _row(1, [0, 2], [1], kl=0.01),
  ]
  assert rep.checks(base, "selection", over[:1], ["r"], got[:1]) == [
      "- r: external share 0.333, 0.333 expected: holds."
  ]
  assert rep.checks(base, "treatment", over[1:2], ["i"], got[1:2]) == [
      "- i: external share 0.500, within [0.000, 0.667] expected: holds.",
      "- i: 100% of external rows used the store's behaviour log-probs, 100% expected: holds.",
  ]
  assert (
      rep.checks(base, "kl", over[2:], ["b"], got[2:])[1]
      == "- b: KL to the reference logged, mean 0.0100 (beta 0.04): holds."
  )
  got[0]["external_ratio"] = 0.5
  assert "DOES NOT HOLD" in rep.checks(base, "selection", over[:1], ["r"], got[:1])[0]


def test_sft_reused_only_when_its_config_matches(tmp_path, monkeypatch):
  abl = _module()
  base = _config(str(tmp_path))
  calls = []
  sft = lambda cfg, out: calls.append(out) or os.path.join(out, "sft", "hf")
  monkeypatch.setattr(abl.plan_lib.demo(), "sft_stage", sft)
  assert abl.runs_lib.sft_stage(base, str(tmp_path)) == str(tmp_path / "sft" / "hf")  # nothing yet: the demo's folder
  os.makedirs(tmp_path / "sft")
  same = copy.deepcopy(base)
  same.data.data_dir, same.data.eval_splits, same.workdir = "/elsewhere", (), "x"  # not what SFT depends on
  (tmp_path / "sft" / "config.json").write_text(same.to_json())
  assert abl.runs_lib.sft_stage(base, str(tmp_path)) == str(tmp_path / "sft" / "hf")
  other = copy.deepcopy(base)
  other.sft.steps += 1
  (tmp_path / "sft" / "config.json").write_text(other.to_json())
  assert abl.runs_lib.sft_stage(base, str(tmp_path)) == str(tmp_path / "ablations" / "sft" / "hf")
  assert calls == [str(tmp_path)] * 2 + [str(tmp_path / "ablations")]


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_two_runs_two_steps_end_to_end(tmp_path):
  abl = _module()
  base = _config(str(tmp_path))
  out, doc = str(tmp_path), str(tmp_path / "docs" / "ABLATIONS.md")
  labels = ("GRPO (no external)", "EKIPL top-G")
  kw = dict(out=out, doc=doc, seeds=(0,), only_axes=("selection",), partial="test")
  # Both runs at once, each in a spawned process of its own, sharing a persistent compilation cache.
  summary = abl.run_all(base, only_labels=labels, jobs=2, compile_cache=True, **kw)
  assert summary["meta"]["trained"] == 2 and summary["meta"]["reused"] == 0
  assert os.listdir(os.path.join(out, "ablations", "jax_cache"))

  assert os.path.getsize(str(tmp_path / "docs" / "ablations_selection.png")) > 10_000
  text = open(doc).read()
  assert "PARTIAL RUN" in text and "What it shows:" in text and "DOES NOT HOLD" not in text

  # The table's cells are the numbers of each run's metrics.jsonl (final eval accuracy, means over the steps).
  table = {}
  for line in text.splitlines():
    cells = [c.strip() for c in line.strip("|").split("|")]
    if cells and cells[0] in labels:
      table[cells[0]] = cells
  assert set(table) == set(labels)
  for entry in summary["axes"]["selection"]:
    lines = metrics_lib.read_jsonl(os.path.join(_workdir(out, entry["run"]), "metrics.jsonl"))
    assert lines[-1]["step"] == 2
    cells = table[entry["label"]]
    for i, split in enumerate(base.data.eval_splits):
      acc = lines[-1][f"eval/{split}/accuracy"]
      mean = float(re.match(r"([\d.]+) \[", cells[1 + i]).group(1))
      assert mean == pytest.approx(acc, abs=0.005)
    ratio = np.mean([l["source_ratio/external"] for l in lines if "loss" in l])
    assert float(cells[-3]) == pytest.approx(ratio, abs=5e-4)
    assert float(cells[-2]) == pytest.approx(
        np.mean([l["kept/reward_mean/policy"] for l in lines if "loss" in l]), abs=5e-4
    )
    if entry["label"] == labels[0]:
      assert ratio == 0 and cells[-1] == "n/a"
      n = len(base.data.eval_splits)
      assert all(c in ("0", "2") for c in cells[1 + n : 1 + 2 * n])  # GRPO reaches its own final by its last step
    else:  # the store's perfect solver wins a kept row in some group; 'paper' uses no behaviour log-probs
      assert all(l["groups/external_with_behaviour"] == 0 for l in lines if "loss" in l)
      ext = np.nanmean([l.get("kept/reward_mean/external", np.nan) for l in lines if "loss" in l])
      assert float(cells[-1]) == pytest.approx(ext, abs=5e-4)

  # One store: every stored response carries log-probs the trainer accepts for an importance run (groups.py's rule).
  assert not os.path.exists(os.path.join(out, "ablations", "aux_texts"))
  proc = processor_lib.load(os.path.join(out, "sft", "hf"))
  codec = lambda t: processor_lib.encode_completion(proc, t)
  with aux_store.open_store(os.path.join(out, "ablations", "aux")) as store:
    stored = [r for i in store.ids() for r in store.get(i)]
  assert len(stored) == 2 * base.data.num_train  # both solvers, K = 1 (the selection axis needs no more)
  for r in stored:
    ids, lp, _ = groups_lib._external_row(r, codec, [proc.eos_token_id], 10_000, abl.plan_lib.BEHAVIOUR_TOKENIZER)
    assert lp is not None and len(lp) == len(ids) and not np.any(lp)

  # A rerun trains nothing: both runs are found finished.
  metrics = {e["run"]: os.path.join(_workdir(out, e["run"]), "metrics.jsonl") for e in summary["axes"]["selection"]}
  mtimes = {run: os.path.getmtime(path) for run, path in metrics.items()}
  again = abl.run_all(base, only_labels=labels, **kw)
  assert again["meta"]["trained"] == 0 and again["meta"]["skipped"] == 2
  assert {run: os.path.getmtime(path) for run, path in metrics.items()} == mtimes

  # The demo's own finished runs are reused: move both runs to where make demo leaves its arms (the EKIPL one read
  # the demo's store, written by the demo's write_aux into OUT/aux), then no run is trained or found in ablations/.
  plan = abl.plan_lib
  demo_base = copy.deepcopy(base)
  demo_base.aux.store = os.path.join(out, "aux")
  plan.demo().write_aux(demo_base)
  for entry in summary["axes"]["selection"]:
    arm = "grpo" if entry["label"] == labels[0] else "ekipl"
    dest = os.path.join(out, "rl", f"{arm}_seed0")
    shutil.move(_workdir(out, entry["run"]), dest)
    cfg = json.load(open(os.path.join(dest, "config.json")))
    cfg["aux"]["store"], cfg["workdir"] = demo_base.aux.store, dest
    json.dump(cfg, open(os.path.join(dest, "config.json"), "w"))
  third = abl.run_all(base, only_labels=labels, **kw)
  assert (third["meta"]["trained"], third["meta"]["skipped"], third["meta"]["reused"]) == (0, 0, 2)
  for entry in third["axes"]["selection"]:
    assert third["runs"][entry["run"]]["test_id"]["mean"] == summary["runs"][entry["run"]]["test_id"]["mean"]
  # Another config in the demo's folder is not reused.
  runs, _ = plan.plan(
      abl.ablation_base(base, out), abl.select_axes(abl.ablation_base(base, out), ("selection",), labels)
  )
  grpo = next(r for r in runs.values() if r.demo_arm == "GRPO")
  sft_hf = os.path.join(out, "sft", "hf")
  assert abl.runs_lib.demo_run(abl.ablation_base(base, out), grpo, 0, sft_hf, out, {}) == os.path.join(
      out, "rl", "grpo_seed0"
  )
  other = copy.deepcopy(base)
  other.rl.optimizer.lr *= 2
  assert abl.runs_lib.demo_run(abl.ablation_base(other, out), grpo, 0, sft_hf, out, {}) is None
