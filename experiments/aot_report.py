"""experiments/aot.py, part 4: the printed report of one config on one slice, and the plan's Markdown."""

from __future__ import annotations

import os
import sys

from aot_shapes import GiB


def _g(b: float) -> str:
  return f"{b / GiB:.2f}"


def print_report(rep: dict) -> None:
  geo = rep["geometry"]
  print(
      f"\n{rep['config']} ({rep['stage']}) on {rep['topology']}: {rep['chips']} x {rep['device_kind']}, mesh "
      f"{rep['mesh']}, HBM {_g(rep['hbm_bytes'])} GiB per chip (XLA); params from {rep['hf_config']}"
  )
  print(
      f"  prompt: {geo['images_per_prompt']} image(s) of {geo['grid']} patches = {geo['image_tokens']} image tokens, "
      f"{geo['prompt_tokens']} tokens -> bucket {geo['P']}"
  )
  print("  resident per chip (GiB): " + ", ".join(f"{k} {_g(v)}" for k, v in rep["sizes"].items()))
  hdr = f"  {'program':<13} {'args':>7} {'out':>7} {'alias':>7} {'temp':>7} {'+other':>7} {'total':>7}  {'room':>6}"
  print(hdr + "  compile  verdict")
  for r in rep["programs"]:
    if "skipped" in r:
      print(f"  {r['name']:<13} not compiled: {r['skipped']}")
      continue
    comp = f"{r['compile_s']:6.1f}s" + (" (cached)" if r["cached"] else "")
    if "oom" in r:
      o = r["oom"]
      print(
          f"  {r['name']:<13} DOES NOT FIT: XLA needs {_g(o['required'])} GiB for {o['what']}, "
          f"{_g(o['available'])} GiB available  {comp}"
      )
      continue
    m, other = r["mem"], sum(r["resident"].values())
    verdict = "fits" if r["fits"] else "DOES NOT FIT" if r["headroom"] < 0 else "TIGHT (< min headroom)"
    print(
        f"  {r['name']:<13} {_g(m['argument']):>7} {_g(m['output']):>7} {_g(m['alias']):>7} {_g(m['temp']):>7} "
        f"{_g(other):>7} {_g(r['total_bytes']):>7}  {r['headroom']:6.1%}  {comp}  {verdict}"
    )
    if "estimate" in r:
      e = r["estimate"]
      mfu = f", MFU {e['mfu']:.1%} of {rep['chip']['peak_bf16'] / 1e12:.0f} TFLOP/s" if "mfu" in e else ""
      print(f"  {'':<13} estimate (XLA cost model): {e['seconds'] * 1e3:.1f} ms, {e['tokens_per_s']:.0f} tokens/s{mfu}")
  if rep.get("probe_depth"):
    print(f"  => PROBE of a cut model ({rep['hf_config']}): memory figures only, no verdict on the config")
    return
  if not rep.get("compiled", 1):
    print("  => NOTHING COMPILED: no verdict (select a program of this stage with --programs)")
    return
  print(f"  => {'FITS' if rep['fits'] else 'DOES NOT FIT'} (min headroom {rep['min_headroom']:.0%})")


def git_revision() -> str:
  import subprocess

  run = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, check=False).stdout.strip()
  dirty = run("status", "--porcelain", "--untracked-files=no")
  return run("rev-parse", "--short", "HEAD") + (" with uncommitted changes in the tree" if dirty else "")


def _name(rep: dict) -> str:
  """The config's name, marked when its report is from an earlier plan run (with that run's code revision)."""
  return rep["config"] + (f" (earlier run, code at {rep.get('revision', '?')})" if rep.get("earlier") else "")


