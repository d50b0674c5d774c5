"""Tiny deterministic SFT / RL / update steps printed to the bit, to check that a refactoring changes no number.

Run it in two trees (e.g. `git worktree add /tmp/before <rev>`), each with its own code on the path, and diff; run
the copy inside each tree (its folder comes first on sys.path, so bench_update.py is that tree's):

  cp experiments/same_numbers.py /tmp/before/experiments/
  PYTHONPATH=/tmp/before:/tmp/before/tests python /tmp/before/experiments/same_numbers.py > before.json
  PYTHONPATH=.:tests python experiments/same_numbers.py > after.json && diff before.json after.json

sft: 3 Adam steps of train/sft.py's step on a tiny Qwen2-VL and Qwen2.5-VL with images (losses, gradient norms,
a hash of the parameters); rl: tests/test_rl_learns.py's train() for GRPO and EKIPL (12-step reward curves, expected
reward before / after); update: XLA's FLOPs and memory analysis of make bench's GRPO update step (with and without
remat), its first step's metrics and the compilations after warm-up (experiments/bench_update.py). Floats as
float.hex. Used for issue 13 (docs/DESIGN.md, last section). --parts sft,rl,update picks what runs (update: ~2.5
CPU-minutes; sft and rl ~1 each).
"""

from __future__ import annotations

import argparse
import hashlib
import json

import jax
import numpy as np
import optax

from ekipl_jax import models
from ekipl_jax.train import batching, sft


def params_hash(params) -> str:
  h = hashlib.sha256()
  for x in jax.tree.leaves(params):
    h.update(np.asarray(x).tobytes())
  return h.hexdigest()[:16]


def init_state(params, optimizer):
  try:
    from ekipl_jax.train_state import init_state as init  # pylint: disable=g-import-not-at-top
  except ImportError:  # trees before issue 13 kept it in rl/update.py
    from ekipl_jax.rl.update import init_state as init  # pylint: disable=g-import-not-at-top
  return init(params, optimizer)


def sft_run(family: str, steps: int = 3) -> dict:
  import hf_fixtures  # tests/  pylint: disable=g-import-not-at-top

  cfg = hf_fixtures.tiny_config_dict(family)
  model, params = models.init(cfg, jax.random.key(0))
  inp = hf_fixtures.make_inputs(cfg, [[3, (4, 4), 5], [2, (2, 2), 7], [(4, 2), 6], [4, (2, 4), 4]], seed=3)
  ids_RT, mask_RT, C = inp["input_ids"], inp["attention_mask"], 4
  P = ids_RT.shape[1] - C
  loss_mask_RC = np.ones((4, C), np.int32)
  loss_mask_RC[1, 2:] = 0
  batch = batching.rows_batch(
      model,
      ids_RT[:, :P],
      mask_RT[:, :P],
      ids_RT[:, P:],
      loss_mask_RC,
      inp["pixel_values"],
      inp["image_grid_thw"],
      images_per_row=[1, 1, 1, 1],
  )
  opt = optax.adamw(1e-3)
  step = sft.make_sft_step(model, opt, chunk_size=2)
  state = init_state(params, opt)
  out = {"params0": params_hash(params), "loss": [], "grad_norm": []}
  for _ in range(steps):
    state, m = step(state, batch, P)
    out["loss"].append(float(m["loss"]).hex())
    out["grad_norm"].append(float(m["grad_norm"]).hex())
  out["params"] = params_hash(state.params)
  return out


def rl_run() -> dict:
  import test_rl_learns as t  # tests/  pylint: disable=g-import-not-at-top

  out = {}
  for name, mode, store in (("grpo", "none", None), ("ekipl", "ekipl", t.PerfectStore())):
    before, after, curve = t.train(mode, store)
    out[name] = {"before": float(before).hex(), "after": float(after).hex(), "curve": [float(c).hex() for c in curve]}
  return out


def update_run() -> dict:
  import bench_update as u  # experiments/  pylint: disable=g-import-not-at-top

  out = {}
  for remat in (False, True):
    step, state, batch, _ = u.build(u.TEXT, 16, 256, 256, remat=remat, chunk=128)
    stats = u.compiled_stats(step, state, batch)
    stats.pop("compile_s")
    out[f"remat={remat}"] = stats
    if not remat:
      state, m = step(state, batch)
      out["step1_metrics"] = {k: float(v).hex() for k, v in sorted(m.items())}
  out["compilations_after_warmup"] = u.compilations_after_warmup(u.TOY, B=4, P=8, C=8)
  return out


if __name__ == "__main__":
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--parts", default="sft,rl,update")
  parts = ap.parse_args().parts.split(",")
  res = {}
  if "sft" in parts:
    res.update({f"sft_{f}": sft_run(f) for f in ("qwen2_vl", "qwen2_5_vl")})
  if "rl" in parts:
    res["rl"] = rl_run()
  if "update" in parts:
    res["update"] = update_run()
  print(json.dumps(res, indent=1))
