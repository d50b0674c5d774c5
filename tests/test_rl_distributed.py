"""Two real processes (4 CPU devices each, gloo collectives, one global 8-device mesh) give the same loss and
parameters as one device. The test spawns this file twice as a script."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _cfg():
  from test_rl_update import rl_cfg

  return rl_cfg(mu=2, micro_batches=2, external_treatment="importance", aggregation="token_mean")


def _worker(rank: int, port: int, out: str) -> None:
  import jax

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=rank)
  from test_rl_update import _opt_cfg, run_steps, toy_batch
  from ekipl_jax import sharding
  from ekipl_jax.rl import update

  assert jax.device_count() == 8 and jax.local_device_count() == 4
  mesh = sharding.make_mesh((2, 4, 1))
  params, metrics, _ = run_steps(
      _cfg(), toy_batch(7), n_steps=2, optimizer=update.make_optimizer(_opt_cfg()), mesh=mesh
  )
  if rank == 0:
    np.savez(out, loss=np.array([m["loss"] for m in metrics]), **params)
  jax.distributed.shutdown()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_device(tmp_path):
  from test_rl_update import _opt_cfg, run_steps, toy_batch
  from ekipl_jax.rl import update

  port, out = _free_port(), str(tmp_path / "rank0.npz")
  env = dict(
      os.environ,
      XLA_FLAGS="--xla_force_host_platform_device_count=4",
      JAX_PLATFORMS="cpu",
      PYTHONPATH=os.pathsep.join([ROOT, HERE, os.environ.get("PYTHONPATH", "")]),
  )
  procs = [
      subprocess.Popen(
          [sys.executable, __file__, str(r), str(port), out],
          env=env,
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
          text=True,
      )
      for r in range(2)
  ]
  logs = []
  for p in procs:
    try:
      logs.append(p.communicate(timeout=240)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-4000:]
  params, metrics, _ = run_steps(_cfg(), toy_batch(7), n_steps=2, optimizer=update.make_optimizer(_opt_cfg()))
  got = np.load(out)
  np.testing.assert_allclose(got["loss"], [m["loss"] for m in metrics], rtol=1e-6, atol=1e-6)
  for k, v in params.items():
    np.testing.assert_allclose(got[k], v, rtol=1e-6, atol=1e-6)


if __name__ == "__main__":
  _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
