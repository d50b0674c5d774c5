"""The part every stage shares: resume from the latest checkpoint, step, log, evaluate, checkpoint, fail on purpose.

A stage supplies `step_fn(state, step) -> (state, metrics)` and `eval_fn(state, step) -> metrics`. Everything random
inside them derives from (seed, step), and the stage's data iterator (`data`, train/input_pipeline.py) is at the
step, so the checkpointed state, step and iterator state are the whole run: a killed run restarted with the same
command continues exactly where the checkpoint left it.
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Callable

import jax
import orbax.checkpoint as ocp
from tqdm import tqdm

from ekipl_jax.train import state_checkpoint as checkpoint_lib
from ekipl_jax.train import metrics as metrics_lib


class InjectedFailure(RuntimeError):
  """Raised at config.fail_at_step to test that a killed run resumes exactly."""


class NonFiniteUpdates(RuntimeError):
  """config.max_consecutive_skips steps in a row skipped their update (loss or gradient not finite)."""


_BARRIER_COUNT = itertools.count()  # every process passes the same barriers in the same order: same keys


def barrier(name: str, timeout_s: int = 2 * 3600) -> None:
  """Every process waits here for the others (no-op on one process). The coordination service's barrier: a device
  collective would do on TPU, but on CPU gloo gives up after 30 s (process 0 may prepare a dataset for longer)."""
  if jax.process_count() > 1:
    ocp.multihost.get_barrier_sync_fn()(key=f"{name}_{next(_BARRIER_COUNT)}", timeout_ms=timeout_s * 1000)


def run_loop(
    name: str,
    cfg,
    workdir: str,
    state,
    total_steps: int,
    step_fn: Callable,
    eval_fn: Callable | None,
    eval_every: int,
    text_fn: Callable[[], dict[str, str]] | None = None,
    data=None,
) -> tuple[object, list[dict]]:
  """Runs steps [restored step, total_steps); returns the final state and this stage's metric lines.
  text_fn: Markdown texts (e.g. one group's completions) logged at each evaluation step.
  data: the stage's input iterator (input_pipeline.StepBatches); its state is saved in every checkpoint's meta."""
  ckpt = checkpoint_lib.Checkpointer(
      os.path.join(workdir, "checkpoints"), every=cfg.checkpoint.every, keep=cfg.checkpoint.keep
  )
  writer = metrics_lib.MetricWriter(workdir)
  start, skips = 0, 0  # skips: consecutive steps whose update was skipped (non-finite loss or gradient)
  try:
    restored = ckpt.restore_latest(state, barrier)
  except BaseException:
    ckpt.close()  # orbax's background threads otherwise print their shutdown tracebacks
    raise
  if restored is not None:
    state, meta = restored
    start, skips = int(meta["step"]), int(meta.get("consecutive_skips", 0))
    if data is not None:
      data.restore(meta.get("data"), start)
    writer.truncate_after(start)
    print(f"[{name}] resumed from {workdir}/checkpoints at step {start}")
  else:
    dropped = writer.truncate_after(-1)  # lines of an earlier attempt that never reached a checkpoint
    if dropped:
      print(
          f"[{name}] no checkpoint in {workdir}: starting at step 0, dropped {dropped} metric lines of an earlier run"
      )
    if eval_fn is not None and eval_every > 0:
      writer.scalars(0, eval_fn(state, 0))
  try:
    bar = tqdm(
        range(start, total_steps),
        desc=name,
        initial=start,
        total=total_steps,
        dynamic_ncols=True,
        disable=jax.process_index() != 0,
    )
    for step in bar:
      if step == cfg.fail_at_step:
        raise InjectedFailure(f"config.fail_at_step={step}")
      t0 = time.perf_counter()
      state, m = step_fn(state, step)
      m = {**metrics_lib.to_python(m), "time/step_s": time.perf_counter() - t0}
      done = step + 1
      if "tokens" in m:
        m["time/tokens_per_s"] = m["tokens"] / m["time/step_s"]
      if eval_fn is not None and eval_every > 0 and (done % eval_every == 0 or done == total_steps):
        m.update(eval_fn(state, done))
      if done % cfg.log_every == 0 or done == total_steps:
        writer.scalars(done, m)
      if text_fn is not None and (eval_every <= 0 or done % eval_every == 0 or done == total_steps):
        for tag, body in text_fn().items():
          writer.text(done, tag, body)
      skips = skips + 1 if m.get("skipped", 0) > 0 else 0
      if 0 < cfg.max_consecutive_skips <= skips:
        if done % cfg.log_every:  # the diverged step's line is always in metrics.jsonl
          writer.scalars(done, m)
        raise NonFiniteUpdates(
            f"[{name}] step {done}: the last {skips} steps skipped their update because the loss or gradient was not "
            f"finite (loss {m.get('loss')}, grad_norm {m.get('grad_norm')}; config key max_consecutive_skips="
            f"{cfg.max_consecutive_skips}). Usual causes: a learning rate too high, NaN weights in model.init_from, "
            "bad data; the weights are those of the last finite update (checkpoint in workdir/checkpoints)."
        )
      bar.set_postfix(
          {
              k.split("/")[-1]: f"{v:.3g}"
              for k, v in m.items()
              if k in ("loss", "reward/mean", "reward/accuracy", "time/tokens_per_s")
          }
      )
      meta = {"step": done, "consecutive_skips": skips, **({"data": data.get_state()} if data is not None else {})}
      ckpt.save(done, state, meta, force=done == total_steps)
  finally:  # a failing step still leaves the last checkpoint complete on disk
    ckpt.close()
    writer.close()
  barrier(f"{name}_metrics_written")  # process 0 has closed the file every process reads (workdir is shared)
  lines = metrics_lib.read_jsonl(writer.path) if os.path.exists(writer.path) else []
  return state, lines
