"""`experiments/train.py` -> `run(config)`: set up the mesh, data and policy, then run the config's stage.

  sft:  CoT-SFT on the first `sft.num_examples` training examples; writes workdir/hf (an HF folder)
  rl:   GRPO / EKIPL (config.rl.selection) from model.init_from; writes workdir/hf and eval results
  eval: evaluate model.init_from on data.eval_splits
"""
from __future__ import annotations

import json
import os

import jax

from ekipl_jax import models, sharding
from ekipl_jax.data import processor as processor_lib
from ekipl_jax.rl import update
from ekipl_jax.sampling import aux_store
from ekipl_jax.train import data as data_lib
from ekipl_jax.train import evaluate as eval_lib
from ekipl_jax.train import loop, policy, rl, sft


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


def setup(cfg):
  if cfg.mesh.distributed:  # TPU pods / SLURM / explicit JAX_COORDINATOR_ADDRESS: jax detects the cluster itself
    jax.distributed.initialize()
  mesh = sharding.make_mesh(tuple(cfg.mesh.shape))
  rules = rules_from_config(cfg.mesh.rules)
  builder = data_lib.prepare(cfg.data)
  init_from = cfg.model.init_from
  if not init_from:
    if not cfg.model.arch:
      raise ValueError("config keys model.init_from / model.arch: give a checkpoint folder or an architecture")
    init_from = policy.make_scratch_checkpoint(cfg.model, cfg.data, corpus(builder, cfg),
                                               os.path.join(cfg.workdir, "init"), cfg.seed)
  model, params, proc = policy.load(cfg.model, cfg.data, init_from, mesh, rules)
  return mesh, builder, init_from, model, params, proc


def make_eval_fn(cfg, model, proc, builder, workdir: str):
  sets = rl.eval_examples(cfg, builder, cfg.data.eval_splits)
  templates = cfg.data.prompt_templates.to_dict() or None

  def eval_fn(state_or_params, step: int) -> dict:
    params = state_or_params.params if isinstance(state_or_params, update.TrainState) else state_or_params
    out = {}
    for split, examples in sets.items():
      m, preds = eval_lib.evaluate(model, params, proc, examples, scorer=eval_lib.scorer_for(cfg.data, split),
                                   ecfg=cfg.eval, prompt_buckets=cfg.data.prompt_buckets, templates=templates,
                                   rng=jax.random.fold_in(jax.random.key(cfg.seed + 1), step))
      out.update({f"eval/{split}/{k}": v for k, v in m.items()})
      if jax.process_index() == 0:
        os.makedirs(os.path.join(workdir, "predictions"), exist_ok=True)
        with open(os.path.join(workdir, "predictions", f"{split}_step{step}.json"), "w") as f:
          json.dump(preds, f, indent=1)
    return out
  return eval_fn


def init_state(params, optimizer) -> update.TrainState:
  """The train state on the params' devices: optimizer moments take their params' shardings (jit propagation) and
  the counters are replicated over the mesh."""
  return jax.jit(lambda p: update.init_state(p, optimizer))(params)


def run_sft(cfg, model, params, proc, builder, mesh):
  src = data_lib.source(builder, cfg.data.train_split)
  n = min(cfg.sft.num_examples, len(src))
  steps = cfg.sft.steps or -(-n // cfg.sft.batch_size)
  optimizer = sft.optimizer_for(cfg.sft, steps)
  step = sft.make_sft_step(model, optimizer, cfg.model.logprob_chunk)
  state = init_state(params, optimizer)

  def step_fn(state, i):
    examples = data_lib.read(src, data_lib.indices_for_step(len(src), cfg.seed, i, cfg.sft.batch_size, limit=n))
    batch, P = sft.make_batch(model, proc, examples, cfg)
    return step(state, update.shard_batch(batch, mesh), P)

  eval_fn = make_eval_fn(cfg, model, proc, builder, cfg.workdir) if cfg.data.eval_splits else None
  state, lines = loop.run_loop("sft", cfg, cfg.workdir, state, steps, step_fn, eval_fn, cfg.eval.every)
  return state.params, lines


def run_rl(cfg, model, params, proc, builder, mesh):
  src = data_lib.source(builder, cfg.data.train_split)
  store = None
  if cfg.rl.selection != "none":  # contamination guard: no stored response may belong to an evaluation example
    eval_ids = {ex["id"] for s in cfg.data.eval_splits for ex in data_lib.first(data_lib.source(builder, s), 0)}
    store = aux_store.open_store(cfg.aux.store, refuse_ids=eval_ids)
  optimizer = update.make_optimizer(cfg.rl.optimizer)
  ctx = rl.RLContext(cfg=cfg, model=model, proc=proc, train_src=src, store=store, mesh=mesh,
                     train_step=rl.build_step(model, cfg, optimizer),
                     ref_params=params if cfg.rl.beta != 0 else None)
  # The reference keeps its own copy: the train state's params are donated to the update step.
  if ctx.ref_params is not None:
    ctx.ref_params = jax.tree.map(lambda x: x.copy(), params)
  state = init_state(params, optimizer)
  eval_fn = make_eval_fn(cfg, model, proc, builder, cfg.workdir) if cfg.data.eval_splits else None
  state, lines = loop.run_loop("rl", cfg, cfg.workdir, state, cfg.rl.steps,
                               lambda s, i: rl.rl_step(ctx, s, i), eval_fn, cfg.eval.every,
                               text_fn=lambda: {"group_of_first_prompt": ctx.last_group_text})
  return state.params, lines


def run(cfg) -> dict:
  """Runs the stage; returns {"hf": folder of the trained policy, "metrics": metric lines}."""
  if cfg.stage not in ("sft", "rl", "eval"):
    raise ValueError(f"config key stage: unknown stage {cfg.stage!r} (sft | rl | eval)")
  if cfg.stage == "rl" and cfg.rl.selection != "none" and not cfg.aux.store:
    raise ValueError(f"config key aux.store: selection {cfg.rl.selection!r} needs an auxiliary trajectory store")
  os.makedirs(cfg.workdir, exist_ok=True)
  with open(os.path.join(cfg.workdir, "config.json"), "w") as f:
    f.write(cfg.to_json(indent=1))
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
  if jax.process_index() == 0:
    models.save_pretrained(model, params, out_dir, processor_dir=init_from)
  return {"hf": out_dir, "metrics": lines}
