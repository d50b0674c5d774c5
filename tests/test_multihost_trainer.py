"""The trainer on two real processes against one: `experiments/train.py` launched twice on 127.0.0.1 with the config's
mesh.coordinator_address / num_processes / process_id (4 CPU devices each, gloo collectives, one global (1, 4, 2)
mesh whose fsdp axis spans both processes), and `trainer.run` in this process (8 devices, the same mesh).

SFT, then EKIPL RL (aux store, reference policy, evaluation) killed after a checkpoint and resumed by two new
processes, must give the metrics and parameters of the one-process run that was never killed. The tolerance
(TOL) allows float32 summation order only: the two-process all-reduces add partial sums in another order than one
process does (observed: loss 8e-8 relative, weights 3e-8 absolute); a dropped row, a process training on other data
or a wrong gather moves them by far more, and the discrete outputs (sampled tokens, rewards, eval accuracy) must
agree exactly for the sums to agree at all. Each worker records the files it writes (Python audit events) and the
metric lines trainer.run returned to it.
"""

import atexit
import json
import os
import re
import runpy
import socket
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TRAIN = os.path.join(ROOT, "experiments", "train.py")
TOL = 1e-5


def get_config(root: str):
  """`experiments/train.py --config tests/test_multihost_trainer.py:ROOT`: the tiny config of tests/test_trainer.py
  on a (1, 4, 2) mesh with batches that divide it: 4 SFT rows, 2 prompts x G=4 RL rows, 4 eval prompts."""
  from test_trainer import tiny_config

  c = tiny_config(root)
  c.mesh.shape = (1, 4, 2)
  c.data.prompt_buckets = (256,)
  c.sft.steps, c.sft.batch_size = 2, 4
  c.rl.steps, c.rl.batch_prompts, c.rl.group_size, c.rl.num_policy_samples = 3, 2, 4, 4
  c.rl.sampling.max_new_tokens = 16  # the stored external responses (13 tokens) fit: they earn rewards
  c.rl.beta = 0.04
  c.data.eval_splits = ("test_id",)
  c.eval.every, c.eval.num_examples, c.eval.batch_size = 2, 4, 4
  return c


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(root: str, tag: str, overrides: list[str], timeout: int = 240) -> list[subprocess.CompletedProcess]:
  """experiments/train.py in two processes; returns both (each leaves root/record_{tag}_{rank}.json, see _worker)."""
  port = _free_port()
  env = dict(
      os.environ,
      XLA_FLAGS="--xla_force_host_platform_device_count=4",
      JAX_PLATFORMS="cpu",
      PYTHONPATH=os.pathsep.join([ROOT, HERE, os.environ.get("PYTHONPATH", "")]),
      # A later launch loads what an earlier one compiled (process 0 writes the cache, every process reads).
      JAX_COMPILATION_CACHE_DIR=f"{root}_jax_cache",
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
  )
  procs = [
      subprocess.Popen(
          [
              sys.executable,
              __file__,
              os.path.join(root, f"record_{tag}_{r}.json"),
              "--config",
              f"{__file__}:{root}",
              "--config.mesh.distributed=True",
              f"--config.mesh.coordinator_address=127.0.0.1:{port}",
              "--config.mesh.num_processes=2",
              f"--config.mesh.process_id={r}",
              *overrides,
          ],
          env=env,
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
          text=True,
      )
      for r in range(2)
  ]
  try:
    logs = [p.communicate(timeout=timeout)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return [subprocess.CompletedProcess(p.args, p.returncode, log) for p, log in zip(procs, logs)]


def _ok(procs: list[subprocess.CompletedProcess]) -> None:
  assert all(p.returncode == 0 for p in procs), "\n".join(p.stdout[-3000:] for p in procs)


def _record(root: str, tag: str, rank: int) -> dict:
  """What process `rank` of launch `tag` wrote under root (its own record left out) and got back from trainer.run."""
  with open(os.path.join(root, f"record_{tag}_{rank}.json")) as f:
    r = json.load(f)
  r["writes"] = {
      os.path.relpath(p, root)
      for p in r["writes"]
      if p.startswith(root + os.sep) and not os.path.basename(p).startswith("record_")
  }
  return r


def _only_checkpoints(paths: set[str], workdir: str) -> bool:
  return all(p.startswith(os.path.join(workdir, "checkpoints") + os.sep) for p in paths)


def _same(a: list[dict], b: list[dict], rel: float):
  assert [l["step"] for l in a] == [l["step"] for l in b]
  for la, lb in zip(a, b):
    keys = set(la) - {"time/step_s", "time/tokens_per_s"}
    assert keys == set(lb) - {"time/step_s", "time/tokens_per_s"}
    for k in keys:
      assert la[k] == pytest.approx(lb[k], rel=rel, abs=rel), (la["step"], k)


def _weights(folder: str) -> dict:
  from safetensors.numpy import load_file

  return load_file(os.path.join(folder, "model.safetensors"))


def _same_weights(a: str, b: str, rel: float):
  wa, wb = _weights(a), _weights(b)
  assert set(wa) == set(wb)
  for k in wa:
    np.testing.assert_allclose(wa[k], wb[k], rtol=rel, atol=rel, err_msg=k)


def _write_aux_store(cfg, path: str) -> None:
  """External responses for every training id: the scripted solver's answer with an empty chain of thought (short
  enough not to be cut, so they earn accuracy and format rewards and the advantages are not all zero)."""
  from test_trainer import _scene
  from ekipl_jax.data import synthetic
  from ekipl_jax.data import aux_store
  from ekipl_jax.train import input_pipeline as data_lib

  builder = data_lib.prepare(cfg.data)
  with aux_store.AuxStoreWriter(path) as w:
    for ex in data_lib.first(data_lib.source(builder, cfg.data.train_split), 0):
      _, ans = synthetic.solve(*_scene(ex))
      w.append(aux_store.AuxResponse(id=ex["id"], source="solver_strong", text=synthetic.format_response("", ans)))


@pytest.mark.slow
def test_two_processes_match_one_process_and_resume(tmp_path):
  import jax
  import optax
  from ekipl_jax.rl import update
  from ekipl_jax.train import metrics as metrics_lib
  from ekipl_jax.train import trainer

  root = str(tmp_path)
  cfg = get_config(root)
  read = lambda workdir: metrics_lib.read_jsonl(os.path.join(root, workdir, "metrics.jsonl"))

  # SFT on two processes; they prepare the TFDS dataset and the from-scratch policy in the same folders. The export
  # at the end all-gathers parameters that fsdp splits over both processes (it deadlocked on process 0 alone).
  sft2 = _launch(root, "sft", ["--config.stage=sft", f"--config.workdir={root}/sft2"])
  _ok(sft2)
  assert re.search(r"sft: +100%", sft2[0].stdout) and not re.search(r"(sft|rl): +\d+%", sft2[1].stdout)
  # One process with mesh.distributed set and no cluster around: runs alone (jax.distributed.initialize() raised).
  cfg.stage, cfg.workdir, cfg.mesh.distributed = "sft", os.path.join(root, "sft1"), True
  sft1 = trainer.run(cfg)
  assert jax.process_count() == 1
  _same(read("sft2"), sft1["metrics"], rel=TOL)
  _same_weights(os.path.join(root, "sft2", "hf"), sft1["hf"], rel=TOL)

  # EKIPL from the 2-process SFT policy on two processes, killed after the checkpoint of step 2 and resumed by two
  # new processes; against one process that was never killed.
  _write_aux_store(cfg, os.path.join(root, "aux"))
  rl = [
      "--config.stage=rl",
      f"--config.workdir={root}/rl2",
      f"--config.model.init_from={root}/sft2/hf",
      f"--config.aux.store={root}/aux",
      "--config.aux.sources=('solver_strong',)",
  ]
  killed = _launch(root, "rl_killed", rl + ["--config.fail_at_step=2"])
  assert all(p.returncode != 0 and "InjectedFailure" in p.stdout for p in killed), killed[0].stdout[-3000:]
  resumed = _launch(root, "rl_resumed", rl)
  _ok(resumed)
  assert all(f"[rl] resumed from {root}/rl2/checkpoints at step 2" in p.stdout for p in resumed)
  cfg.stage, cfg.workdir, cfg.model.init_from = "rl", os.path.join(root, "rl1"), os.path.join(root, "sft2", "hf")
  cfg.aux.store, cfg.aux.sources = os.path.join(root, "aux"), ("solver_strong",)
  rl1 = trainer.run(cfg)
  _same(read("rl2"), rl1["metrics"], rel=TOL)
  _same_weights(os.path.join(root, "rl2", "hf"), rl1["hf"], rel=TOL)
  # Evaluations at steps 0, 2, 3; the external rows earned rewards, so the gradients were not zero.
  assert [l["step"] for l in rl1["metrics"]] == [0, 1, 2, 3]
  assert all("eval/test_id/accuracy" in l for l in rl1["metrics"] if l["step"] in (0, 2, 3))
  assert all(
      l["groups/external_rows"] == 2.0 and l["pool/reward_mean/external"] > 0 and l["grad_norm"] > 0.1
      for l in rl1["metrics"]
      if l["step"] > 0
  )

  # Every process got the whole metric history back (read after process 0 closed the file).
  for tag, workdir in (("sft", "sft2"), ("rl_resumed", "rl2")):
    assert _record(root, tag, 1)["metrics"] == _record(root, tag, 0)["metrics"] == read(workdir)
  # Only process 0 writes outside the checkpoints: config, metrics, TensorBoard, predictions, samples, the dataset,
  # the from-scratch policy and the HF export; process 1 reads what process 0 prepared.
  for tag, workdir in (("sft", "sft2"), ("rl_killed", "rl2"), ("rl_resumed", "rl2")):
    w0, w1 = _record(root, tag, 0)["writes"], _record(root, tag, 1)["writes"]
    assert _only_checkpoints(w1, workdir), sorted(w1)
    assert {os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "config.json")} <= w0
  w0 = _record(root, "sft", 0)["writes"]
  assert {os.path.join("sft2", "hf", "model.safetensors"), os.path.join("sft2", "init", "config.json")} <= w0
  assert any(p.startswith("tfds" + os.sep) for p in w0)

  # The optimizer moments are sharded like their parameters (not replicated over the mesh).
  mesh, _, _, _, params, _ = trainer.setup(cfg)
  optimizer = update.make_optimizer(cfg.rl.optimizer)
  state = trainer.init_state(params, optimizer, trainer.state_sharding(params, optimizer, mesh))
  same = optax.tree_map_params(
      optimizer,
      lambda m, p: m.sharding == p.sharding,
      state.opt_state,
      state.params,
      transform_non_params=lambda _: True,
  )
  sharded = optax.tree_map_params(
      optimizer,
      lambda m, p: not m.is_fully_replicated,
      state.opt_state,
      state.params,
      transform_non_params=lambda _: False,
  )
  assert all(jax.tree.leaves(same)) and sum(jax.tree.leaves(sharded)) > 0


