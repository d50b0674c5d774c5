"""CoT-SFT warm start (Reason-RFT stage 1): cross-entropy on the completion tokens
"<think>\\n{cot}\\n</think>\\n<answer>\\n{answer}\\n</answer><|im_end|>" after the prompt.

    L(theta) = - sum_{r,t} m_rt log pi_theta(y_rt | x_r, y_r,<t) / sum_{r,t} m_rt

Non-finite skip, as the RL update step (rl/update.py): when the loss or the gradient norm is not finite, params and
optimizer state stay exactly as they were (the lr schedule does not advance), state.skipped_steps grows by one and
the step's metrics say skipped=1; the loop stops the run after config.max_consecutive_skips such steps in a row.

Micro-batching (sft.micro_batches = k): the R rows are split into k micro-batches (micro-batch j holds rows j, j+k,
..., as rl/update.py splits them, so each stays spread over the batch devices) and a lax.scan sums each one's
gradient of its token-loss sum and its token count; the step divides by the whole batch's count, so the loss and
gradient are the big batch's up to float summation order, while only R / k rows' activations are live at a time.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from ekipl_jax import sharding
from ekipl_jax.data import processor as processor_lib
from ekipl_jax.models import packed
from ekipl_jax.train import batching
from ekipl_jax.train_state import TrainState, adam_mu_dtype


def split_rows(batch: dict, k: int) -> dict:
  """[R * n, ...] -> [k, (R / k) * n, ...] for every array of a rows batch (n = entries per row); micro-batch j gets
  rows j, j + k, ... (rl/update.py's assignment)."""
  R = batch["input_ids"].shape[0]
  if R % k:
    raise ValueError(f"config key sft.micro_batches: {k} does not divide the batch's {R} rows")

  def one(x):
    n = x.shape[0] // R
    return x.reshape(R // k, k, n, *x.shape[1:]).swapaxes(0, 1).reshape(k, (R // k) * n, *x.shape[1:])

  return jax.tree.map(one, batch)


def make_sft_step(
    model,
    optimizer: optax.GradientTransformation,
    chunk_size: int,
    *,
    micro_batches: int = 1,
    state_sharding: Any = None,
):
  """micro_batches: exact gradient accumulation over this many micro-batches (module doc). state_sharding: the
  state's out-sharding (else XLA picks one, which the next call compiles for again)."""
  k = int(micro_batches)
  param_sh = sharding.params_part(state_sharding)  # gradients and their sum live like params

  def loss_sum(params, batch, P):
    logp_RC, _ = packed.row_logprobs(model, params, batch, targets_from=P, chunk_size=chunk_size)
    m_RC = batch["mask"].astype(jnp.float32)
    return -jnp.sum(logp_RC * m_RC), jnp.sum(m_RC)

  def grads_and_loss(params, batch, P):
    """(loss, grads) of the whole batch: sums over micro-batches, divided by the batch's token count."""
    grad_fn = jax.value_and_grad(loss_sum, has_aux=True)
    if k == 1:
      (ls, count), g = grad_fn(params, batch, P)
      g = sharding.constrain_like(g, param_sh)
    else:

      def body(carry, mb):
        g_acc, ls_acc, n_acc = carry
        (ls, n), g = grad_fn(params, mb, P)
        return (sharding.add_grads(g_acc, g, param_sh), ls_acc + ls, n_acc + n), None

      init = (sharding.grad_accumulator(params, param_sh), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
      (g, ls, count), _ = jax.lax.scan(body, init, split_rows(batch, k))
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda x, p: (x / denom).astype(p.dtype), g, params)
    return ls / denom, grads

  def step(state: TrainState, batch: dict, P: int):
    loss, grads = grads_and_loss(state.params, batch, P)
    grad_norm = optax.global_norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    safe = jax.tree.map(lambda g: jnp.where(ok, g, jnp.zeros_like(g)), grads)
    updates, opt_state = optimizer.update(safe, state.opt_state, state.params)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    skipped = (~ok).astype(jnp.int32)
    state = state.replace(
        step=state.step + 1,
        params=keep(optax.apply_updates(state.params, updates), state.params),
        opt_state=keep(opt_state, state.opt_state),
        skipped_steps=state.skipped_steps + skipped,
    )
    metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": jnp.sum(batch["mask"])}
    return state, {**metrics, "skipped": skipped, "skipped_steps": state.skipped_steps}

  out_shardings = None if state_sharding is None else (state_sharding, None)
  return jax.jit(step, donate_argnames=("state",), static_argnames=("P",), out_shardings=out_shardings)


def make_batch(model, proc, examples, cfg) -> tuple[dict, int]:
  b = processor_lib.sft_batch(
      proc, examples, cfg.data.prompt_buckets, (cfg.sft.max_completion,), cfg.data.prompt_templates.to_dict() or None
  )
  P = int(b["prompt_length"])
  return (
      batching.rows_batch(
          model,
          b["input_ids"][:, :P],
          b["attention_mask"][:, :P],
          b["input_ids"][:, P:],
          b["loss_mask"][:, P:],
          b["pixel_values"],
          b["image_grid_thw"],
          [len(ex["images"]) for ex in examples],
      ),
      P,
  )


def optimizer_for(scfg, total_steps: int) -> optax.GradientTransformation:
  """AdamW, linear warm-up then cosine decay, global-norm clipping (Reason-RFT SFT: lr 1e-5, 100 warm-up, wd 0.1);
  scfg.mu_dtype as rl.optimizer.mu_dtype (rl/update.py)."""
  sched = optax.warmup_cosine_decay_schedule(0.0, scfg.lr, min(scfg.warmup_steps, total_steps - 1), max(total_steps, 1))
  adamw = optax.adamw(sched, weight_decay=scfg.weight_decay, mu_dtype=adam_mu_dtype(scfg.get("mu_dtype")))
  return optax.chain(optax.clip_by_global_norm(scfg.grad_clip), adamw)
