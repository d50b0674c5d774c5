"""The jit update step: optax AdamW, mu inner epochs, exact micro-batch accumulation, non-finite skip.

  train_step = make_train_step(logprob_fn, optimizer, cfg)      # jax.jit(..., donate_argnames=("state",))
  state, metrics = train_step(state, batch)

state: a TrainState (ekipl_jax/train_state.py, shared with SFT). batch: an UpdateBatch (rl/batch.py), whose fields
say what the step reads and when each optional one is needed. logprob_fn(params, inputs) -> (logp_BC, entropy_BC
or None): teacher-forced log-probs of the completion tokens from the policy's row inputs (batch.inputs, sliced per
micro-batch).

Exactness: each micro-batch contributes grad(loss_sum_k); the step divides the sum by sum(denom_k), the big-batch
denominator (loss.py), so k micro-batches give the big-batch loss and gradient up to float summation order.
Micro-batch j holds rows j, j+k, j+2k, ...: with B sharded over devices every micro-batch stays spread over all of
them (no data moves); the assignment of rows to micro-batches does not change the sum.

Non-finite skip: if the loss or any gradient entry is not finite, params and opt_state are left exactly as they
were (so the optimizer's count and the lr schedule do not advance) and state.skipped_steps grows by one.
state.step counts train_step calls (batches consumed) and advances whether or not an update was applied; with
mu > 1 each inner epoch is its own update and is skipped (or not) on its own.

Optional batch.sampler_logp_RC: the sampler's log-probs of the policy rows' tokens; then the metrics hold
sampler_logp_diff (mean |trainer - sampler| over policy tokens) and its max, a health check of the two code paths.

Metrics: loss and grad_norm (global, before clipping) are means over the mu inner epochs (loss_first_epoch is the
loss at pi_old); kl, entropy, clip_low / clip_high (/ clip_dual) are per-token means and rho_{mean,min,max}/{policy,
external} the ratio pi_theta / pi_old by source, all over every epoch; skipped (this call) and skipped_steps (total).
"""

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from ekipl_jax import sharding
from ekipl_jax.rl import loss as rl_loss
from ekipl_jax.rl.batch import UpdateBatch
from ekipl_jax.train_state import TrainState, init_state, shard_batch  # noqa: F401 (the step's state and placement)
from ekipl_jax.train_state import adam_mu_dtype

Array = jax.Array
LogprobFn = Callable[[Any, dict], tuple[Array, Optional[Array]]]


def lr_schedule(ocfg) -> optax.Schedule:
  if ocfg.schedule == "constant":
    if ocfg.warmup_steps > 0:
      return optax.join_schedules(
          [optax.linear_schedule(0.0, ocfg.lr, ocfg.warmup_steps), optax.constant_schedule(ocfg.lr)],
          [ocfg.warmup_steps],
      )
    return optax.constant_schedule(ocfg.lr)
  if ocfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, ocfg.lr, ocfg.warmup_steps, max(ocfg.total_steps, 1), end_value=ocfg.lr * ocfg.final_lr_ratio
    )
  raise ValueError(f"unknown schedule {ocfg.schedule!r}")


def make_optimizer(ocfg) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW with the lr schedule (cfg.optimizer). ocfg.mu_dtype "bfloat16" stores Adam's
  first moment m in bfloat16 (optax casts it after each update; the update itself is computed in float32): half of
  m's bytes, 2 of the 12 bytes per parameter of the float32 train state."""
  adamw = optax.adamw(
      lr_schedule(ocfg),
      b1=ocfg.b1,
      b2=ocfg.b2,
      eps=ocfg.eps,
      weight_decay=ocfg.weight_decay,
      mu_dtype=adam_mu_dtype(ocfg.get("mu_dtype")),
  )
  if ocfg.grad_clip is not None and ocfg.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(ocfg.grad_clip), adamw)
  return adamw


