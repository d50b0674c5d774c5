"""`experiments/train.py` -> `run(config)`: set up the mesh, data and policy, then run the config's stage.

sft:  CoT-SFT on the first `sft.num_examples` training examples; writes workdir/hf (an HF folder)
rl:   GRPO / EKIPL (config.rl.selection) from model.init_from; writes workdir/hf and eval results
eval: evaluate model.init_from on data.eval_splits
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
from typing import Callable, TypeVar

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec

from ekipl_jax import models, sharding, train_state
from ekipl_jax.data import builders
from ekipl_jax.data import processor as processor_lib
from ekipl_jax.rl import selection, update
from ekipl_jax.data import aux_store
from ekipl_jax.train import input_pipeline as data_lib
from ekipl_jax.train import evaluate as eval_lib
from ekipl_jax.train import loop, policy, rl_stages, sft, validate
from ekipl_jax.train import workdir as workdir_lib

T = TypeVar("T")


def corpus(builder, cfg, n: int = 500) -> list[str]:
  """Text a from-scratch tokenizer is trained on: problems and SFT targets of the first n training examples."""
  src = data_lib.source(builder, cfg.data.train_split)
  out = []
  for ex in data_lib.first(src, n):
    out += [ex["problem"], processor_lib.sft_target(ex["cot"], ex["answer"])]
  return out


def rules_from_config(overrides) -> sharding.Rules:
  """sharding.RULES with the config's (logical axis, mesh axes) pairs replacing those of the same logical axis."""
  over = {str(k): (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in overrides}
  unknown = set(over) - {k for k, _ in sharding.RULES}
  if unknown:
    raise ValueError(f"config key mesh.rules: unknown logical axes {sorted(unknown)}")
  return tuple((k, over.get(k, v)) for k, v in sharding.RULES)


def start_distributed(mcfg) -> None:
  """Multi-host start-up (config mesh.distributed): the config's coordinator / process count / index where given,
  the rest detected by JAX (TPU pod metadata, SLURM, Open MPI, JAX_COORDINATOR_ADDRESS); a no-op on one process."""
  sharding.init_distributed(
      coordinator_address=mcfg.coordinator_address or None,
      num_processes=mcfg.num_processes or None,
      process_id=None if mcfg.process_id < 0 else mcfg.process_id,
  )
  if mcfg.num_processes and jax.process_count() != mcfg.num_processes:
    raise ValueError(f"config key mesh.num_processes: {mcfg.num_processes}, but JAX runs {jax.process_count()}")


def process_0_first(name: str, fn: Callable[[], T]) -> T:
  """fn() on process 0, then on the others: for steps that write files the other processes then only read (TFDS
  preparation, the from-scratch checkpoint), which race on a shared path."""
  out = fn() if jax.process_index() == 0 else None
  loop.barrier(f"process_0_first_{name}")
  return out if jax.process_index() == 0 else fn()


def setup(cfg):
  mesh = sharding.make_mesh(tuple(cfg.mesh.shape))
  rules = rules_from_config(cfg.mesh.rules)
  builder = process_0_first("data", lambda: data_lib.prepare(cfg.data))
  init_from = cfg.model.init_from
  if not init_from:
    if not cfg.model.arch:
      raise ValueError("config keys model.init_from / model.arch: give a checkpoint folder or an architecture")
    init_from = process_0_first(
        "scratch_policy",
        lambda: policy.make_scratch_checkpoint(
            cfg.model, cfg.data, corpus(builder, cfg), os.path.join(cfg.workdir, "init"), cfg.seed
        ),
    )
  model, params, proc = policy.load(cfg.model, cfg.data, init_from, mesh, rules)
  return mesh, builder, init_from, model, params, proc


def make_eval_fn(cfg, model, proc, builder, workdir: str):
  sets = {s: data_lib.first(data_lib.source(builder, s), cfg.eval.num_examples) for s in cfg.data.eval_splits}
  templates = cfg.data.prompt_templates.to_dict() or None

  def eval_fn(state_or_params, step: int) -> dict:
    params = state_or_params.params if isinstance(state_or_params, train_state.TrainState) else state_or_params
    out = {}
    for split, examples in sets.items():
      m, preds = eval_lib.evaluate(
          model,
          params,
          proc,
          examples,
          scorer=eval_lib.scorer_for(cfg.data, split),
          ecfg=cfg.eval,
          prompt_buckets=cfg.data.prompt_buckets,
          templates=templates,
          rng=jax.random.fold_in(jax.random.key(cfg.seed + 1), step),
      )
      out.update({f"eval/{split}/{k}": v for k, v in m.items()})
      if jax.process_index() == 0:
        os.makedirs(os.path.join(workdir, "predictions"), exist_ok=True)
        with open(os.path.join(workdir, "predictions", f"{split}_step{step}.json"), "w") as f:
          json.dump(preds, f, indent=1)
    return out

  return eval_fn


def state_sharding(params, optimizer, mesh) -> train_state.TrainState:
  """Shardings of the train state: the optimizer's moments take their parameters' shardings, every other leaf (step
  counters) is replicated. Left to jit, the moments (zeros, independent of the params) came out replicated."""
  replicated = NamedSharding(mesh, PartitionSpec())
  abstract = jax.eval_shape(lambda p: train_state.init_state(p, optimizer), params)
  params_sharding = jax.tree.map(lambda x: x.sharding, params)
  opt_sharding = optax.tree_map_params(
      optimizer, lambda _, s: s, abstract.opt_state, params_sharding, transform_non_params=lambda _: replicated
  )
  return train_state.TrainState(
      step=replicated, params=params_sharding, opt_state=opt_sharding, skipped_steps=replicated
  )


def init_state(params, optimizer, shardings: train_state.TrainState) -> train_state.TrainState:
  return jax.jit(lambda p: train_state.init_state(p, optimizer), out_shardings=shardings)(params)


def abstract_state(params, optimizer, mesh) -> tuple[train_state.TrainState, train_state.TrainState]:
  """(the train state as ShapeDtypeStructs carrying their shardings, the shardings): what init_state places, with
  nothing allocated. params: arrays or ShapeDtypeStructs with shardings (experiments/aot.py compiles with these)."""
  shardings = state_sharding(params, optimizer, mesh)
  shapes = jax.eval_shape(lambda p: train_state.init_state(p, optimizer), params)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings), shardings


