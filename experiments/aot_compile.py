"""experiments/aot.py, part 2: compiling one program for a TPU topology and reading its memory and cost. Programs with
the abstract signature of one compiled before in the process are not compiled again; a program whose compilation
runs past the timeout ends the process (XLA's compile cannot be interrupted) after the on_timeout callback has
recorded it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import threading
import time
from typing import Any

from aot_shapes import sds


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  hbm_gib: float  # nominal HBM per chip (the source's number)
  peak_bf16: float  # peak bf16 flop/s per chip
  source: str


# device_kind (as libtpu names it) -> the chip. Numbers from Google Cloud's TPU pages.
CHIPS = {
    "TPU v4": Chip("v4", 32, 275e12, "https://cloud.google.com/tpu/docs/v4"),
    "TPU v5 lite": Chip("v5e", 16, 197e12, "https://cloud.google.com/tpu/docs/v5e"),
    "TPU v5": Chip("v5p", 95, 459e12, "https://cloud.google.com/tpu/docs/v5p"),
    "TPU v6 lite": Chip("v6e", 32, 918e12, "https://cloud.google.com/tpu/docs/v6e"),
}


_OOM = re.compile(r"required for (.*?) \(([\d.]+)([KMGTP]?)\) exceeds available HBM \(([\d.]+)([KMGTP]?)\)")
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4, "P": 1024**5}


def parse_oom(msg: str) -> dict | None:
  """XLA's "... required for HLO temporaries (259.61G) exceeds available HBM (15.75G)" (binary units)."""
  m = _OOM.search(msg)
  if not m:
    return None
  return dict(
      what=m.group(1), required=float(m.group(2)) * _UNITS[m.group(3)], available=float(m.group(4)) * _UNITS[m.group(5)]
  )


_CACHE: dict[str, dict] = {}  # abstract signature -> compile result (make tpu-plan compiles each program once)
_SIGNATURE_BASE: list = []  # what every program of the current run depends on (model, topology, mesh, rules)
OPTIONS: dict[str, Any] = dict(
    programs=(),  # compile only these program names (empty: all)
    timeout_s=0.0,  # a compile running longer ends the process (0: no limit)
    on_timeout=None,  # callable(program name, seconds) run before that exit (records the timeout)
    probe_depth=None,  # (layers, vision layers): compile a cut model (aot_programs.shallow_copy), no verdict
)


# rl config fields the device programs never read (selection, rewards and advantages run on the host); every other
# field, present or future, is part of the update step's signature.
HOST_ONLY_RL = (
    "selection",
    "num_external_per_model",
    "num_replace",
    "steps",
    "rewards",
    "adv_std",
    "adv_stats_from",
    "adv_eps",
    "adv_ddof",
)


# optimizer fields that only set scalar constants of the program (the lr schedule's values and lengths, Adam's betas
# and eps, weight decay, the clip norm): no buffer changes with them, so programs that differ only there share one
# compile. mu_dtype is not one of them (it changes the state's dtypes, which the signature sees anyway).
CONSTANTS_ONLY_OPTIMIZER = (
    "lr",
    "schedule",
    "warmup_steps",
    "total_steps",
    "final_lr_ratio",
    "weight_decay",
    "b1",
    "b2",
    "eps",
    "grad_clip",
)


def device_rl_fields(rl: dict) -> dict:
  """The rl config as the update step's signature sees it: without HOST_ONLY_RL and CONSTANTS_ONLY_OPTIMIZER."""
  out = {k: v for k, v in rl.items() if k not in HOST_ONLY_RL}
  out["optimizer"] = {k: v for k, v in rl.get("optimizer", {}).items() if k not in CONSTANTS_ONLY_OPTIMIZER}
  return out


