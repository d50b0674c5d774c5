"""The ablations' stages: the demo's SFT checkpoint, one external-response store for every run, and each (run, seed)
through the demo's run_arm, or the demo's own finished run where it is the same run.

Folders under OUT (experiments/demo.py's --out): sft/ (the demo's SFT, shared), rl/<arm>_seed<s> (the demo's arms,
read only), ablations/aux (the store), ablations/rl/<run>_seed<s> (each run; done.json when finished).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import time

import ablations_plan as plan_lib

SFT_KEYS = ("seed", "model", "data", "sft", "mesh")  # what the SFT checkpoint depends on
REUSE_FREE_KEYS = ("aux.store", "name")  # may differ between the demo's run and ours (the store is compared itself)


def _sft_view(cfg: dict) -> dict:
  view = {k: copy.deepcopy(cfg.get(k)) for k in SFT_KEYS}
  for k in ("data_dir", "eval_splits"):  # where the generated data lies; the SFT stage evaluates nothing
    view["data"].pop(k, None)
  return view


def sft_out(base, out: str) -> str:
  """Where the SFT stage runs: OUT (the demo's OUT/sft, trained there if missing, reused when finished), unless
  OUT/sft holds an SFT run of another config (its config.json differs in seed, model, data, sft or mesh): then
  OUT/ablations (its own OUT/ablations/sft)."""
  path = os.path.join(out, "sft", "config.json")
  if os.path.exists(path):
    with open(path) as f:
      if _sft_view(json.load(f)) != _sft_view(json.loads(base.to_json())):
        return os.path.join(out, "ablations")
  return out


def sft_stage(base, out: str) -> str:
  """The demo's SFT checkpoint (experiments/demo.py sft_stage) in sft_out(base, out)/sft; returns its HF folder."""
  where = sft_out(base, out)
  if where != out:
    print(f"[ablations] {out}/sft is another config's SFT: training ours in {where}/sft", flush=True)
  return plan_lib.demo().sft_stage(base, where)


def write_store(base, store: str, k: int, sft_hf: str) -> None:
  """The one store every run reads: the demo's solver responses (its write_aux, K = k each) with behaviour log-probs
  log pi_b = 0 on the policy's tokens (a scripted solver is a deterministic program of (example, seed); the importance
  treatments read them, the others ignore them). write_aux writes a texts-only store first; it is removed once the
  store is complete (complete.json)."""
  from ekipl_jax.data import processor as processor_lib  # pylint: disable=g-import-not-at-top
  from ekipl_jax.data import aux_store  # pylint: disable=g-import-not-at-top
  from ekipl_jax.train import input_pipeline as data_lib  # pylint: disable=g-import-not-at-top

  marker = os.path.join(store, "complete.json")
  want = {"solvers": [list(s) for s in plan_lib.demo().SOLVERS], "k": k, "sft_hf": os.path.abspath(sft_hf)}
  if os.path.exists(marker):
    with open(marker) as f:
      if json.load(f) == want:
        return
    raise ValueError(f"{store}: written for another setting ({marker}); remove the folder to rewrite it")
  texts = copy.deepcopy(base)
  texts.aux.store, texts.rl.num_external_per_model = store + "_texts", k
  plan_lib.demo().write_aux(texts)
  builder = data_lib.prepare(base.data)
  train = data_lib.first(data_lib.source(builder, base.data.train_split), 0)
  eval_ids = {ex["id"] for s in base.data.eval_splits for ex in data_lib.first(data_lib.source(builder, s), 0)}
  proc = processor_lib.load(sft_hf)
  with aux_store.open_store(texts.aux.store) as src, aux_store.AuxStoreWriter(store, refuse_ids=eval_ids) as w:
    for ex in train:
      for r in src.get(ex["id"]):
        n = len(processor_lib.encode_completion(proc, r.text, add_eos=True))  # as sampling/groups.py tokenizes it
        r = dataclasses.replace(r, behaviour_logprobs=[0.0] * n, behaviour_tokenizer=plan_lib.BEHAVIOUR_TOKENIZER)
        w.append(r)
  with open(marker, "w") as f:
    json.dump(want, f)
  shutil.rmtree(texts.aux.store)


def same_texts(demo_store: str, store: str, k: int) -> bool:
  """Whether the demo's store holds, for every id and source, the texts of our store's first k samples."""
  from ekipl_jax.data import aux_store  # pylint: disable=g-import-not-at-top

  def texts(s, i):
    return sorted((r.source, r.sample, r.text) for r in s.get(i) if r.sample < k)

  with aux_store.open_store(demo_store) as a, aux_store.open_store(store) as b:
    return set(a.ids()) == set(b.ids()) and all(texts(a, i) == texts(b, i) for i in b.ids())


def demo_run(base, run: plan_lib.Run, seed: int, sft_hf: str, out: str, checked: dict | None) -> str | None:
  """The demo's own finished run of this (run, seed) in OUT/rl, or None: the run is a demo arm, its config.json is
  ours but for the store folder, it evaluated at the last step, and (for a run that reads the store) the demo's store
  holds our store's texts. checked: a cache of store comparisons (None: skip that comparison, for --plan)."""
  from ekipl_jax.rl import selection  # pylint: disable=g-import-not-at-top
  from ekipl_jax.train import workdir as workdir_lib  # pylint: disable=g-import-not-at-top

  if not run.demo_arm:
    return None
  workdir = os.path.join(out, "rl", f"{run.demo_arm.lower()}_seed{seed}")
  cfg = plan_lib.run_config(base, run, seed, sft_hf, workdir)
  steps = cfg.rl.steps
  need = [os.path.join(workdir, "predictions", f"{s}_step{steps}.json") for s in cfg.data.eval_splits]
  if not all(os.path.exists(p) for p in need + [os.path.join(workdir, "config.json"), os.path.join(workdir, "hf")]):
    return None
  with open(os.path.join(workdir, "config.json")) as f:
    theirs = json.load(f)
  diff = {
      k: v for k, v in workdir_lib.config_diff(theirs, json.loads(cfg.to_json())).items() if k not in REUSE_FREE_KEYS
  }
  if diff:
    print(f"[ablations] {workdir} is not this run (config keys {sorted(diff)} differ): training it", flush=True)
    return None
  if selection.reads_store(cfg.rl.selection) and checked is not None:
    pair = (theirs["aux"]["store"], cfg.aux.store, cfg.rl.num_external_per_model)
    if pair not in checked:
      checked[pair] = os.path.isdir(pair[0]) and same_texts(*pair)
    if not checked[pair]:
      print(f"[ablations] {workdir} read a store ({pair[0]}) with other texts than {pair[1]}: training it", flush=True)
      return None
  return workdir


def run_one(base, run: plan_lib.Run, seed: int, sft_hf: str, out: str) -> tuple[str, float | None]:
  """The demo's run_arm for one (run, seed) under OUT/ablations/rl; (workdir, wall seconds, or None when it had
  finished before). A killed run resumes from its checkpoint (the trainer's)."""
  abl = os.path.join(out, "ablations")
  workdir = os.path.join(abl, "rl", f"{run.name.lower()}_seed{seed}")  # where run_arm puts it
  done = os.path.join(workdir, "done.json")
  if os.path.exists(done):
    return workdir, None
  rl = {k[3:]: v for k, v in run.overrides.items() if k.startswith("rl.")}
  if any("." in k for k in rl):
    raise ValueError(f"experiments/ablations.py: run_arm sets top-level rl fields only, got {sorted(rl)}")
  cfg = plan_lib.apply(base, {k: v for k, v in run.overrides.items() if not k.startswith("rl.")})
  t0, cpu0 = time.time(), time.process_time()
  lines = plan_lib.demo().run_arm(cfg, run.name, rl, seed, sft_hf, abl)
  wall, cpu = time.time() - t0, time.process_time() - cpu0  # CPU: every thread of this process
  if not lines or lines[-1]["step"] != cfg.rl.steps:
    raise RuntimeError(f"{workdir}/metrics.jsonl does not end at step {cfg.rl.steps}")
  with open(done, "w") as f:
    json.dump({"key": run.key, "seed": seed, "wall_s": wall, "cpu_s": cpu, "overrides": jsonable(run.overrides)}, f)
  return workdir, wall


def use_compile_cache(path: str) -> None:
  """A persistent XLA compilation cache in `path` for this process: the runs compile the same sampler / evaluation /
  update programs (same shapes), so all but the first load them from disk. The executables are the same programs,
  so the numbers do not change. Also the initializer of each --jobs worker process."""
  plan_lib.demo().use_compile_cache(path)


def jsonable(d: dict) -> dict:
  return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
