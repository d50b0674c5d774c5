"""Does a config fit a TPU slice? Compiles the config's device programs for a TPU topology on this (CPU) machine.

    .venv-tpu/bin/python experiments/aot.py --config configs/paper.py:qwen2_vl_2b,counting,ekipl --topology v5e:2x4
    make aot CONFIG=configs/paper.py:qwen2_vl_2b,counting,ekipl TOPOLOGY=v5e:2x4      (the same, in .venv-tpu)
    make tpu-plan                                    (every paper config x its slices -> docs/TPU_PLAN.md)

--config takes what experiments/train.py takes (a config file, its argument, --config.key=value overrides). No TPU
and no checkpoint is needed: libtpu (the .venv-tpu environment, `jax[tpu]`) describes the slice's devices
(jax.experimental.topologies), the parameters are abstract (ShapeDtypeStructs from the checkpoint's config.json, or,
when model.init_from is not on disk, ekipl_jax/models/known_configs.py found by the model name in the config's name
or init_from; or the config's from-scratch model.arch), and every program is lowered with the trainer's own functions
and shardings, then compiled by XLA for the TPU:

  sft   the SFT step (train/sft.py make_sft_step, sft.micro_batches) on sft.batch_size rows of prompt +
        sft.max_completion tokens
  rl    sampler prefill and decode loop (sampling/sampler.py), reference log-probs (train/rl_stages.py, when
        rl.beta != 0) and the update step (rl/update.py via train/rl_stages.py build_step) on rl.batch_prompts x
        rl.group_size rows.
        Old log-probs are no separate program: with rl.mu == 1 pi_old is pi_theta, with mu > 1 the update step
        computes them itself. The pool's external rows (M x K per prompt) live on the host; G per prompt are kept.

Shapes: every prompt carries images_per_prompt images of the largest size the config's image processor makes
(max over aspect ratios of transformers' smart_resize under data.max_pixels), plus prompt_text_tokens of text; the
prompt bucket is the smallest of data.prompt_buckets that holds it (the processor's rule). Each row's patches are
packed as train/batching.py packs them, and each prompt's as sampling/sampler.py prepare_prompts packs them.

Per chip, for each program: XLA's argument / output / temp bytes (compiled.memory_analysis()); what else is resident
while it runs (train state, reference params: buffers that are not its arguments); their sum against the chip's HBM
as XLA itself reports it (an oversized probe compile's "available HBM"). The resident buffers are counted from their
shapes and shardings, without the TPU's tile padding (XLA's argument bytes came out 3% above that on the tiny demo
model, whose dims are not multiples of 128; the paper models' dims are). A program fits when the sum leaves at least
--min_headroom of HBM free. When XLA refuses to compile for lack of HBM, the program does not fit, with XLA's number.
Exit status: 0 when every program fits, 1 when one does not, 2 on any other error.

Estimates (labelled so): XLA's cost model (compiled.cost_analysis()) gives flops and, on some chips, a positive
'optimal_seconds'; from it a step time, tokens/s and MFU against the chip's peak bf16 flop/s (aot_compile.CHIPS).
The cost model counts a loop's body once whatever its trip count (measured: a 1000-step fori_loop reports the flops
of one step), so the decode loop's estimate is scaled by max_new_tokens - 1, the update step's by micro_batches x mu
and the SFT step's by its micro-batches; loops inside them (log-prob chunks) stay counted once, so the estimates
are lower bounds on time.

Compile time: XLA's rematerialization pass runs long on a program near or over the chip's HBM; --compile_timeout
ends the run when one program's compile takes longer (the plan records which one timed out).

Only one process can load libtpu at a time (a lock file); ALLOW_MULTIPLE_LIBTPU_LOAD=1 lifts the lock.

The parts, in order: aot_shapes.py (abstract model and inputs), aot_compile.py (one program's compile, memory and
cost), aot_programs.py (a stage's programs and the report of one config on one slice), aot_report.py (printing and
the plan's Markdown), aot_plan.py (make tpu-plan).
"""

from __future__ import annotations

import json
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

# The aot_*.py beside this file import as top-level modules (a script's folder is sys.path[0]).