def run_sft(cfg, model, params, proc, builder, mesh):
  src = data_lib.source(builder, cfg.data.train_split)
  n = min(cfg.sft.num_examples, len(src))
  steps = cfg.sft.steps or -(-n // cfg.sft.batch_size)
  optimizer = sft.optimizer_for(cfg.sft, steps)
  shardings = state_sharding(params, optimizer, mesh)
  step = sft.make_sft_step(
      model, optimizer, cfg.model.logprob_chunk, micro_batches=cfg.sft.micro_batches, state_sharding=shardings
  )
  state = init_state(params, optimizer, shardings)
  # Batches are read and prepared ahead of the step in grain's prefetch thread (with its own copy of the processor).
  prepare = functools.partial(sft.make_batch, model, copy.deepcopy(proc), cfg=cfg)
  data = data_lib.StepBatches(data_lib.step_dataset(src, cfg.seed, cfg.sft.batch_size, steps, limit=n, prepare=prepare))

  def step_fn(state, i):
    _, (batch, P) = data.batch_for(i)
    return step(state, train_state.shard_batch(batch, mesh), P)

  eval_fn = make_eval_fn(cfg, model, proc, builder, cfg.workdir) if cfg.data.eval_splits else None
  state, lines = loop.run_loop("sft", cfg, cfg.workdir, state, steps, step_fn, eval_fn, cfg.eval.every, data=data)
  return state.params, lines


def run_rl(cfg, model, params, proc, builder, mesh):
  src = data_lib.source(builder, cfg.data.train_split)
  store = None
  if selection.reads_store(cfg.rl.selection):  # contamination guard: no stored response may be an evaluation example
    eval_ids = {ex["id"] for s in cfg.data.eval_splits for ex in data_lib.first(data_lib.source(builder, s), 0)}
    store = aux_store.open_store(cfg.aux.store, refuse_ids=eval_ids)
    # coverage: every aux.sources source in the store, for at least aux.min_coverage of the training ids
    train_ids = builders.example_ids(builder, cfg.data.train_split)
    log = print if jax.process_index() == 0 else None
    aux_store.check_coverage(store, train_ids, cfg.aux.sources, cfg.aux.min_coverage, log=log)
  optimizer = update.make_optimizer(cfg.rl.optimizer)
  shardings = state_sharding(params, optimizer, mesh)
  # Prompts are read, tokenized and their images processed ahead of the step in grain's prefetch thread (with its
  # own copy of the processor: the evaluation uses `proc` meanwhile).
  prepare = functools.partial(
      processor_lib.prompt_batch,
      copy.deepcopy(proc),
      buckets=cfg.data.prompt_buckets,
      templates=cfg.data.prompt_templates.to_dict() or None,
  )
  train_batches = data_lib.StepBatches(
      data_lib.step_dataset(src, cfg.seed, cfg.rl.batch_prompts, cfg.rl.steps, prepare=prepare)
  )
  ctx = rl_stages.RLContext(
      cfg=cfg,
      model=model,
      proc=proc,
      train_batches=train_batches,
      store=store,
      mesh=mesh,
      train_step=rl_stages.build_step(model, cfg, optimizer, shardings),
      ref_params=params if cfg.rl.beta != 0 else None,
  )
  # The reference keeps its own copy (the train state's params are donated to the update step), sharded like the
  # policy and its matrices in the compute dtype: the same reference log-probs with half the bytes under bf16.
  if ctx.ref_params is not None:
    ctx.ref_params = models.frozen_copy(params, policy.DTYPES[cfg.model.compute_dtype])
  state = init_state(params, optimizer, shardings)
  eval_fn = make_eval_fn(cfg, model, proc, builder, cfg.workdir) if cfg.data.eval_splits else None
  last_group = {"group_of_first_prompt": ""}  # the latest step's first group, logged as text at evaluation steps

  def step_fn(s, i):
    s, metrics, last_group["group_of_first_prompt"] = rl_stages.rl_step(ctx, s, i)
    return s, metrics

  state, lines = loop.run_loop(
      "rl",
      cfg,
      cfg.workdir,
      state,
      cfg.rl.steps,
      step_fn,
      eval_fn,
      cfg.eval.every,
      text_fn=lambda: dict(last_group),
      data=train_batches,
  )
  return state.params, lines


def run(cfg) -> dict:
  """Runs the stage; returns {"hf": folder of the trained policy, "metrics": metric lines}. Before anything is
  loaded: the config is validated (validate.py), the workdir locked (process 0; a second run there is refused) and
  its config.json compared with cfg (a resume with another config is refused unless cfg.resume_changed)."""
  validate.config(cfg)
  if cfg.stage == "rl" and selection.reads_store(cfg.rl.selection) and not cfg.aux.store:
    raise ValueError(f"config key aux.store: selection {cfg.rl.selection!r} needs an auxiliary trajectory store")
  if cfg.mesh.distributed:
    start_distributed(cfg.mesh)
  validate.mesh(cfg, jax.device_count())
  with contextlib.ExitStack() as held:
    if jax.process_index() == 0:
      held.enter_context(workdir_lib.lock(cfg.workdir))
    changed = workdir_lib.check_config(cfg.workdir, cfg)  # every process reads it, so every process refuses alike
    loop.barrier("config_checked")  # before process 0 replaces the file
    if jax.process_index() == 0:
      workdir_lib.write_config(cfg.workdir, cfg, keep_old=bool(changed))
    return _run_stage(cfg)


def _run_stage(cfg) -> dict:
  mesh, builder, init_from, model, params, proc = setup(cfg)
  if cfg.stage == "eval":
    metrics = make_eval_fn(cfg, model, proc, builder, cfg.workdir)(params, 0)
    print(json.dumps(metrics, indent=1))
    return {"hf": init_from, "metrics": [metrics]}
  if cfg.stage == "sft":
    params, lines = run_sft(cfg, model, params, proc, builder, mesh)
  else:
    params, lines = run_rl(cfg, model, params, proc, builder, mesh)
  out_dir = os.path.join(cfg.workdir, "hf")
  params = jax.tree.map(sharding.to_host, params)  # an all-gather every process joins, when fsdp spans processes
  if jax.process_index() == 0:
    models.save_pretrained(model, params, out_dir, processor_dir=init_from)
  loop.barrier("hf_export")  # the folder is complete on every process's return
  return {"hf": out_dir, "metrics": lines}