def _split(batch: UpdateBatch, k: int) -> UpdateBatch:
  """[B*n, ...] -> [k, (B/k)*n, ...]; micro-batch j gets rows j, j+k, ... (each row's n entries together)."""
  B = batch.num_rows
  if B % k:
    raise ValueError(f"batch rows {B} not divisible by micro_batches {k}")

  def one(x):
    n = x.shape[0] // B
    y = x.reshape(B // k, k, n, *x.shape[1:]).swapaxes(0, 1)
    return y.reshape(k, (B // k) * n, *x.shape[1:])

  return jax.tree.map(one, batch)


def _init_aux(shapes: dict) -> dict:
  fill = {"sum": 0.0, "min": jnp.inf, "max": -jnp.inf}
  return {k: jnp.full(s.shape, fill[k.split("/", 1)[0]], s.dtype) for k, s in shapes.items()}


def make_train_step(
    logprob_fn: LogprobFn, optimizer: optax.GradientTransformation, cfg, *, state_sharding: Any = None
) -> Callable[[TrainState, UpdateBatch], tuple[TrainState, dict]]:
  """cfg: the rl config (loss fields, mu, micro_batches). state_sharding: optional out-sharding of the state."""
  k, mu = int(cfg.micro_batches), int(cfg.mu)
  param_sh = sharding.params_part(state_sharding)  # gradients and their sum live like params

  def mb_loss(params, mb: UpdateBatch, old_logp_BC: Optional[Array]):
    logp_BC, ent_BC = logprob_fn(params, mb.inputs)
    old = logp_BC if old_logp_BC is None else old_logp_BC  # mu == 1: pi_old == pi_theta numerically, rho == 1
    loss_sum, denom, aux = rl_loss.grpo_loss(logp_BC, old, mb, cfg, entropy_BC=ent_BC)
    if mb.sampler_logp_RC is not None:  # health check (as lmpo logs): sampler vs trainer log-probs of policy tokens
      m_BC = (mb.mask_RC * (1 - mb.is_external_R.astype(mb.mask_RC.dtype))[:, None]).astype(jnp.float32)
      diff_BC = jnp.abs(jax.lax.stop_gradient(logp_BC) - mb.sampler_logp_RC)
      aux = {
          **aux,
          "sum/sampler_diff": jnp.sum(diff_BC * m_BC),
          "sum/sampler_tokens": jnp.sum(m_BC),
          "max/sampler_diff": jnp.max(diff_BC * m_BC),
      }
    return loss_sum, (denom, aux)

  def accumulate(params, mbs: UpdateBatch, old_kBC: Optional[Array]):
    """Sum over micro-batches of (grad loss_sum, loss_sum, denom, aux)."""
    mb0 = jax.tree.map(lambda x: x[0], mbs)
    old0 = None if old_kBC is None else old_kBC[0]
    aux_shapes = jax.eval_shape(mb_loss, params, mb0, old0)[1][1]
    grad_fn = jax.value_and_grad(mb_loss, has_aux=True)

    def body(carry, xs):
      g_acc, ls_acc, d_acc, aux_acc = carry
      mb, old = xs
      (ls, (d, aux)), g = grad_fn(params, mb, old)
      return (sharding.add_grads(g_acc, g, param_sh), ls_acc + ls, d_acc + d, rl_loss.merge_aux(aux_acc, aux)), None

    init = (
        sharding.grad_accumulator(params, param_sh),
        jnp.zeros((), jnp.float32),
        jnp.zeros((), jnp.float32),
        _init_aux(aux_shapes),
    )
    (g_sum, ls_sum, d_sum, aux), _ = jax.lax.scan(body, init, (mbs, old_kBC))
    return g_sum, ls_sum, d_sum, aux

  def old_logprobs(params, mbs: UpdateBatch) -> Array:
    def body(_, mb):
      return None, jax.lax.stop_gradient(logprob_fn(params, mb.inputs)[0])

    return jax.lax.scan(body, None, mbs)[1]

  def epoch(carry, _, mbs, old_kBC):
    params, opt_state, skipped = carry
    g_sum, ls_sum, d_sum, aux = accumulate(params, mbs, old_kBC)
    grads32 = jax.tree.map(lambda g: g / d_sum, g_sum)
    loss = ls_sum / d_sum
    grad_norm = optax.global_norm(grads32)  # before clipping, in float32
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads32, params)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    safe = jax.tree.map(lambda g: jnp.where(ok, g, jnp.zeros_like(g)), grads)
    updates, new_opt = optimizer.update(safe, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    carry = (keep(new_params, params), keep(new_opt, opt_state), skipped + (~ok).astype(jnp.int32))
    return carry, (loss, grad_norm, d_sum, aux)

  def train_step(state: TrainState, batch: UpdateBatch) -> tuple[TrainState, dict]:
    mbs = _split(batch, k)
    if batch.old_logp_RC is not None:
      old_kBC, mbs = mbs.old_logp_RC, mbs.replace(old_logp_RC=None)
    elif mu > 1:
      old_kBC = old_logprobs(state.params, mbs)  # pi_old fixed before the first inner update
    else:
      old_kBC = None
    carry = (state.params, state.opt_state, jnp.zeros((), jnp.int32))
    (params, opt_state, skipped), (loss_E, gnorm_E, denom_E, aux_E) = jax.lax.scan(
        lambda c, x: epoch(c, x, mbs, old_kBC), carry, None, length=mu
    )
    red = {"sum": jnp.sum, "min": jnp.min, "max": jnp.max}
    aux = {key: red[key.split("/", 1)[0]](v, axis=0) for key, v in aux_E.items()}
    state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state, skipped_steps=state.skipped_steps + skipped
    )
    metrics = {
        "loss": loss_E.mean(),
        "loss_first_epoch": loss_E[0],
        "grad_norm": gnorm_E.mean(),
        "denom": denom_E[0],
        "skipped": skipped,
        "skipped_steps": state.skipped_steps,
        **rl_loss.finalize_aux(aux),
    }
    return state, metrics

  out_shardings = None if state_sharding is None else (state_sharding, None)
  return jax.jit(train_step, donate_argnames=("state",), out_shardings=out_shardings)