def signature(name: str, static: Any, args: Any) -> str:
  """Hash of what a program's compilation depends on: the run's model / topology / mesh, the program's static
  settings, and its arguments' shapes, dtypes and shardings."""
  import jax

  leaves = jax.tree_util.tree_flatten_with_path(args)[0]
  shapes = [(jax.tree_util.keystr(k), x.shape, str(x.dtype), str(getattr(x.sharding, "spec", None))) for k, x in leaves]
  text = json.dumps([_SIGNATURE_BASE, name, static, shapes], sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()


def set_signature_base(base: list) -> None:
  """What every program of the current run depends on (model, topology, mesh, rules, model fields)."""
  _SIGNATURE_BASE[:] = base


_HBM: dict[str, float] = {}  # device_kind -> usable HBM bytes per chip


def usable_hbm(mesh) -> float:
  """HBM per chip as XLA counts it, read from its refusal of a 1 TiB program (cached per chip kind)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  kind = mesh.devices.flat[0].device_kind
  if kind not in _HBM:
    one = jax.sharding.Mesh(np.asarray(mesh.devices.flat[:1]), ("x",))
    rep = jax.sharding.NamedSharding(one, jax.sharding.PartitionSpec())
    f = jax.jit(lambda x: jnp.broadcast_to(x, (1 << 20, 1 << 18)) * 2, out_shardings=rep)
    try:
      f.lower(sds((1 << 18,), jnp.float32, rep)).compile()
      raise RuntimeError(f"{kind}: a 1 TiB program compiled; cannot read the chip's HBM")
    except jax.errors.JaxRuntimeError as e:
      oom = parse_oom(str(e))
      if oom is None:
        raise
      _HBM[kind] = oom["available"]
  return _HBM[kind]


def compile_program(name: str, jitted, args: tuple, kwargs: dict | None = None, static: Any = None) -> dict:
  """Lower and compile one program; its memory (per chip), cost estimate and times, or XLA's out-of-memory. A
  program with the signature of one compiled before in this process is not compiled again (make tpu-plan)."""
  import jax

  if OPTIONS["programs"] and name not in OPTIONS["programs"]:
    return dict(name=name, skipped="not selected (--programs)", unselected=True)
  key = signature(name, [static, kwargs], args)
  if key in _CACHE:
    return dict(_CACHE[key], name=name, cached=True)
  t0 = time.time()
  lowered = jitted.lower(*args, **(kwargs or {}))
  out: dict[str, Any] = dict(name=name, lower_s=time.time() - t0, cached=False, signature=key[:12])
  t0 = time.time()
  watchdog = _watchdog(name)
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    out["compile_s"] = time.time() - t0
    if watchdog:
      watchdog.cancel()
    oom = parse_oom(str(e))
    if oom is None:
      raise
    out["oom"] = oom
    _CACHE[key] = {k: v for k, v in out.items() if k != "name"}
    return out
  out["compile_s"] = time.time() - t0
  if watchdog:
    watchdog.cancel()
  m = compiled.memory_analysis()
  out["mem"] = dict(
      argument=m.argument_size_in_bytes,
      output=m.output_size_in_bytes,
      alias=m.alias_size_in_bytes,
      temp=m.temp_size_in_bytes,
      code=m.generated_code_size_in_bytes,
  )
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  out["cost"] = {k: float(cost[k]) for k in ("flops", "bytes accessed", "optimal_seconds") if cost and k in cost}
  out["out_shapes"] = jax.tree.map(
      lambda i, s: sds(i.shape, i.dtype, s), lowered.out_info, compiled.output_shardings
  )  # for the next program's inputs
  _CACHE[key] = {k: v for k, v in out.items() if k != "name"}
  return out


def _watchdog(name: str) -> threading.Timer | None:
  """A timer that, past OPTIONS["timeout_s"], runs OPTIONS["on_timeout"](name, seconds) and ends the process: XLA's
  compile holds the interpreter in C++ and cannot be interrupted, and a second process could not load libtpu."""
  seconds = float(OPTIONS["timeout_s"] or 0)
  if seconds <= 0:
    return None

  def fire():
    try:
      if OPTIONS["on_timeout"] is not None:
        OPTIONS["on_timeout"](name, seconds)
    finally:
      os._exit(3)  # pylint: disable=protected-access

  timer = threading.Timer(seconds, fire)
  timer.daemon = True
  timer.start()
  return timer


def program_bytes(r: dict) -> int:
  """Peak bytes per chip of a program alone: arguments + outputs not aliased to them + temporaries + code."""
  m = r["mem"]
  return m["argument"] + m["output"] - m["alias"] + m["temp"] + m["code"]