def _worker(record_path: str) -> None:
  """Runs experiments/train.py as __main__ and leaves in record_path the files this process opened for writing,
  created, renamed, removed or copied to (Python audit events) and the metric lines trainer.run returned to it."""
  from ekipl_jax.train import trainer

  record = {"writes": [], "metrics": None}
  path_arg = {"open": 0, "os.mkdir": 0, "os.rename": 1, "os.remove": 0, "shutil.copyfile": 1}

  def hook(event, args):
    if event not in path_arg or not isinstance(args[path_arg[event]], (str, bytes, os.PathLike)):
      return
    if event == "open" and not (
        any(m in str(args[1] or "") for m in "wax+") or (args[2] or 0) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
    ):
      return
    record["writes"].append(os.path.abspath(os.fsdecode(args[path_arg[event]])))

  def run(cfg):
    out = run_stage(cfg)
    record["metrics"] = out["metrics"]
    return out

  def dump():
    with open(record_path, "w") as f:
      json.dump(record, f)

  run_stage, trainer.run = trainer.run, run
  sys.addaudithook(hook)
  atexit.register(dump)
  sys.argv = [TRAIN] + sys.argv[2:]
  runpy.run_path(TRAIN, run_name="__main__")


if __name__ == "__main__":
  _worker(sys.argv[1])
