"""Results as a researcher reads them: a table laid out like Reason-RFT's (Markdown + JSON) and curves over RL steps."""

from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

import numpy as np

# Column order of the Reason-RFT results table; other splits (the synthetic ones) follow in the order given.
REASON_RFT_COLUMNS = ("clevr-math", "super-clevr", "geomath", "geometry3k", "trance", "trance-left", "trance-right")


def results_table(rows: Mapping[str, Mapping[str, Sequence[float]]]) -> str:
  """rows: method -> split -> per-seed scores in percent. Returns Markdown with mean ± std over seeds."""
  splits: list[str] = [s for s in REASON_RFT_COLUMNS if any(s in r for r in rows.values())]
  for r in rows.values():
    splits += [s for s in r if s not in splits]
  lines = ["| method | " + " | ".join(splits) + " |", "|---|" + "---|" * len(splits)]
  for method, r in rows.items():
    cells = []
    for s in splits:
      v = np.asarray(r.get(s, []), dtype=float)
      if v.size == 0:
        cells.append("")
      elif v.size == 1:
        cells.append(f"{v[0]:.2f}")
      else:
        cells.append(f"{v.mean():.2f} ± {v.std():.2f}")
    lines.append(f"| {method} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def write_results(out_dir: str, rows: Mapping[str, Mapping[str, Sequence[float]]], name: str = "results") -> str:
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
    json.dump({m: {s: list(map(float, v)) for s, v in r.items()} for m, r in rows.items()}, f, indent=1)
  md = results_table(rows)
  with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
    f.write(md)
  return md


def curves(
    runs: Mapping[str, Sequence[Sequence[dict]]], key: str
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """runs: method -> per-seed metric lines. Returns method -> (steps, mean, std) over seeds at steps all seeds have."""
  out = {}
  for method, seeds in runs.items():
    per_seed = [{int(l["step"]): float(l[key]) for l in lines if key in l} for lines in seeds]
    steps = sorted(set.intersection(*(set(d) for d in per_seed))) if per_seed else []
    vals = np.array([[d[s] for s in steps] for d in per_seed], dtype=float).reshape(len(per_seed), len(steps))
    out[method] = (np.array(steps), vals.mean(0), vals.std(0))
  return out


def plot_curves(path: str, runs: Mapping[str, Sequence[Sequence[dict]]], keys: Sequence[tuple[str, str]]) -> None:
  """One panel per (metric key, title): mean line and a ±std band over seeds for each method."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6), squeeze=False)
  for ax, (key, title) in zip(axes[0], keys):
    for method, (steps, mean, std) in curves(runs, key).items():
      if steps.size == 0:
        continue
      ax.plot(steps, mean, marker="o", ms=3, label=method)
      ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
    ax.set_title(title)
    ax.set_xlabel("RL step")
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def first_step_reaching(steps: np.ndarray, values: np.ndarray, target: float) -> int | None:
  """The first step whose value is >= target (the convergence-speed figure the paper reports), or None."""
  hit = np.nonzero(np.asarray(values) >= target - 1e-9)[0]
  return int(np.asarray(steps)[hit[0]]) if hit.size else None


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased Pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
  if n - c < k:
    return 1.0
  return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))
