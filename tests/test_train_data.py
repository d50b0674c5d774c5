"""The training input pipeline on grain (train/input_pipeline.py): the example order docs/DESIGN.md states, batches
prepared ahead of the step in a background thread, and the iterator state in the checkpoint for exact resume."""

import threading

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ekipl_jax.train import state_checkpoint as checkpoint_lib
from ekipl_jax.train import input_pipeline as data_lib
from ekipl_jax.train import loop


def _pre_grain_indices(n: int, seed: int, step: int, batch: int, limit: int = 0) -> list[int]:
  """The order as train/data.py computed it before grain (indices_for_step), written out again as the reference."""
  n_eff = min(n, limit) if limit > 0 else n
  out = []
  for pos in range(step * batch, (step + 1) * batch):
    perm = np.random.default_rng([seed, pos // n_eff]).permutation(n_eff)
    out.append(int(perm[pos % n_eff]))
  return out


SRC = [{"i": i} for i in range(7)]  # a random-access source: len() and [i], as a TFDS data source


@pytest.mark.parametrize("seed,batch,limit", [(0, 3, 0), (3, 3, 0), (0, 4, 5), (1, 7, 0)])
def test_grain_order_is_the_pre_grain_order(seed, batch, limit):
  steps = 12  # several epochs of 7 (or 5) examples, epochs crossing inside a batch
  ds = data_lib.step_dataset(SRC, seed, batch, steps, limit=limit)
  assert len(ds) == steps
  for s in range(steps):
    examples, prepared = ds[s]
    assert [ex["i"] for ex in examples] == _pre_grain_indices(len(SRC), seed, s, batch, limit), s
    assert prepared is None


def test_batches_are_prepared_ahead_in_a_thread_and_resume_from_state():
  threads = []

  def prepare(examples):
    threads.append(threading.current_thread() is threading.main_thread())
    return sum(ex["i"] for ex in examples)

  ds = data_lib.step_dataset(SRC, 0, 3, 10, prepare=prepare)
  it = data_lib.StepBatches(ds)
  got = [it.batch_for(s) for s in range(4)]
  assert threads and not any(threads)  # every batch was prepared off the main thread (grain's prefetch)
  assert got == [ds[s] for s in range(4)]
  assert it.get_state() == {"next_index": 4}
  with pytest.raises(RuntimeError, match="at step 4, asked for step 6"):
    it.batch_for(6)

  resumed = data_lib.StepBatches(ds)
  resumed.restore({"next_index": 4}, 4)
  assert [resumed.batch_for(s) for s in (4, 5)] == [ds[4], ds[5]]
  fresh = data_lib.StepBatches(ds)
  fresh.restore(None, 2)  # a checkpoint written before the iterator state was saved: its step
  assert fresh.batch_for(2) == ds[2]
  with pytest.raises(ValueError, match="does not continue at its step 3"):
    data_lib.StepBatches(ds).restore({"next_index": 4}, 3)


def _loop_cfg(fail_at: int) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
      dict(
          checkpoint=dict(every=2, keep=2),
          log_every=1,
          fail_at_step=fail_at,
          max_consecutive_skips=0,
      )
  )


def _run(workdir: str, fail_at: int = -1):
  """A state that accumulates, per step, step x (sum of the step's example ids): wrong data after resume shows."""
  data = data_lib.StepBatches(data_lib.step_dataset(SRC, 0, 3, 6, prepare=lambda ex: sum(e["i"] for e in ex)))

  def step_fn(state, i):
    _, total = data.batch_for(i)
    return {"acc": state["acc"] + (i + 1) * total}, {"loss": 0.0}

  state, _ = loop.run_loop("t", _loop_cfg(fail_at), workdir, {"acc": jnp.zeros((1,))}, 6, step_fn, None, 0, data=data)
  return float(state["acc"][0])


def test_kill_and_resume_reads_the_same_batches(tmp_path):
  full = _run(str(tmp_path / "full"))
  expected = sum((s + 1) * sum(_pre_grain_indices(7, 0, s, 3)) for s in range(6))
  assert full == expected
  with pytest.raises(loop.InjectedFailure):
    _run(str(tmp_path / "killed"), fail_at=3)
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "killed" / "checkpoints"), every=2)
  _, meta = ckpt.restore({"acc": jnp.zeros((1,))})
  ckpt.close()
  assert meta["step"] == 2 and meta["data"] == {"next_index": 2}  # the iterator state is in the checkpoint
  assert _run(str(tmp_path / "killed")) == full
