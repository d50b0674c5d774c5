"""experiments/aot.py, part 5: make tpu-plan, every paper config on the slices it is planned for (PLAN_SLICES) ->
docs/TPU_PLAN.md and .json. The plan is built up over runs: a config x slice that this run does not compile
(--plan_only) keeps its report from the previous JSON, marked with that run's code revision.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import time

import aot_compile
import aot_programs
import aot_report

# Each paper model on the slices it is planned for (issue 10). The v5e:16x16 entries are pod scale: 16 data-parallel
# replicas of 16-way FSDP groups, with the batch scaled to the 256 chips (256 prompts per RL step, 256 SFT rows) so
# that every chip holds the rows it holds on v5e:4x4 (a batch that does not divide over the chips is replicated).
POD = {"mesh.shape": (16, -1, 1), "rl.batch_prompts": 256, "sft.batch_size": 256}
PLAN_SLICES = {
    "qwen2_vl_2b": (("v5e:2x4", {}),),
    "qwen2_5_vl_3b": (("v5e:2x4", {}),),
    "qwen2_vl_7b": (("v5p:2x2x1", {}), ("v5e:4x4", {}), ("v5e:16x16", POD)),
    "qwen2_5_vl_7b": (("v5p:2x2x1", {}), ("v5e:4x4", {}), ("v5e:16x16", POD)),
}


def load_config(spec: str, overrides: dict | None = None):
  """configs/x.py:ARG and {"key.path": value} overrides -> ConfigDict (as --config / --config.key=value give it)."""
  path, _, arg = spec.partition(":")
  mod_spec = importlib.util.spec_from_file_location(f"_aot_cfg_{abs(hash(path))}", path)
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  cfg = mod.get_config(arg) if arg else mod.get_config()
  for key, value in (overrides or {}).items():
    *parents, leaf = key.split(".")
    node = cfg
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg


def previous_reports(json_path: str) -> dict:
  """(config, topology, spec) -> the compiled report an earlier run left in the plan's JSON."""
  if not os.path.isfile(json_path):
    return {}
  with open(json_path) as f:
    old = json.load(f)
  keep = lambda r: not r.get("not_run") and ("programs" in r or "error" in r)
  return {(r["config"], r["topology"], r.get("spec")): dict(r, earlier=True) for r in old if keep(r)}


def merge_earlier(rep: dict, old: dict | None) -> dict:
  """Programs this run left out (--programs) take their result from the earlier run's report of the same config and
  slice, marked with that run's code revision; the verdict is then over every program."""
  if old is None or "programs" not in rep:
    return rep
  before = {r["name"]: r for r in old.get("programs", []) if "mem" in r or "oom" in r}
  programs = []
  for r in rep["programs"]:
    if r.get("unselected") and r["name"] in before:
      r = dict(before[r["name"]], earlier_revision=old.get("revision", "?"))
    programs.append(r)
  return dict(rep, programs=programs, fits=all(r["fits"] for r in programs))


def write_plan(path: str, text_tokens: int, min_headroom: float, plan_only: str = "") -> bool:
  """Every paper config x its slices (PLAN_SLICES; plan_only, a regex on MODEL,TASK,METHOD@TOPOLOGY, selects) ->
  path (Markdown) and path's .json. Both are rewritten before and after every config, so an interrupted plan says
  what it compiled and what it did not. Pairs not selected keep the compiled report of an earlier run (from the
  JSON; each says its code revision)."""
  from configs import paper  # pylint: disable=g-import-not-at-top

  entries = []
  for model_name, slices in PLAN_SLICES.items():
    for topology, overrides in slices:
      for task in paper.TASKS:
        for method in paper.METHODS:
          spec = f"configs/paper.py:{model_name},{task},{method}"
          cfg = load_config(spec, overrides)
          run = not plan_only or re.search(plan_only, f"{model_name},{task},{method}@{topology}")
          spec = " ".join([spec] + [f"--config.{k}={v}" for k, v in overrides.items()])
          entries.append((cfg, topology, spec, bool(run)))
  json_path = os.path.splitext(path)[0] + ".json"
  earlier = previous_reports(json_path)
  reports = [
      earlier.get((c.name, t, s))
      if not r and (c.name, t, s) in earlier
      else dict(config=c.name, topology=t, spec=s, not_run=True, pending=r, fits=True)
      for c, t, s, r in entries
  ]
  t0 = time.time()
  revision = aot_report.git_revision()

  def write():
    with open(path, "w") as f:
      f.write(aot_report.plan_markdown(reports, time.time() - t0, text_tokens, min_headroom))
    with open(json_path, "w") as f:
      json.dump(reports, f, indent=1, default=str)

  for i, (cfg, topology, spec, run) in enumerate(entries):
    if not run:
      continue
    write()

    def on_timeout(name, seconds, i=i, cfg=cfg, topology=topology, spec=spec):
      why = f"the XLA compile of {name} ran past --compile_timeout {seconds:.0f} s (the run stopped there)"
      reports[i] = dict(config=cfg.name, topology=topology, spec=spec, error=why, fits=False, revision=revision)
      write()

    aot_compile.OPTIONS["on_timeout"] = on_timeout
    try:
      rep = aot_programs.run_one(cfg, topology, text_tokens, -1, min_headroom)
      aot_report.print_report(rep)
    except Exception as e:  # pylint: disable=broad-except
      rep = dict(config=cfg.name, topology=topology, error=f"{type(e).__name__}: {e}"[:500], fits=False)
      print(rep)
    reports[i] = merge_earlier(dict(rep, spec=spec, revision=revision), earlier.get((cfg.name, topology, spec)))
  write()
  return all(r["fits"] for r in reports)