def summary_rows(reports: list[dict]) -> list[str]:
  rows = []
  for rep in reports:
    if "error" in rep:
      rows.append(f"| {_name(rep)} | {rep['topology']} | | no: {rep['error'][:160]} | | | |")
      continue
    if rep.get("not_run"):
      why = "selected, not compiled yet (the run was stopped before it)" if rep["pending"] else "--plan_only"
      rows.append(f"| {rep['config']} | {rep['topology']} | | not compiled in this run ({why}) | | | |")
      continue
    worst, worst_room, worst_txt = "", 2.0, ""
    for r in rep["programs"]:
      if r.get("unselected"):
        continue
      if "oom" in r:
        room, txt = -1.0, f"XLA: {_g(r['oom']['required'])} needed for {r['oom']['what']} / {_g(r['oom']['available'])}"
      elif "mem" in r:
        room, txt = r["headroom"], f"{_g(r['total_bytes'])} / {_g(rep['hbm_bytes'])}"
      else:
        room, txt = -2.0, r.get("skipped", "not compiled")
      if room < worst_room:
        worst, worst_room, worst_txt = r["name"], room, txt
    room = f"{worst_room:.0%}" if worst_room > -1 else "< 0"
    rows.append(
        f"| {_name(rep)} | {rep['topology']} | {rep['chips']} | {'yes' if rep['fits'] else '**no**'} | {worst} | "
        f"{worst_txt} | {room} |"
    )
  return rows


