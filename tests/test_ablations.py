"""experiments/ablations.py end to end on a two-run, two-step version: SFT, the store, GRPO and EKIPL (one seed),
docs written; the table's numbers are the runs' own metrics; a rerun skips both runs; the plan deduplicates."""

import copy
import importlib.util
import os
import re
import sys

import numpy as np
import pytest

from ekipl_jax.data import aux_store
from ekipl_jax.data import processor as processor_lib
from ekipl_jax.sampling import groups as groups_lib
from ekipl_jax.train import metrics as metrics_lib
from test_trainer import tiny_config

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module():
  spec = importlib.util.spec_from_file_location("ablations", os.path.join(ROOT, "experiments", "ablations.py"))
  mod = importlib.util.module_from_spec(spec)
  sys.modules["ablations"] = mod  # dataclasses resolve their annotations through the module
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


def test_plan_deduplicates_the_baseline_across_axes(tmp_path):
  abl = _module()
  base = _config(str(tmp_path))
  runs, rows = abl.plan(base, abl.axes_for(base))
  # Every axis holds the demo's EKIPL arm (M = both solvers, K = 1, paper treatment, beta 0) once.
  baseline = abl.config_key(abl.apply(base, {"rl.selection": "ekipl"}))
  assert base.rl.beta == 0 and base.rl.num_external_per_model == 1 and base.rl.external_treatment == "paper"
  assert all(sum(k == baseline for _, k in r) == 1 for r in rows.values())
  assert sorted(runs[baseline].axes) == sorted(rows)
  # GRPO is the same run in the selection axis and as M = 0.
  grpo = abl.config_key(abl.apply(base, {"rl.selection": "none"}))
  assert [k for _, k in rows["models"]][0] == grpo and grpo in [k for _, k in rows["selection"]]
  # Distinct runs: 4 selection rules + 2 single-model pools + K 2, 4 + the non-paper treatments + beta 0.04.
  assert len(runs) == 4 + 2 + 2 + (len(abl._registered("TREATMENTS")) - 1) + 1
  assert len({r.name for r in runs.values()}) == len(runs)


def test_two_runs_two_steps_end_to_end(tmp_path):
  abl = _module()
  base = _config(str(tmp_path))
  out, doc = str(tmp_path), str(tmp_path / "docs" / "ABLATIONS.md")
  labels = ("GRPO (no external)", "EKIPL top-G")
  kw = dict(out=out, doc=doc, seeds=(0,), only_axes=("selection",), partial="test")
  summary = abl.run_all(base, only_labels=labels, **kw)

  assert os.path.isfile(str(tmp_path / "docs" / "ablations_selection.png"))
  assert os.path.getsize(str(tmp_path / "docs" / "ablations_selection.png")) > 10_000
  text = open(doc).read()
  assert "PARTIAL RUN" in text

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
    else:  # the store's perfect solver wins a kept row in some group; 'paper' uses no behaviour log-probs
      assert all(l["groups/external_with_behaviour"] == 0 for l in lines if "loss" in l)
      ext = np.nanmean([l.get("kept/reward_mean/external", np.nan) for l in lines if "loss" in l])
      assert float(cells[-1]) == pytest.approx(ext, abs=5e-4)

  # Every stored response carries log-probs the trainer accepts for an importance run (same rule as groups.py).
  proc = processor_lib.load(os.path.join(out, "sft", "hf"))
  codec = lambda t: processor_lib.encode_completion(proc, t)
  with aux_store.open_store(os.path.join(out, "ablations", "aux")) as store:
    stored = [r for i in store.ids() for r in store.get(i)]
  assert len(stored) == 2 * base.data.num_train  # both solvers, K = 1 (the selection axis needs no more)
  for r in stored:
    ids, lp, _ = groups_lib._external_row(r, codec, [proc.eos_token_id], 10_000, abl.BEHAVIOUR_TOKENIZER)
    assert lp is not None and len(lp) == len(ids) and not np.any(lp)

  # A rerun trains nothing: both runs are found finished.
  metrics = {e["run"]: os.path.join(_workdir(out, e["run"]), "metrics.jsonl") for e in summary["axes"]["selection"]}
  mtimes = {run: os.path.getmtime(path) for run, path in metrics.items()}
  again = abl.run_all(base, only_labels=labels, **kw)
  assert again["meta"]["trained"] == 0 and again["meta"]["skipped"] == 2
  assert {run: os.path.getmtime(path) for run, path in metrics.items()} == mtimes


def test_nested_bootstrap_interval():
  abl = _module()
  # Every seed and example the same score: a point interval.
  lo, hi = abl.nested_bootstrap(np.ones((3, 50)), np.random.default_rng(0), reps=200)
  assert lo == hi == 100.0
  # One seed only, half the examples right: the examples' bootstrap, close to the binomial normal interval.
  s = np.zeros((1, 400))
  s[0, :200] = 1
  lo, hi = abl.nested_bootstrap(s, np.random.default_rng(0), reps=4000)
  half = 1.96 * np.sqrt(0.25 / 400) * 100
  assert lo == pytest.approx(50 - half, abs=1.0) and hi == pytest.approx(50 + half, abs=1.0)


def test_sft_reused_only_when_its_config_matches(tmp_path, monkeypatch):
  abl = _module()
  base = _config(str(tmp_path))
  calls = []
  monkeypatch.setattr(abl.demo(), "sft_stage", lambda cfg, out: calls.append(out) or os.path.join(out, "sft", "hf"))
  assert abl.sft_stage(base, str(tmp_path)) == str(tmp_path / "sft" / "hf")  # nothing there yet: the demo's folder
  os.makedirs(tmp_path / "sft")
  same = copy.deepcopy(base)
  same.data.data_dir, same.data.eval_splits, same.workdir = "/elsewhere", (), "x"  # not what SFT depends on
  (tmp_path / "sft" / "config.json").write_text(same.to_json())
  assert abl.sft_stage(base, str(tmp_path)) == str(tmp_path / "sft" / "hf")
  other = copy.deepcopy(base)
  other.sft.steps += 1
  (tmp_path / "sft" / "config.json").write_text(other.to_json())
  assert abl.sft_stage(base, str(tmp_path)) == str(tmp_path / "ablations" / "sft" / "hf")
  assert calls == [str(tmp_path)] * 2 + [str(tmp_path / "ablations")]
