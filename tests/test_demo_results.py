"""The demo's results file: exactly the documented layout (docs/RESULTS.md), written from the runs' metric lines."""

import importlib.util
import json
import os
import sys

import numpy as np
import pytest

# experiments/demo.py defines absl flags, so it is loaded once per process under the name experiments/ablations.py
# uses too (a worker that runs both test files would otherwise define its flags twice).
if "demo_driver" in sys.modules:
  demo = sys.modules["demo_driver"]
else:
  _SPEC = importlib.util.spec_from_file_location(
      "demo_driver", os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments", "demo.py")
  )
  demo = importlib.util.module_from_spec(_SPEC)
  sys.modules["demo_driver"] = demo
  _SPEC.loader.exec_module(demo)


def _lines(accs: dict[str, list[float]], steps: list[int]) -> list[dict]:
  """Metric lines as loop.run_loop writes them: step-0 evaluation, training steps, evaluations at some steps."""
  out = [{"step": 0, **{f"eval/{s}/accuracy": a[0] for s, a in accs.items()}}]
  for i in range(1, steps[-1] + 1):
    line = {"step": i, "loss": 0.1, "reward/accuracy": 0.5}
    if i in steps:
      line.update({f"eval/{s}/accuracy": a[steps.index(i)] for s, a in accs.items()})
    out.append(line)
  return out


def _runs():
  steps = [0, 2, 4]
  grpo = [_lines({"test_id": [50.0, 55.0, 60.0], "test_ood": [10.0, 11.0, 12.0]}, steps) for _ in range(2)]
  ekipl = [_lines({"test_id": [50.0, 70.0, 80.0], "test_ood": [10.0, 20.0, 25.0]}, steps) for _ in range(2)]
  ekipl[1][0]["eval/test_id/accuracy"] = 49.0  # a seed with another step-0 evaluation key
  return steps, {"GRPO": grpo, "EKIPL": ekipl}


def test_results_json_layout():
  steps, runs = _runs()
  res = demo.results_json(["test_id", "test_ood"], {"test_id": 256, "test_ood": 256}, [0, 1], steps, runs)
  demo.check_results_json(res)
  assert list(res) == ["splits", "n_eval", "seeds", "steps", "arms"]
  assert res["splits"] == ["test_id", "test_ood"] and res["seeds"] == [0, 1] and res["steps"] == [0, 2, 4]
  assert res["n_eval"] == {"test_id": 256, "test_ood": 256}
  # SFT: each seed's step-0 evaluation of the first arm (GRPO), one number per seed
  assert res["arms"]["SFT"] == {"test_id": [50.0, 50.0], "test_ood": [10.0, 10.0]}
  # GRPO / EKIPL: per seed, the accuracy at each evaluation step
  assert res["arms"]["GRPO"]["test_id"] == [[50.0, 55.0, 60.0]] * 2
  assert res["arms"]["EKIPL"]["test_id"] == [[50.0, 70.0, 80.0], [49.0, 70.0, 80.0]]
  assert res["arms"]["EKIPL"]["test_ood"][1] == [10.0, 20.0, 25.0]
  json.dumps(res)  # plain JSON types only


def test_results_json_rejects_mismatched_runs():
  steps, runs = _runs()
  with pytest.raises(ValueError, match="expected"):  # a run that evaluated at other steps
    demo.results_json(["test_id"], {"test_id": 256}, [0, 1], [0, 2], runs)
  with pytest.raises(ValueError, match="seeds"):
    demo.results_json(["test_id"], {"test_id": 256}, [0], steps, runs)
  with pytest.raises(ValueError, match="0 first|start at 0"):
    demo.results_json(["test_id"], {"test_id": 256}, [0, 1], [2, 4], runs)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda r: r.update(extra=1),  # an unknown key
        lambda r: r["arms"].pop("EKIPL"),  # an arm missing
        lambda r: r["arms"]["GRPO"]["test_id"][0].pop(),  # a curve one step short
        lambda r: r["arms"]["SFT"]["test_id"].append(50.0),  # one SFT number too many
        lambda r: r["n_eval"].update(test_id=0),  # no examples
        lambda r: r["arms"]["EKIPL"]["test_ood"][0].__setitem__(0, 0.5e3),  # not a percentage
    ],
)
def test_check_results_json_rejects(mutate):
  steps, runs = _runs()
  res = demo.results_json(["test_id", "test_ood"], {"test_id": 256, "test_ood": 256}, [0, 1], steps, runs)
  mutate(res)
  with pytest.raises(ValueError):
    demo.check_results_json(res)


def test_bootstrap_interval():
  # All examples right in every seed: no spread, [100, 100]. Half the examples right: the mean is 50 and the
  # interval is about 50 +- 1.96 * sqrt(0.25 / 256) * 100 = 50 +- 6.1 (normal approximation of the bootstrap).
  assert demo.bootstrap_ci(np.ones((3, 256))) == (100.0, 100.0)
  scores = np.tile((np.arange(256) % 2).astype(float), (3, 1))
  lo, hi = demo.bootstrap_ci(scores)
  assert lo == pytest.approx(50 - 6.1, abs=1.0) and hi == pytest.approx(50 + 6.1, abs=1.0)


def test_paired_difference_interval():
  # Arm a right on every example, arm b on half of them (the same half in every seed): the difference is 50 points,
  # and its interval is the half-right interval mirrored, about 50 +- 6.1 (see test_bootstrap_interval).
  half = np.tile((np.arange(256) % 2).astype(float), (3, 1))
  d, lo, hi = demo.paired_diff_ci(np.ones((3, 256)), half)
  assert d == 50.0 and lo == pytest.approx(50 - 6.1, abs=1.0) and hi == pytest.approx(50 + 6.1, abs=1.0)
  # pairing: the same scores in both arms give exactly 0 [0, 0], however the examples vary
  assert demo.paired_diff_ci(half, half) == (0.0, 0.0, 0.0)


def test_summarize_reads_predictions_and_convergence_step(tmp_path):
  steps, runs = _runs()
  res = demo.results_json(["test_id", "test_ood"], {"test_id": 4, "test_ood": 4}, [0, 1], steps, runs)
  workdirs = {}
  for arm in ("GRPO", "EKIPL"):
    workdirs[arm] = []
    for seed in (0, 1):
      w = tmp_path / f"{arm}{seed}" / "predictions"
      os.makedirs(w)
      for split in res["splits"]:
        for step in steps:
          preds = [{"id": str(i), "scores": [float(i < 2)]} for i in range(4)]
          (w / f"{split}_step{step}.json").write_text(json.dumps(preds))
      workdirs[arm].append(str(w.parent))
  md = "\n".join(demo.summarize(res, workdirs))
  assert "| GRPO, 4 steps | 60.0 [" in md and "(60.0 / 60.0)" in md
  assert "| EKIPL - GRPO | +0.0 [+0.0, +0.0] | +0.0 [+0.0, +0.0] |" in md  # the same predictions in every run
  # EKIPL's mean test_id curve 49.5, 70, 80 reaches GRPO's final 60 at step 2 = 50% of the 4 steps
  assert "test_id: EKIPL reaches GRPO's final 60.0 at step 2 of 4 (50% of the RL steps)" in md
