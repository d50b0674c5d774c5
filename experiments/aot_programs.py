"""experiments/aot.py, part 3: the device programs of a config's stage, lowered with the trainer's own functions and
shardings and compiled for the topology, and the per-chip report of one config on one slice.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import aot_compile
from aot_compile import CHIPS, compile_program, device_rl_fields, program_bytes, usable_hbm
from aot_shapes import (
    Geometry,
    abstract_params,
    abstract_rows_batch,
    batch_sharding,
    geometry,
    hf_config_for,
    per_chip_bytes,
    prompt_ids,
    sds,
    update_batch,
)

_TOPOLOGIES: dict[Any, Any] = {}  # topology name -> description; (name, mesh shape) -> Mesh
_PARAMS: dict[str, Any] = {}  # abstract params per model and slice (make tpu-plan: one eval_shape each)


def sft_programs(cfg, model, mesh, rules, geo: Geometry, params):
  from ekipl_jax.train import sft, trainer

  steps = cfg.sft.steps or -(-cfg.sft.num_examples // cfg.sft.batch_size)
  optimizer = sft.optimizer_for(cfg.sft, steps)
  state, shardings = trainer.abstract_state(params, optimizer, mesh)
  R, C = cfg.sft.batch_size, cfg.sft.max_completion
  batch = abstract_rows_batch(model, geo, R, C, mesh, rules)
  step = sft.make_sft_step(
      model, optimizer, cfg.model.logprob_chunk, micro_batches=cfg.sft.micro_batches, state_sharding=shardings
  )
  static = [cfg.sft.to_dict(), cfg.model.logprob_chunk]
  r = compile_program("sft_step", step, (state, batch), dict(P=geo.P), static=static)
  r.update(rows=R, tokens=R * (geo.P + C), resident={}, args=["state", "batch"])
  r["trips"] = int(cfg.sft.micro_batches)  # the step's scan over micro-batches
  return [r], {"state": per_chip_bytes(state), "batch": per_chip_bytes(batch)}


def rl_programs(cfg, model, mesh, rules, geo: Geometry, params):
  import jax
  import numpy as np

  from ekipl_jax import models, sharding
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

  # Sampler (sampler.generate): one prompt prepared on the host as generate prepares it (row-packed images), its
  # arrays scaled to B prompts and placed as generate places them (the rng replicated).
  ids, mask = prompt_ids(model, geo, 1)
  grid = np.tile(np.asarray(geo.grid, np.int64), (geo.images_per_prompt, 1))
  px = np.zeros((int(grid.prod(-1).sum()), vision_config(model.config).patch_dim), np.float32)
  images = (px, grid) if geo.images_per_prompt else (None, None)
  ids_BP, mask_BP, pos_3BP, first_pos_B, packed = sampler.prepare_prompts(model, ids, mask, *images, (geo.P,))

  def place(x, axes, axis=0):
    shape = tuple(B * d if i == axis else d for i, d in enumerate(x.shape))
    return sds(shape, x.dtype, sharding.logical_sharding(axes, mesh, rules, shape))

  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  rng = sds((), jax.eval_shape(lambda: jax.random.key(0)).dtype, rep)
  sp = SamplingParams(float(rc.sampling.temperature), float(rc.sampling.top_p), int(rc.sampling.top_k))
  prefill, decode = sampler.programs(model, sp, int(C), int(n), (1,), 0, geo.P)
  prompt_args = (
      place(ids_BP, ("batch", "sequence")),
      place(mask_BP, ("batch", "sequence")),
      place(pos_3BP, (None, "batch", "sequence"), axis=1),
      place(first_pos_B, ("batch",)),
      None if packed is None else {k: place(v, ("batch",) + (None,) * (v.ndim - 1)) for k, v in packed.items()},
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
  static = [device_rl_fields(rc.to_dict()), geo.P, cfg.model.logprob_chunk]
  r = compile_program("update_step", step, (state, batch), static=static)
  r.update(rows=R, tokens=R * (geo.P + C), resident={"ref_params": sizes["ref_params"]})
  r["trips"] = int(rc.micro_batches) * int(rc.mu)  # the step's scans: mu epochs x micro-batches
  out.append(r)
  return out, sizes


def shallow_copy(hf: dict, layers: int, vision_layers: int) -> dict:
  """The config.json with only `layers` decoder layers and `vision_layers` vision blocks (the rest unchanged): a
  memory probe. Compiles of the full depth take ~15 min on a CPU; two shallow probes show which buffers grow per layer
  and which are fixed (a buffer XLA keeps per layer shows as the difference of two probes)."""
  hf = json.loads(json.dumps(hf))
  if not (1 <= layers <= hf["num_hidden_layers"] and 1 <= vision_layers <= hf["vision_config"]["depth"]):
    raise ValueError(f"--probe_depth {layers},{vision_layers}: each must be in 1..the model's depth")
  hf["num_hidden_layers"] = layers
  v = hf["vision_config"]
  v["depth"] = vision_layers
  if "fullatt_block_indexes" in v:  # Qwen2.5-VL: keep the last block full-attention
    v["fullatt_block_indexes"] = [i for i in v["fullatt_block_indexes"] if i < vision_layers] or [vision_layers - 1]
  return hf


def run_one(cfg, topology: str, text_tokens: int, images_per_prompt: int, min_headroom: float) -> dict:
  """Compile the config's stage for the topology; -> the report (aot_report.print_report prints it)."""
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
  probe = aot_compile.OPTIONS.get("probe_depth")
  if probe:
    hf, hf_source = shallow_copy(hf, *probe), f"{hf_source} cut to {probe[0]} LM / {probe[1]} vision layers (probe)"
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
  aot_compile.set_signature_base([topology, dict(mesh.shape), rules, hf, model_fields])
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
      compiled=sum("mem" in r for r in programs),  # a verdict needs at least one program measured
      probe_depth=list(probe) if probe else None,  # a probe measures a cut model: never a verdict on the config
      fits=all(r["fits"] for r in programs) and any("mem" in r for r in programs) and not probe,
      seconds=time.time() - t0,
  )
  return report