import aot_compile  # pylint: disable=g-import-not-at-top,wrong-import-position
import aot_plan  # pylint: disable=g-import-not-at-top,wrong-import-position
import aot_programs  # pylint: disable=g-import-not-at-top,wrong-import-position
import aot_report  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config, as experiments/train.py takes it")
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU topology name, e.g. v5e:2x4, v5p:2x2x1, v5e:16x16")
_TEXT = flags.DEFINE_integer("prompt_text_tokens", 256, "text tokens per prompt besides the image tokens")
_IMAGES = flags.DEFINE_integer(
    "images_per_prompt", -1, "images per prompt (-1: by data.task, aot_shapes.IMAGES_PER_TASK)"
)
_HEADROOM = flags.DEFINE_float("min_headroom", 0.10, "fraction of HBM that must stay free for a program to fit")
_JSON = flags.DEFINE_string("json_out", "", "also write the results as JSON here")
_DUMP = flags.DEFINE_string("xla_dump", "", "XLA dump folder (its *memory-usage-report.txt lists the largest buffers)")
_PROGRAMS = flags.DEFINE_list(
    "programs", [], "compile only these (sft_step, prefill, decode, ref_logprobs, update_step)"
)
_PLAN_ONLY = flags.DEFINE_string("plan_only", "", "regex on MODEL,TASK,METHOD@TOPOLOGY: the plan compiles only these")
_PLAN = flags.DEFINE_string("plan", "", "write the plan over every paper config x slice (PLAN) to this Markdown file")
_TIMEOUT = flags.DEFINE_float(
    "compile_timeout", 0, "seconds one program's XLA compile may take; longer ends the run, exit 3 (0: no limit)"
)
_PROBE = flags.DEFINE_list(
    "probe_depth", [], "LAYERS,VISION_LAYERS: compile a cut model as a memory probe (no fit verdict; exit 1)"
)


# ----------------------------------------------------------------------------------------------------- main


def main(argv):
  del argv
  from ekipl_jax import tpu_flags

  print(f"LIBTPU_INIT_ARGS={tpu_flags.apply()}")  # the flags the trainer runs with (ekipl_jax/tpu_flags.py)
  if _DUMP.value:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={_DUMP.value}").strip()
  import jax

  jax.config.update("jax_platforms", "cpu")  # the host side; the TPU is only a compilation target
  probe = tuple(int(x) for x in _PROBE.value) or None
  if probe and len(probe) != 2:
    raise app.UsageError("--probe_depth takes LAYERS,VISION_LAYERS")
  aot_compile.OPTIONS.update(programs=tuple(_PROGRAMS.value), timeout_s=_TIMEOUT.value, probe_depth=probe)
  if _PLAN.value:
    return 0 if aot_plan.write_plan(_PLAN.value, _TEXT.value, _HEADROOM.value, _PLAN_ONLY.value) else 1
  if _CONFIG.value is None or not _TOPOLOGY.value:
    raise app.UsageError("--config and --topology are required (or --plan FILE)")

  def on_timeout(name: str, seconds: float) -> None:
    print(f"\n{_CONFIG.value.name} on {_TOPOLOGY.value}: the compile of {name} ran past {seconds:.0f} s; stopped")
    if _JSON.value:
      with open(_JSON.value, "w") as f:
        json.dump(dict(config=_CONFIG.value.name, topology=_TOPOLOGY.value, timed_out=name, fits=False), f)

  aot_compile.OPTIONS["on_timeout"] = on_timeout
  rep = aot_programs.run_one(_CONFIG.value, _TOPOLOGY.value, _TEXT.value, _IMAGES.value, _HEADROOM.value)
  aot_report.print_report(rep)
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(rep, f, indent=1, default=str)
  if _DUMP.value and not rep["fits"]:
    aot_report.print_memory_reports(_DUMP.value)
  return 0 if rep["fits"] else 1


def _main(argv):
  try:
    sys.exit(main(argv))
  except SystemExit:
    raise
  except Exception:  # pylint: disable=broad-except
    import traceback

    traceback.print_exc()
    sys.exit(2)


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  app.run(_main)
