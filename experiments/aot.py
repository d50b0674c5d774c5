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

  sft   the SFT step (train/sft.py make_sft_step) on sft.batch_size rows of prompt + sft.max_completion tokens
  rl    sampler prefill and decode loop (sampling/sampler.py), reference log-probs (train/rl_stages.py, when rl.beta != 0)
        and the update step (rl/update.py via train/rl_stages.py build_step) on rl.batch_prompts x rl.group_size rows.
        Old log-probs are no separate program: with rl.mu == 1 pi_old is pi_theta, with mu > 1 the update step
        computes them itself. The pool's external rows (M x K per prompt) live on the host; G per prompt are kept.

Shapes: every prompt carries images_per_prompt images of the largest size the config's image processor makes
(max over aspect ratios of transformers' smart_resize under data.max_pixels), plus prompt_text_tokens of text; the
prompt bucket is the smallest of data.prompt_buckets that holds it (the processor's rule). Each row's patches are
packed as train/batching.py packs them; the sampler's patch bucket is sampling/sampler.py's.

Per chip, for each program: XLA's argument / output / temp bytes (compiled.memory_analysis()); what else is resident
while it runs (train state, reference params: buffers that are not its arguments); their sum against the chip's HBM
as XLA itself reports it (an oversized probe compile's "available HBM"). The resident buffers are counted from their
shapes and shardings, without the TPU's tile padding (XLA's argument bytes came out 3% above that on the tiny demo
model, whose dims are not multiples of 128; the paper models' dims are). A program fits when the sum leaves at least
--min_headroom of HBM free. When XLA refuses to compile for lack of HBM, the program does not fit, with XLA's number.
Exit status: 0 when every program fits, 1 when one does not, 2 on any other error.

Estimates (labelled so): XLA's cost model (compiled.cost_analysis()) gives flops and, on some chips, a positive
'optimal_seconds'; from it a step time, tokens/s and MFU against the chip's peak bf16 flop/s (CHIPS below). The cost
model counts a loop's body once whatever its trip count (measured: a 1000-step fori_loop reports the flops of one
step), so the decode loop's estimate is scaled by max_new_tokens - 1 and the update step's by micro_batches x mu;
loops inside them (log-prob chunks) stay counted once, so the estimates are lower bounds on time.

Only one process can load libtpu at a time (a lock file); ALLOW_MULTIPLE_LIBTPU_LOAD=1 lifts the lock.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import re
import sys
import time
from typing import Any

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config, as experiments/train.py takes it")
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU topology name, e.g. v5e:2x4, v5p:2x2x1, v5e:16x16")
_TEXT = flags.DEFINE_integer("prompt_text_tokens", 256, "text tokens per prompt besides the image tokens")
_IMAGES = flags.DEFINE_integer("images_per_prompt", -1, "images per prompt (-1: by data.task, IMAGES_PER_TASK)")
_HEADROOM = flags.DEFINE_float("min_headroom", 0.10, "fraction of HBM that must stay free for a program to fit")
_JSON = flags.DEFINE_string("json_out", "", "also write the results as JSON here")
_DUMP = flags.DEFINE_string("xla_dump", "", "XLA dump folder (its *memory-usage-report.txt lists the largest buffers)")
_PROGRAMS = flags.DEFINE_list(
    "programs", [], "compile only these (sft_step, prefill, decode, ref_logprobs, update_step)"
)
_PLAN_ONLY = flags.DEFINE_string("plan_only", "", "regex on MODEL,TASK,METHOD@TOPOLOGY: the plan compiles only these")
_PLAN = flags.DEFINE_string("plan", "", "write the plan over every paper config x slice (PLAN) to this Markdown file")

GiB = 1024**3

# Images per prompt by data.task: Reason-RFT's spatial task (TRANCE) shows the initial and the final state.
IMAGES_PER_TASK = {"counting": 1, "structure": 1, "spatial": 2}


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

# make tpu-plan: each paper model on the slices it is planned for (issue 10); the last 7B entry is pod scale with
# 16 data-parallel replicas of 16-way FSDP groups.
PLAN_SLICES = {
    "qwen2_vl_2b": (("v5e:2x4", {}),),
    "qwen2_vl_7b": (("v5e:4x4", {}), ("v5p:2x2x1", {}), ("v5e:16x16", {"mesh.shape": (16, -1, 1)})),
    "qwen2_5_vl_3b": (("v5e:2x4", {}),),
    "qwen2_5_vl_7b": (("v5e:4x4", {}), ("v5p:2x2x1", {}), ("v5e:16x16", {"mesh.shape": (16, -1, 1)})),
}


# ------------------------------------------------------------------------------------------------- the model


def hf_config_for(cfg) -> tuple[dict, str]:
  """(config.json dict, where it came from): init_from's config.json when on disk; else the config's from-scratch
  model.arch; else the known config of the model its name / init_from names."""
  from ekipl_jax.models import known_configs
  from ekipl_jax.train import policy

  path = os.path.join(cfg.model.init_from, "config.json") if cfg.model.init_from else ""
  if path and os.path.isfile(path):
    with open(path) as f:
      return json.load(f), path
  if not cfg.model.init_from and cfg.model.arch:
    V = int(cfg.model.vocab_size)
    if V <= 8:
      raise ValueError("config key model.vocab_size: a from-scratch model.arch needs the vocabulary size (> 8)")
    # Special ids only place the image tokens; the shapes do not depend on them.
    names = ("eos_token_id", "pad_token_id", "image_token_id", "video_token_id", "vision_start_token_id")
    special = dict(vocab_size=V, vision_end_token_id=V - 6, **{n: V - 1 - i for i, n in enumerate(names)})
    return policy.scratch_hf_config(cfg.model.family, cfg.model.arch, special), "model.arch"
  name = known_configs.find(cfg.name, cfg.model.init_from)
  if name is None:
    raise ValueError(
        f"config key model.init_from: no config.json at {cfg.model.init_from!r} and no known model name in the config "
        f"name {cfg.name!r} or the path (known: {sorted(known_configs.CONFIGS)}, ekipl_jax/models/known_configs.py)"
    )
  return known_configs.lookup(name), f"known_configs.{name}"


def largest_image_grid(dcfg, vcfg) -> tuple[int, int, int]:
  """(t, h, w) patch grid of the largest image the processor makes under data.max_pixels (transformers'
  smart_resize over aspect ratios up to 1:8, at most max_pixels; the factor is patch_size * merge_size)."""
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

  f = vcfg.patch_size * vcfg.spatial_merge_size
  side = int(math.isqrt(int(dcfg.max_pixels)) * 3) // f * f + f
  best = (0, 0)
  for h in range(f, side + 1, f):
    for w in range(h, min(8 * h, side * 3) + 1, f):
      rh, rw = smart_resize(h, w, factor=f, min_pixels=int(dcfg.min_pixels), max_pixels=int(dcfg.max_pixels))
      if best[0] * best[1] < rh * rw <= dcfg.max_pixels:  # (min_pixels can push odd aspect ratios above it)
        best = (rh, rw)
  return 1, best[0] // vcfg.patch_size, best[1] // vcfg.patch_size


# ------------------------------------------------------------------------------------------ abstract inputs


def sds(shape, dtype, sharding):
  import jax

  return jax.ShapeDtypeStruct(tuple(int(s) for s in shape), dtype, sharding=sharding)


def batch_sharding(shape, mesh, rules):
  """update.shard_batch's placement: the leading axis on the logical "batch" axis. (shard_batch applies the default
  sharding.RULES, not mesh.rules; `rules` is unused so that this stays what the trainer does.)"""
  from ekipl_jax import sharding

  del rules
  return sharding.logical_sharding(("batch",) + (None,) * (len(shape) - 1), mesh, sharding.RULES, shape=shape)


@dataclasses.dataclass
class Geometry:
  grid: tuple[int, int, int]  # one image's (t, h, w) patches
  images_per_prompt: int
  image_tokens: int  # per prompt (merged)
  prompt_tokens: int  # real prompt tokens (text + image tokens + vision start / end)
  P: int  # prompt bucket


def geometry(cfg, model, text_tokens: int, images_per_prompt: int) -> Geometry:
  from ekipl_jax.data import processor as processor_lib
  from ekipl_jax.models.model import vision_config

  vcfg = vision_config(model.config)
  grid = largest_image_grid(cfg.data, vcfg)
  n = images_per_prompt if images_per_prompt >= 0 else IMAGES_PER_TASK.get(cfg.data.task, 1)
  tok = n * (grid[0] * grid[1] * grid[2] // vcfg.merge_unit)
  length = text_tokens + tok + 2 * n
  return Geometry(grid, n, tok, length, processor_lib.pick_bucket(length, cfg.data.prompt_buckets))


def prompt_ids(model, geo: Geometry, B: int):
  """[B, P] left-padded prompt ids / mask: text, then per image <vision_start> <image_pad> x tokens <vision_end>."""
  import numpy as np

  c = model.config
  per = geo.image_tokens // max(geo.images_per_prompt, 1)
  row = [0] * (geo.prompt_tokens - geo.image_tokens - 2 * geo.images_per_prompt)
  for _ in range(geo.images_per_prompt):
    row += [c.vision_start_token_id] + [c.image_token_id] * per + [c.vision_start_token_id + 1]
  ids = np.zeros((B, geo.P), np.int32)
  mask = np.zeros((B, geo.P), np.int32)
  ids[:, geo.P - len(row) :] = row
  mask[:, geo.P - len(row) :] = 1
  return ids, mask


def abstract_rows_batch(model, geo: Geometry, R: int, C: int, mesh, rules) -> dict:
  """train/batching.rows_batch's arrays for R identical rows (built for one row on the host, leading axis scaled
  to R) as ShapeDtypeStructs placed as update.shard_batch places them."""
  import numpy as np

  from ekipl_jax.models.model import vision_config
  from ekipl_jax.train import batching

  vcfg = vision_config(model.config)
  ids, mask = prompt_ids(model, geo, 1)
  grid = np.tile(np.asarray(geo.grid, np.int64), (geo.images_per_prompt, 1))
  n_patches = int(grid.prod(-1).sum())
  b = batching.rows_batch(
      model,
      ids,
      mask,
      np.zeros((1, C), np.int32),
      np.ones((1, C), np.int32),
      np.zeros((n_patches, vcfg.patch_dim), np.float32) if geo.images_per_prompt else None,
      grid if geo.images_per_prompt else None,
      [geo.images_per_prompt],
  )
  out = {}
  for k, v in b.items():
    shape = (R * v.shape[0],) + v.shape[1:]
    out[k] = sds(shape, v.dtype, batch_sharding(shape, mesh, rules))
  return out


def update_batch(rows: dict, R: int, C: int, with_sampler_logp: bool, mesh, rules):
  """The rl/batch.UpdateBatch train/rl_stages.rl_step builds from the kept rows (before ref_logp_RC), as ShapeDtypeStructs;
  sampler_logp_RC only when the loss's log-prob temperature is the sampler's (as rl_step decides)."""
  import numpy as np

  from ekipl_jax.rl import batch as rl_batch

  one = lambda shape, dtype: sds(shape, dtype, batch_sharding(shape, mesh, rules))
  return rl_batch.from_rows(
      rows,
      A_R=one((R,), np.float32),
      is_external_R=one((R,), np.bool_),
      behaviour_logp_RC=one((R, C), np.float32),
      has_behaviour_R=one((R,), np.bool_),
      sampler_logp_RC=one((R, C), np.float32) if with_sampler_logp else None,
  )


def with_shardings(shapes, shardings):
  import jax

  return jax.tree.map(lambda s, sh: sds(s.shape, s.dtype, sh), shapes, shardings)


def abstract_params(model, mesh, rules):
  from ekipl_jax.models import hf_checkpoint

  shapes, _ = hf_checkpoint.abstract_params(model)
  return with_shardings(shapes, hf_checkpoint.param_shardings(model, mesh, rules))


def per_chip_bytes(tree) -> int:
  """Bytes one chip holds of a tree of ShapeDtypeStructs with shardings (the largest shard)."""
  import jax
  import numpy as np

  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    try:
      item = np.dtype(x.dtype).itemsize
    except TypeError:  # PRNG key arrays
      item = 8
    total += int(np.prod(shape, dtype=np.int64)) * item
  return total


# --------------------------------------------------------------------------------------------- compilation


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
_TOPOLOGIES: dict[Any, Any] = {}  # topology name -> description; (name, mesh shape) -> Mesh
_PARAMS: dict[str, Any] = {}
_SIGNATURE_BASE: list = []  # what every program of the current run depends on (model, topology, mesh, rules)

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


def signature(name: str, static: Any, args: Any) -> str:
  """Hash of what a program's compilation depends on: the run's model / topology / mesh, the program's static
  settings, and its arguments' shapes, dtypes and shardings."""
  import jax

  leaves = jax.tree_util.tree_flatten_with_path(args)[0]
  shapes = [(jax.tree_util.keystr(k), x.shape, str(x.dtype), str(getattr(x.sharding, "spec", None))) for k, x in leaves]
  text = json.dumps([_SIGNATURE_BASE, name, static, shapes], sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()


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

  if _PROGRAMS.value and name not in _PROGRAMS.value:
    return dict(name=name, skipped="not selected (--programs)", unselected=True)
  key = signature(name, [static, kwargs], args)
  if key in _CACHE:
    return dict(_CACHE[key], name=name, cached=True)
  t0 = time.time()
  lowered = jitted.lower(*args, **(kwargs or {}))
  out: dict[str, Any] = dict(name=name, lower_s=time.time() - t0, cached=False, signature=key[:12])
  t0 = time.time()
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    out["compile_s"] = time.time() - t0
    oom = parse_oom(str(e))
    if oom is None:
      raise
    out["oom"] = oom
    _CACHE[key] = {k: v for k, v in out.items() if k != "name"}
    return out
  out["compile_s"] = time.time() - t0
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


def program_bytes(r: dict) -> int:
  """Peak bytes per chip of a program alone: arguments + outputs not aliased to them + temporaries + code."""
  m = r["mem"]
  return m["argument"] + m["output"] - m["alias"] + m["temp"] + m["code"]


# ------------------------------------------------------------------------------------------------- stages


def sft_programs(cfg, model, mesh, rules, geo: Geometry, params):
  from ekipl_jax.train import sft, trainer

  steps = cfg.sft.steps or -(-cfg.sft.num_examples // cfg.sft.batch_size)
  optimizer = sft.optimizer_for(cfg.sft, steps)
  state, shardings = trainer.abstract_state(params, optimizer, mesh)
  R, C = cfg.sft.batch_size, cfg.sft.max_completion
  batch = abstract_rows_batch(model, geo, R, C, mesh, rules)
  step = sft.make_sft_step(model, optimizer, cfg.model.logprob_chunk, state_sharding=shardings)
  static = [cfg.sft.to_dict(), cfg.model.logprob_chunk]
  r = compile_program("sft_step", step, (state, batch), dict(P=geo.P), static=static)
  r.update(rows=R, tokens=R * (geo.P + C), resident={}, args=["state", "batch"])
  return [r], {"state": per_chip_bytes(state), "batch": per_chip_bytes(batch)}


def rl_programs(cfg, model, mesh, rules, geo: Geometry, params):
  import jax
  import numpy as np

  from ekipl_jax import models, sharding
  from ekipl_jax.models import vision as vision_lib
  from ekipl_jax.models.model import vision_config
  from ekipl_jax.rl import update
  from ekipl_jax.sampling.sample import SamplingParams
  from ekipl_jax.train import policy, rl_stages, trainer

  from ekipl_jax.sampling import sampler

  rc = cfg.rl
  optimizer = update.make_optimizer(rc.optimizer)
  state, shardings = trainer.abstract_state(params, optimizer, mesh)
  # The trainer's reference: models.frozen_copy of the initial params (placed like them, matrices in compute dtype).
  ref = models.frozen_copy(params, policy.DTYPES[cfg.model.compute_dtype]) if rc.beta != 0 else None
  B, n, C = rc.batch_prompts, rc.num_policy_samples, rc.sampling.max_new_tokens
  R = B * rc.group_size
  sizes = {"params": per_chip_bytes(params), "state": per_chip_bytes(state), "ref_params": per_chip_bytes(ref or {})}
  others = sizes["state"] - sizes["params"]  # optimizer moments and counters

  # Sampler (sampler.generate): prompts placed as sampler.generate places them, patches / metadata / rng unplaced (replicated).
  ids, mask = prompt_ids(model, geo, B)
  grid = np.tile(np.asarray(geo.grid, np.int64), (B * geo.images_per_prompt, 1))
  ids_BP, mask_BP, pos_3BP, first_pos_B, _, _ = sampler.prepare_prompts(model, ids, mask, None, grid, (geo.P,))
  place = lambda x, axes: sds(x.shape, x.dtype, sharding.logical_sharding(axes, mesh, rules, x.shape))
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  vcfg = vision_config(model.config)
  Np = sampler.patch_bucket(int(grid.prod(-1).sum()), vcfg.merge_unit)  # as prepare_prompts pads the patches
  vmeta = jax.tree.map(lambda a: sds(a.shape, a.dtype, rep), vision_lib.vision_metadata(grid, vcfg, pad_to=Np))
  rng = sds((), jax.eval_shape(lambda: jax.random.key(0)).dtype, rep)
  sp = SamplingParams(float(rc.sampling.temperature), float(rc.sampling.top_p), int(rc.sampling.top_k))
  prefill, decode = sampler.programs(model, sp, int(C), int(n), (1,), 0, geo.P)
  prompt_args = (
      place(ids_BP, ("batch", "sequence")),
      place(mask_BP, ("batch", "sequence")),
      place(pos_3BP, (None, "batch", "sequence")),
      place(first_pos_B, ("batch",)),
      sds((Np, vcfg.patch_dim), np.float32, rep),
      vmeta,
      rng,
  )
  out = []
  static = [sp, int(C), int(n), geo.P]
  r = compile_program("prefill", prefill, (params,) + prompt_args, static=static)
  r.update(rows=B, tokens=B * geo.P, resident={"opt_state": others, "ref_params": sizes["ref_params"]})
  out.append(r)
  if "out_shapes" in r:
    dstate = dict(r["out_shapes"])
    cache = dstate.pop("cache")
    sizes["kv_cache"] = per_chip_bytes(cache)
    r = compile_program("decode", decode, (params, cache, dstate), static=static)
    r.update(rows=B * n, tokens=B * n * (C - 1), resident={"opt_state": others, "ref_params": sizes["ref_params"]})
    r["trips"] = C - 1  # the decode loop's body, once per new token (every row running to max_new_tokens)
  else:
    r = dict(name="decode", skipped="prefill did not compile", unselected=bool(r.get("unselected")))
  out.append(r)

  # Update batch (train/rl_stages.rl_step): G kept rows per prompt, each with its own images.
  temp = rl_stages.logprob_temperature(rc)
  rows = abstract_rows_batch(model, geo, R, C, mesh, rules)
  batch = update_batch(rows, R, C, temp == rc.sampling.temperature, mesh, rules)
  sizes["batch_inputs"] = per_chip_bytes(batch.inputs)
  if ref is not None:
    static = [geo.P, cfg.model.logprob_chunk, temp]
    ref_fn = rl_stages._ref_fn(model, geo.P, cfg.model.logprob_chunk, temp)
    r = compile_program("ref_logprobs", ref_fn, (ref, batch.inputs), static=static)
    r.update(rows=R, tokens=R * (geo.P + C), resident={"state": sizes["state"]})
    out.append(r)
    if "out_shapes" in r:
      batch = batch.replace(ref_logp_RC=r["out_shapes"])
    elif r.get("unselected"):  # placed like the rest of the batch (what XLA picks for the ref program's output)
      batch = batch.replace(ref_logp_RC=sds((R, C), np.float32, batch_sharding((R, C), mesh, rules)))
    else:
      return out, sizes
  sizes["batch"] = per_chip_bytes(batch)
  step = rl_stages.build_step(model, cfg, optimizer, shardings)(geo.P)
  static = [{k: v for k, v in rc.to_dict().items() if k not in HOST_ONLY_RL}, geo.P, cfg.model.logprob_chunk]
  r = compile_program("update_step", step, (state, batch), static=static)
  r.update(rows=R, tokens=R * (geo.P + C), resident={"ref_params": sizes["ref_params"]})
  r["trips"] = int(rc.micro_batches) * int(rc.mu)  # the step's scans: mu epochs x micro-batches
  out.append(r)
  return out, sizes


# --------------------------------------------------------------------------------------------------- report


def run_one(cfg, topology: str, text_tokens: int, images_per_prompt: int, min_headroom: float) -> dict:
  """Compile the config's stage for the topology; -> the report (also printed)."""
  import jax
  from jax.experimental import topologies

  from ekipl_jax import sharding
  from ekipl_jax.models import config as config_lib, hf_checkpoint
  from ekipl_jax.train import policy, trainer

  if cfg.stage not in ("sft", "rl"):
    raise ValueError(f"config key stage: {cfg.stage!r}; the tool compiles the sft or rl stage")
  t0 = time.time()
  if topology not in _TOPOLOGIES:
    _TOPOLOGIES[topology] = topologies.get_topology_desc(platform="tpu", topology_name=topology)
  topo = _TOPOLOGIES[topology]
  devices = list(topo.devices)
  mkey = (topology, tuple(cfg.mesh.shape))
  if mkey not in _TOPOLOGIES:  # one Mesh object per slice and shape, so that cached params share it
    _TOPOLOGIES[mkey] = sharding.make_mesh(tuple(cfg.mesh.shape), devices=devices)
  mesh = _TOPOLOGIES[mkey]
  rules = trainer.rules_from_config(cfg.mesh.rules)
  kind = devices[0].device_kind
  chip = CHIPS.get(kind)
  hbm = usable_hbm(mesh)
  hf, hf_source = hf_config_for(cfg)
  model = hf_checkpoint.build(
      config_lib.as_config(hf),
      policy.DTYPES[cfg.model.param_dtype],
      policy.DTYPES[cfg.model.compute_dtype],
      cfg.model.remat,
      mesh,
      rules,
  )
  pkey = json.dumps([topology, cfg.mesh.shape, rules, hf, cfg.model.param_dtype], sort_keys=True, default=str)
  if pkey not in _PARAMS:  # make tpu-plan: one eval_shape per model and slice
    _PARAMS[pkey] = abstract_params(model, mesh, rules)
  params = _PARAMS[pkey]
  geo = geometry(cfg, model, text_tokens, images_per_prompt)
  model_fields = {k: v for k, v in cfg.model.to_dict().items() if k != "init_from"}  # hf stands for the checkpoint
  _SIGNATURE_BASE[:] = [topology, dict(mesh.shape), rules, hf, model_fields]
  fn = sft_programs if cfg.stage == "sft" else rl_programs
  programs, sizes = fn(cfg, model, mesh, rules, geo, params)

  for r in programs:
    if "mem" in r:
      r["program_bytes"] = program_bytes(r)
      r["total_bytes"] = r["program_bytes"] + sum(r["resident"].values())
      r["headroom"] = 1 - r["total_bytes"] / hbm
      r["fits"] = r["headroom"] >= min_headroom
      c = r.get("cost", {})
      if c.get("optimal_seconds", -1) > 0:  # XLA counts a loop's body once: scaled by the known trip counts
        t = c["optimal_seconds"] * r.get("trips", 1)
        r["estimate"] = dict(seconds=t, tokens_per_s=r["tokens"] / t)
        if chip and c.get("flops", 0) > 0:
          r["estimate"]["mfu"] = c["flops"] * r.get("trips", 1) / (t * chip.peak_bf16)
    else:
      r["fits"] = bool(r.get("unselected"))  # a program left out by --programs does not decide the verdict
    r.pop("out_shapes", None)
  report = dict(
      config=cfg.name,
      stage=cfg.stage,
      topology=topology,
      chips=len(devices),
      device_kind=kind,
      mesh=dict(mesh.shape),
      hbm_bytes=hbm,
      chip=dataclasses.asdict(chip) if chip else None,
      hf_config=hf_source,
      geometry=dataclasses.asdict(geo),
      sizes=sizes,
      min_headroom=min_headroom,
      programs=programs,
      fits=all(r["fits"] for r in programs),
      seconds=time.time() - t0,
  )
  print_report(report)
  return report


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
  print(f"  => {'FITS' if rep['fits'] else 'DOES NOT FIT'} (min headroom {rep['min_headroom']:.0%})")


# ----------------------------------------------------------------------------------------------------- plan


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


def write_plan(path: str, text_tokens: int, min_headroom: float) -> bool:
  """Every paper config x its slices (PLAN_SLICES; --plan_only selects) -> path (Markdown) and path's .json. Both are
  rewritten before and after every config, so an interrupted plan says what it compiled and what it did not."""
  from configs import paper  # pylint: disable=g-import-not-at-top

  entries = []
  for model_name, slices in PLAN_SLICES.items():
    for topology, overrides in slices:
      for task in paper.TASKS:
        for method in paper.METHODS:
          spec = f"configs/paper.py:{model_name},{task},{method}"
          cfg = load_config(spec, overrides)
          run = not _PLAN_ONLY.value or re.search(_PLAN_ONLY.value, f"{model_name},{task},{method}@{topology}")
          spec = " ".join([spec] + [f"--config.{k}={v}" for k, v in overrides.items()])
          entries.append((cfg, topology, spec, bool(run)))
  reports = [dict(config=c.name, topology=t, spec=s, not_run=True, pending=r, fits=True) for c, t, s, r in entries]
  t0 = time.time()

  def write():
    with open(path, "w") as f:
      f.write(plan_markdown(reports, time.time() - t0, text_tokens, min_headroom))
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
      json.dump(reports, f, indent=1, default=str)

  for i, (cfg, topology, spec, run) in enumerate(entries):
    if not run:
      continue
    write()
    try:
      rep = run_one(cfg, topology, text_tokens, -1, min_headroom)
    except Exception as e:  # pylint: disable=broad-except
      rep = dict(config=cfg.name, topology=topology, error=f"{type(e).__name__}: {e}"[:500], fits=False)
      print(rep)
    reports[i] = dict(rep, spec=spec)
  write()
  return all(r["fits"] for r in reports)


def git_revision() -> str:
  import subprocess

  run = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, check=False).stdout.strip()
  dirty = run("status", "--porcelain", "--untracked-files=no")
  return run("rev-parse", "--short", "HEAD") + (" with uncommitted changes in the tree" if dirty else "")


def summary_rows(reports: list[dict]) -> list[str]:
  rows = []
  for rep in reports:
    if "error" in rep:
      rows.append(f"| {rep['config']} | {rep['topology']} | | no: {rep['error'][:120]} | | | |")
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
        f"| {rep['config']} | {rep['topology']} | {rep['chips']} | {'yes' if rep['fits'] else '**no**'} | {worst} | "
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
      f"{sum(not r.get('not_run') for r in reports)} of {len(reports)} config x slice pairs compiled in this run "
      f"({sum(bool(r.get('pending')) for r in reports)} more selected and not reached): every program of every paper config compiled by XLA for the TPU "
      "topology, without a TPU. Per chip, in GiB: XLA's argument / output / temporary bytes of the program, what "
      "else is resident while it runs (train state, reference params), their total against the HBM XLA reports for "
      f"the chip, and the headroom left; a program fits when the headroom is at least {min_headroom:.0%}. A program "
      "XLA refuses for lack of HBM shows XLA's own number. Shapes: the paper's batch (configs/paper.py: 16 prompts, "
      "N = 8 policy samples, G = 8 kept rows per prompt, 512 completion tokens; SFT 16 rows x 1024), each prompt with "
      "the largest image data.max_pixels allows (one image; two for spatial) and "
      f"{text_tokens} text tokens, in the prompt bucket data.prompt_buckets gives.",
      "",
      "A program whose abstract signature (model, slice, mesh, the program's static settings, its arguments' shapes, "
      "dtypes and shardings; experiments/aot.py `signature`) matches one compiled before is not compiled again "
      '("cached": counting and structure prompts have the same shapes, and GRPO and EKIPL differ only in host-side '
      "fields, HOST_ONLY_RL); the time shown is the first compile's. "
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
      lines.append(f"| {rep['config']} | {rep['topology']} | | error: {rep['error']} | | | | | | | | | | no |")
      continue
    mesh = "x".join(str(v) for v in rep["mesh"].values())
    for r in rep["programs"]:
      head = f"| {rep['config']} | {rep['topology']} | {mesh} | {r['name']} |"
      if "skipped" in r:
        verdict = "not compiled" if r.get("unselected") else "no"
        lines.append(f"{head} not compiled: {r['skipped']} | | | | | | | | | {verdict} |")
        continue
      comp = f"{r['compile_s']:.0f}" + (" (cached)" if r["cached"] else "")
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


# ----------------------------------------------------------------------------------------------------- main


def main(argv):
  del argv
  if _DUMP.value:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={_DUMP.value}").strip()
  import jax

  jax.config.update("jax_platforms", "cpu")  # the host side; the TPU is only a compilation target
  if _PLAN.value:
    return 0 if write_plan(_PLAN.value, _TEXT.value, _HEADROOM.value) else 1
  if _CONFIG.value is None or not _TOPOLOGY.value:
    raise app.UsageError("--config and --topology are required (or --plan FILE)")
  rep = run_one(_CONFIG.value, _TOPOLOGY.value, _TEXT.value, _IMAGES.value, _HEADROOM.value)
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(rep, f, indent=1, default=str)
  if _DUMP.value and not rep["fits"]:
    print_memory_reports(_DUMP.value)
  return 0 if rep["fits"] else 1


def print_memory_reports(folder: str, top: int = 12) -> None:
  """The head of each *memory-usage-report.txt XLA wrote (written even when the compile ran out of HBM)."""
  for name in sorted(os.listdir(folder)):
    if name.endswith("memory-usage-report.txt") and "cpu_after" not in name:  # TPU programs only
      with open(os.path.join(folder, name)) as f:
        head = f.read().splitlines()[: top * 3]
      print(f"\n--- {name}\n" + "\n".join(head))


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