def plan_markdown(reports: list[dict], seconds: float, text_tokens: int, min_headroom: float) -> str:
  import jax

  lines = [
      "# TPU plan: does each paper config fit its slice?",
      "",
      f"Written by `make tpu-plan` (experiments/aot.py, jax {jax.__version__}, libtpu from `jax[tpu]`) in "
      f"{seconds / 60:.1f} min on a CPU machine, code at {git_revision()}, command "
      f"`{' '.join(['experiments/aot.py'] + sys.argv[1:])}`; "
      f"{sum(not r.get('not_run') and not r.get('earlier') for r in reports)} of {len(reports)} config x slice pairs "
      f"compiled in this run, {sum(bool(r.get('earlier')) for r in reports)} kept from earlier runs (marked, with "
      f"their code revision), {sum(bool(r.get('pending')) for r in reports)} selected and not reached: every program "
      "of every paper config compiled by XLA for the TPU topology, without a TPU. Per chip, in GiB: XLA's argument / "
      "output / temporary bytes of the program, what "
      "else is resident while it runs (train state, reference params), their total against the HBM XLA reports for "
      f"the chip, and the headroom left; a program fits when the headroom is at least {min_headroom:.0%}. A program "
      "XLA refuses for lack of HBM shows XLA's own number. Shapes: the paper's batch (configs/paper.py: 16 prompts, "
      "N = 8 policy samples, G = 8 kept rows per prompt, 512 completion tokens; SFT 16 rows x 1024; on the pod-scale "
      "v5e:16x16 256 prompts / 256 SFT rows, aot_plan.POD), with the micro-batches configs/paper.py sets, each "
      "prompt with "
      "the largest image data.max_pixels allows (one image; two for spatial) and "
      f"{text_tokens} text tokens, in the prompt bucket data.prompt_buckets gives.",
      "",
      "A program whose abstract signature (model, slice, mesh, the program's static settings, its arguments' shapes, "
      "dtypes and shardings; experiments/aot.py `signature`) matches one compiled before is not compiled again "
      '("cached": counting and structure prompts have the same shapes, and GRPO and EKIPL differ only in host-side '
      "fields, HOST_ONLY_RL, and the optimizer's scalar constants, CONSTANTS_ONLY_OPTIMIZER: counting's and structure's "
      "update steps differ only in the length of an lr schedule they do not use); the time shown is the first "
      "compile's. "
      "Estimates come from XLA's cost model (`optimal_seconds`), only where it is positive, against the chip's peak "
      "bf16 flop/s, scaled by the loop trip counts XLA does not count (decode steps, micro-batches x mu); loops "
      "inside (log-prob chunks) stay counted once, so they are lower bounds on time. They are not measurements.",
      "",
      "## Summary",
      "",
      "| config | topology | chips | fits | tightest program | its total / HBM per chip (GiB) | headroom |",
      "|---|---|---|---|---|---|---|",
      *summary_rows(reports),
      "",
      "## Every program (per chip, GiB)",
      "",
      "| config | topology | mesh | program | args | out | temp | other resident | total | HBM | headroom | compile s"
      " | estimate | verdict |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for rep in reports:
    if rep.get("not_run"):
      continue
    if "error" in rep:
      lines.append(f"| {_name(rep)} | {rep['topology']} | | error: {rep['error']} | | | | | | | | | | no |")
      continue
    mesh = "x".join(str(v) for v in rep["mesh"].values())
    for r in rep["programs"]:
      head = f"| {_name(rep)} | {rep['topology']} | {mesh} | {r['name']} |"
      if "skipped" in r:
        verdict = "not compiled" if r.get("unselected") else "no"
        lines.append(f"{head} not compiled: {r['skipped']} | | | | | | | | | {verdict} |")
        continue
      comp = f"{r['compile_s']:.0f}" + (" (cached)" if r["cached"] else "")
      if r.get("earlier_revision"):
        comp += f" (earlier run, code at {r['earlier_revision']})"
      if "oom" in r:
        o = r["oom"]
        lines.append(
            f"{head} | | XLA: {_g(o['required'])} for {o['what']} | | | {_g(o['available'])} | < 0 | {comp} | | "
            "**does not fit** |"
        )
        continue
      m = r["mem"]
      est = ""
      if "estimate" in r:
        e = r["estimate"]
        est = f"{e['seconds'] * 1e3:.0f} ms, {e['tokens_per_s']:.0f} tok/s" + (
            f", MFU {e['mfu']:.0%}" if "mfu" in e else ""
        )
      verdict = "fits" if r["fits"] else "**does not fit**" if r["headroom"] < 0 else "**tight**"
      lines.append(
          f"{head} {_g(m['argument'])} | {_g(m['output'])} | {_g(m['temp'])} | {_g(sum(r['resident'].values()))} | "
          f"{_g(r['total_bytes'])} | {_g(rep['hbm_bytes'])} | {r['headroom']:.0%} | {comp} | {est} | {verdict} |"
      )
  lines += ["", "## Largest slice each config was compiled for", ""]
  largest: dict[str, dict] = {}
  for rep in reports:
    if "chips" in rep and rep["chips"] >= largest.get(rep["config"], {}).get("chips", 0):
      largest[rep["config"]] = rep
  lines += ["| config | topology | chips | mesh (data, fsdp, tensor) | fits |", "|---|---|---|---|---|"]
  for name, rep in largest.items():
    lines.append(
        f"| {name} | {rep['topology']} | {rep['chips']} | {tuple(rep['mesh'].values())} | "
        f"{'yes' if rep['fits'] else 'no'} |"
    )
  chips = {}
  for rep in reports:
    if rep.get("chip"):
      chips[rep["device_kind"]] = (rep["chip"], rep["hbm_bytes"])
  lines += [
      "",
      "## Chips",
      "",
      "| device | nominal HBM | HBM XLA reports | peak bf16 | source |",
      "|---|---|---|---|---|",
  ]
  for kind, (c, hbm) in chips.items():
    lines.append(
        f"| {kind} ({c['name']}) | {c['hbm_gib']} GiB | {_g(hbm)} GiB | {c['peak_bf16'] / 1e12:.0f} TFLOP/s | "
        f"{c['source']} |"
    )
  return "\n".join(lines) + "\n"


def print_memory_reports(folder: str, top: int = 12) -> None:
  """The head of each *memory-usage-report.txt XLA wrote (written even when the compile ran out of HBM)."""
  for name in sorted(os.listdir(folder)):
    if name.endswith("memory-usage-report.txt") and "cpu_after" not in name:  # TPU programs only
      with open(os.path.join(folder, name)) as f:
        head = f.read().splitlines()[: top * 3]
      print(f"\n--- {name}\n" + "\n".join(head))
