"""Fault injection on the data side (issue 12): two writers into one aux store, a killed writer, a store that lacks a
source / ids / an index file, a dead or misbehaving chat endpoint, corrupt Reason-RFT inputs, broken HF folders.
Each trial asserts the clear error (naming the file / id / source / family) or the correct result."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import time

import numpy as np
import pytest

from ekipl_jax.data import aux_sources as A
from ekipl_jax.data import aux_store
from ekipl_jax.data.aux_store import AuxResponse, AuxStore, AuxStoreError, AuxStoreWriter

FORK = multiprocessing.get_context("fork")  # children only write files (no JAX), so fork is safe and fast


def _resp(i: int, source: str, sample: int = 0) -> AuxResponse:
  return AuxResponse(id=f"ex{i}", source=source, sample=sample, text=f"<think>{source} {i}</think><answer>{i}</answer>")


# ---------------------------------------------------------------------------------------------- item 1: writers
def _write_many(root: str, source: str, n: int, start, done) -> None:
  start.wait()
  with AuxStoreWriter(root, sources=[source], records_per_shard=700) as w:
    for i in range(n):
      w.append(_resp(i, source))
  done.set()


def test_two_writer_processes_of_different_sources_lose_nothing(tmp_path):
  """GPT-4o and Gemini precomputed in parallel into one store (the trial that lost 1262 of 40000 ids)."""
  root, n = str(tmp_path / "aux"), 3000
  start = FORK.Event()
  procs = [FORK.Process(target=_write_many, args=(root, s, n, start, FORK.Event())) for s in ("gpt-4o", "gemini")]
  for p in procs:
    p.start()
  start.set()
  for p in procs:
    p.join(120)
    assert p.exitcode == 0
  with AuxStore(root) as store:
    assert store.num_records() == 2 * n and store.sources() == ["gemini", "gpt-4o"]
    for i in range(n):  # every record readable, with its own text
      got = {r.source: r.text for r in store.get(f"ex{i}")}
      assert got == {s: f"<think>{s} {i}</think><answer>{i}</answer>" for s in ("gemini", "gpt-4o")}


def _hold(root: str, source: str, ready, release) -> None:
  with AuxStoreWriter(root, sources=[source]) as w:
    w.append(_resp(0, source))
    ready.set()
    release.wait(60)


def test_second_writer_of_a_source_is_refused_naming_the_holder(tmp_path):
  root = str(tmp_path / "aux")
  ready, release = FORK.Event(), FORK.Event()
  holder = FORK.Process(target=_hold, args=(root, "gpt-4o", ready, release))
  holder.start()
  try:
    assert ready.wait(60)
    with pytest.raises(aux_store.AuxStoreLockedError) as e:
      AuxStoreWriter(root, sources=["gpt-4o"])
    msg = str(e.value)
    assert f"pid {holder.pid}" in msg and socket.gethostname() in msg and "'gpt-4o'" in msg and root in msg
    with AuxStoreWriter(root) as w:  # a writer that names no source up front is refused on its first append
      with pytest.raises(aux_store.AuxStoreLockedError, match=f"pid {holder.pid}"):
        w.append(_resp(1, "gpt-4o"))
      assert w.append(_resp(1, "gemini"))  # another source of the same store: fine meanwhile
    with pytest.raises(aux_store.AuxStoreLockedError, match="'gpt-4o'"):  # the writers of aux_sources lock too
      A.write_from_cot([{"id": "ex5", "cot": "c", "answer": "1", "task": "counting"}], root, "gpt-4o")
  finally:
    release.set()
    holder.join(60)
  with AuxStoreWriter(root, sources=["gpt-4o"]) as w:  # released when the holder ended
    assert not w.append(_resp(0, "gpt-4o")) and w.append(_resp(2, "gpt-4o"))


def test_killed_writer_leaves_no_stale_lock(tmp_path):
  root = str(tmp_path / "aux")
  ready, release = FORK.Event(), FORK.Event()
  holder = FORK.Process(target=_hold, args=(root, "gpt-4o", ready, release))
  holder.start()
  assert ready.wait(60)
  os.kill(holder.pid, signal.SIGKILL)  # kill -9: no cleanup runs
  holder.join(60)
  assert holder.exitcode == -signal.SIGKILL
  assert os.path.exists(os.path.join(aux_store.source_dir(root, "gpt-4o"), aux_store.LOCK))  # the file stays ...
  with AuxStoreWriter(root, sources=["gpt-4o"]) as w:  # ... but the kernel dropped the lock with the process
    assert not w.append(_resp(0, "gpt-4o"))  # what it wrote is kept and resumed
    assert w.append(_resp(1, "gpt-4o"))
  assert AuxStore(root).num_records() == 2


def _hold_and_fork(root: str, ready, flag: str) -> None:
  AuxStoreWriter(root, sources=["gpt-4o"])  # kept open: the lock fd is inherited by the fork below
  if os.fork() == 0:  # a child of the writer (e.g. a data worker) that outlives it, until `flag` exists
    for _ in range(600):
      if os.path.exists(flag):
        break
      time.sleep(0.1)
    os._exit(0)
  ready.set()
  time.sleep(60)


def test_lock_kept_by_a_child_of_a_killed_writer_is_explained(tmp_path):
  root = str(tmp_path / "aux")
  ready, flag = FORK.Event(), str(tmp_path / "child_may_end")
  writer = FORK.Process(target=_hold_and_fork, args=(root, ready, flag))
  writer.start()
  assert ready.wait(60)
  os.kill(writer.pid, signal.SIGKILL)
  writer.join(60)
  with pytest.raises(aux_store.AuxStoreLockedError) as e:
    AuxStoreWriter(root, sources=["gpt-4o"])
  assert f"pid {writer.pid}" in str(e.value) and "no longer running" in str(e.value) and "fuser" in str(e.value), str(
      e.value
  )
  open(flag, "w").close()  # the child ends: the lock is free
  for _ in range(100):
    try:
      AuxStoreWriter(root, sources=["gpt-4o"]).close()
      break
    except aux_store.AuxStoreLockedError:
      time.sleep(0.1)
  else:
    pytest.fail("the lock was not released after the child ended")


def test_version_1_store_is_read_and_resumed(tmp_path):
  """A store written by the previous format (every source in the top-level shards) still reads; a writer keeps
  those records, adds new ones per source and marks the store as version 2 (older code then refuses it clearly)."""
  root = tmp_path / "aux"
  root.mkdir()
  lines, idx = b"", b""
  for i, src in enumerate(["gpt-4o", "gemini", "gpt-4o"]):
    line = json.dumps(_resp(i, src).to_json()).encode()
    idx += f"ex{i}\t{src}\t0\t{len(lines)}\t{len(line)}\n".encode()
    lines += line + b"\n"
  (root / "shard-00000.jsonl").write_bytes(lines)
  (root / "shard-00000.idx").write_bytes(idx)
  (root / "meta.json").write_text(json.dumps({"format": aux_store.FORMAT, "format_version": 1}))
  assert [r.text for r in AuxStore(str(root)).get("ex1")] == ["<think>gemini 1</think><answer>1</answer>"]
  with AuxStoreWriter(str(root), sources=["gpt-4o"]) as w:
    assert [w.append(_resp(i, "gpt-4o")) for i in range(4)] == [False, True, False, True]
  assert json.loads((root / "meta.json").read_text())["format_version"] == 2
  with AuxStore(str(root)) as store:
    assert store.num_records() == 5 and {r.source for r in store.get("ex1")} == {"gemini", "gpt-4o"}


# ---------------------------------------------------------------------------------------------- item 3: coverage
def _store(root: str, per_source: dict[str, range]) -> AuxStore:
  for source, ids in per_source.items():
    with AuxStoreWriter(root, sources=[source]) as w:
      for i in ids:
        w.append(_resp(i, source))
  return AuxStore(root)


def test_coverage_check_refuses_missing_sources_and_ids(tmp_path):
  root = str(tmp_path / "aux")
  store = _store(root, {"gpt-4o": range(10), "gemini": range(0, 10, 2)})
  ids = [f"ex{i}" for i in range(10)]
  logged = []
  assert aux_store.check_coverage(store, ids, ["gpt-4o"], log=logged.append) == {"gpt-4o": 1.0}
  assert logged == [f"aux store {root}: source 'gpt-4o' covers 10 of 10 training ids"]
  with pytest.raises(aux_store.AuxCoverageError) as e:  # a source the store lacks
    aux_store.check_coverage(store, ids, ["gpt-4o", "claude"], log=None)
  assert "'claude'" in str(e.value) and root in str(e.value) and "aux.sources" in str(e.value)
  with pytest.raises(aux_store.AuxCoverageError) as e:  # ids missing from a source
    aux_store.check_coverage(store, ids, ["gpt-4o", "gemini"], log=None)
  msg = str(e.value)
  assert "'gemini'" in msg and "5 of 10" in msg and "50.0%" in msg and "'ex1'" in msg and "aux.min_coverage" in msg
  assert aux_store.check_coverage(store, ids, ["gpt-4o", "gemini"], 0.5, log=None) == {"gpt-4o": 1.0, "gemini": 0.5}
  with pytest.raises(aux_store.AuxCoverageError, match="aux.sources names no source"):
    aux_store.check_coverage(store, ids, [], log=None)
  with pytest.raises(ValueError, match="aux.min_coverage"):
    aux_store.check_coverage(store, ids, ["gpt-4o"], 1.5, log=None)


def test_missing_index_or_data_file_is_an_error_not_an_empty_store(tmp_path):
  root = str(tmp_path / "aux")
  _store(root, {"gpt-4o": range(3)}).close()
  folder = aux_store.source_dir(root, "gpt-4o")
  saved = str(tmp_path / "saved.idx")
  shutil.move(os.path.join(folder, "shard-00000.idx"), saved)
  with pytest.raises(AuxStoreError) as e:
    AuxStore(root)
  assert os.path.join(folder, "shard-00000.idx") in str(e.value) and "missing" in str(e.value)
  with pytest.raises(AuxStoreError, match="shard-00000.idx"):  # the writer refuses it as well
    AuxStoreWriter(root)
  shutil.move(saved, os.path.join(folder, "shard-00000.idx"))
  os.remove(os.path.join(folder, "shard-00000.jsonl"))
  with pytest.raises(AuxStoreError, match="data file missing.*shard-00000.jsonl"):
    AuxStore(root)
  with pytest.raises(AuxStoreError, match="no aux store at"):
    AuxStore(str(tmp_path / "nowhere"))


# ---------------------------------------------------------------------------------------------- item 8: endpoint
@pytest.fixture
def serve(monkeypatch):
  from test_precompute_aux import FakeOpenAI

  monkeypatch.setenv("TEST_OPENAI_KEY", "sk-test-123")
  monkeypatch.setenv("NO_PROXY", "127.0.0.1")
  servers = []
  yield lambda **kw: servers.append(FakeOpenAI(**kw)) or servers[-1]
  for s in servers:
    s.close()


def _ask(tmp_path, base_url: str, n: int, **kw) -> dict:
  from test_precompute_aux import SETTINGS, _questions

  endpoint = A.Endpoint(base_url, "test-model", "TEST_OPENAI_KEY", **{"timeout_s": 2.0, "max_retries": 0, **kw})
  return A.write_from_openai(_questions(n), str(tmp_path / "aux"), "gpt-test", endpoint, **SETTINGS)


def test_dead_endpoint_fails_fast_naming_it(tmp_path, monkeypatch):
  monkeypatch.setenv("TEST_OPENAI_KEY", "sk-test-123")
  monkeypatch.setenv("NO_PROXY", "127.0.0.1")
  with socket.socket() as s:  # a port nobody listens on
    s.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
  with pytest.raises(A.EndpointError) as e:
    _ask(tmp_path, url, 12, concurrency=2, max_failures=3)
  assert url in str(e.value) and "3 consecutive" in str(e.value) and "connection error" in str(e.value)


def test_failing_endpoint_stops_after_max_failures_but_bad_requests_do_not(tmp_path, serve):
  server = serve(default="503")
  with pytest.raises(A.EndpointError, match="HTTP|InternalServerError|503"):
    _ask(tmp_path, server.base_url, 40, concurrency=2, max_failures=4)
  assert 4 <= sum(server.requests.values()) <= 4 + 2 + 2  # stopped early: at most the requests in flight more
  server = serve(default="400")  # a request the server rejects is that request's failure, not the endpoint's
  summary = _ask(tmp_path, server.base_url, 6, concurrency=2, max_failures=2)
  assert summary["failed"] == 6 and all(f["status"] == 400 for f in summary["failures"])


def test_empty_and_length_cut_replies_are_failures_retried_on_rerun(tmp_path, serve, capsys):
  server = serve(script={"q1": ["empty"], "q2": ["length"]})
  summary = _ask(tmp_path, server.base_url, 4, concurrency=2)
  assert (summary["written"], summary["failed"]) == (2, 2)
  errors = {f["id"]: f["error"] for f in summary["failures"]}
  from test_precompute_aux import _questions

  ids = [ex["id"] for ex in _questions(4)]
  assert errors[ids[1]].startswith("empty reply") and errors[ids[2]].startswith("finish_reason 'length'")
  assert "max_tokens=64" in errors[ids[2]]
  with AuxStore(str(tmp_path / "aux")) as store:
    assert ids[1] not in store and ids[2] not in store  # not stored
  assert "done 2, failed 2, skipped 0" in capsys.readouterr().err  # the progress bar's counts
  again = _ask(tmp_path, server.base_url, 4, concurrency=2)  # the rerun asks only for those two, and gets them
  assert (again["written"], again["skipped"], again["failed"]) == (2, 2, 0)
  assert server.requests == {"q0": 1, "q1": 2, "q2": 2, "q3": 1}
  assert "done 2, failed 0, skipped 2" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- item 9: HF folders
@pytest.fixture(scope="module")
def tiny25(tmp_path_factory) -> str:
  """A tiny Qwen2.5-VL policy with random weights saved as an HF folder (shapes from eval_shape: nothing compiles)."""
  import jax

  import hf_fixtures as F
  from ekipl_jax import models
  from ekipl_jax.models import hf_checkpoint as ckpt

  model = ckpt.build(models.QwenVLConfig.from_hf(F.tiny_config_dict("qwen2_5_vl")))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: (0.02 * rng.standard_normal(s.shape)).astype(s.dtype), ckpt.abstract_params(model)[0])
  out = str(tmp_path_factory.mktemp("ckpt") / "tiny25")
  models.save_pretrained(model, params, out)
  return out


def _copy(src: str, dst) -> str:
  shutil.copytree(src, str(dst))
  return str(dst)


def test_invalid_config_json_names_the_file(tiny25, tmp_path):
  from ekipl_jax import models

  path = _copy(tiny25, tmp_path / "bad")
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write('{"model_type": "qwen2_5_vl", ')  # truncated
  with pytest.raises(ValueError) as e:
    models.load_pretrained(path)
  assert os.path.join(path, "config.json") in str(e.value) and "not valid JSON" in str(e.value)
  cfg = json.load(open(os.path.join(tiny25, "config.json")))
  del cfg["text_config"]["hidden_size"]
  json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
  with pytest.raises(ValueError, match=r"config\.json \(model_type 'qwen2_5_vl'\) lacks the field 'hidden_size'"):
    models.load_pretrained(path)


@pytest.mark.parametrize("how", ["model_type only", "whole qwen2_vl config"])
def test_family_mismatch_names_both_families(tiny25, tmp_path, how):
  import hf_fixtures as F
  from ekipl_jax import models

  path = _copy(tiny25, tmp_path / "mismatch")
  cfg = json.load(open(os.path.join(path, "config.json")))
  cfg = {**cfg, "model_type": "qwen2_vl"} if how == "model_type only" else F.tiny_config_dict("qwen2_vl")
  json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
  with pytest.raises(ValueError) as e:
    models.load_pretrained(path)
  msg = str(e.value)
  assert os.path.join(path, "config.json") in msg and "'qwen2_vl'" in msg and "qwen2_5_vl checkpoint" in msg


def test_non_finite_weights_are_refused_at_load_and_export(tiny25, tmp_path):
  import jax

  from ekipl_jax import models
  from ekipl_jax.models import hf_checkpoint as ckpt

  path = _copy(tiny25, tmp_path / "nan")
  tensors = {k: np.array(v()) for k, v in ckpt.open_tensors(path).items()}
  key = "model.layers.1.mlp.down_proj.weight"
  tensors[key][3, 5] = np.nan
  ckpt.write_safetensors(os.path.join(path, ckpt.WEIGHTS), tensors)
  with pytest.raises(ValueError) as e:
    models.load_pretrained(path)
  assert repr(key) in str(e.value) and "1 non-finite" in str(e.value) and path in str(e.value)
  model, params = models.load_pretrained(path, check_finite=False)  # the opt-out loads it as it is
  out = str(tmp_path / "export")
  with pytest.raises(ValueError) as e:  # and the HF export refuses it, writing nothing
    models.save_pretrained(model, params, out)
  assert repr(key) in str(e.value) and "1 of" in str(e.value) and not os.path.exists(out)
  params = jax.tree.map(lambda x: jax.numpy.nan_to_num(x), params)
  models.save_pretrained(model, params, out)
  assert os.path.exists(os.path.join(out, ckpt.WEIGHTS))


# ---------------------------------------------------------------------------------------------- item 6: Reason-RFT
@pytest.fixture(scope="module")
def rft_folder(tmp_path_factory) -> str:
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), "fixtures", "reason_rft"))
  import make_fixture  # pylint: disable=import-outside-toplevel

  return make_fixture.write_fixture(str(tmp_path_factory.mktemp("Reason-RFT-CoT-Dataset")))


def _prepared_anything(data_dir: str) -> bool:
  return any("dataset_info.json" in names for _, _, names in os.walk(data_dir))


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_image_fails_preparation_naming_id_and_file(rft_folder, tmp_path, damage):
  from ekipl_jax.data import builders

  root = _copy(rft_folder, tmp_path / "rft")
  path = builders.json_path(root, "train", builders.REASON_RFT_FILES["counting"]["train"])
  rec = json.load(open(path))[1]
  image = os.path.join(builders.image_root(root, "train"), rec["image"])
  good = open(image, "rb").read()
  open(image, "wb").write(b"not an image at all" if damage == "garbage" else good[: len(good) // 2])
  data_dir = str(tmp_path / "tfds")
  with pytest.raises(builders.RecordError) as e:
    builders.prepare_reason_rft(root, data_dir, "counting")
  msg = str(e.value)
  assert rec["id"] in msg and image in msg and path in msg and "cannot decode image" in msg
  assert not _prepared_anything(data_dir)  # nothing of the bad preparation is cached
  open(image, "wb").write(good)  # repaired: the same data_dir prepares, with the example
  builder = builders.prepare_reason_rft(root, data_dir, "counting")
  assert rec["id"] in builders.example_ids(builder, "train")


@pytest.mark.parametrize("answer", ["", "  \n"])
def test_empty_answer_is_rejected_naming_the_id(rft_folder, tmp_path, answer):
  from ekipl_jax.data import builders

  root = _copy(rft_folder, tmp_path / "rft")
  path = builders.json_path(root, "test_id", builders.REASON_RFT_FILES["structure"]["test_id"])
  records = json.load(open(path))
  records[2]["answer"] = answer
  json.dump(records, open(path, "w"))
  with pytest.raises(builders.RecordError) as e:
    builders.prepare_reason_rft(root, str(tmp_path / "tfds"), "structure")
  assert records[2]["id"] in str(e.value) and path in str(e.value) and "empty answer" in str(e.value)


def test_example_ids_match_the_decoded_records(rft_folder, tmp_path):
  from ekipl_jax.data import builders

  builder = builders.prepare_reason_rft(rft_folder, str(tmp_path / "tfds"), "spatial")
  for split in builders.REASON_RFT_FILES["spatial"]:
    ids = [ex["id"] for ex in builders.iterate(builder.as_data_source(split))]
    assert builders.example_ids(builder, split) == ids and len(ids) == 3


# ---------------------------------------------------------------------------------------------- item 3: the trainer
@pytest.mark.slow
def test_rl_refuses_to_start_on_an_uncovering_store(tmp_path):
  """EKIPL with a store that covers half of the training ids stops before the first step, naming the store, the
  source and a missing id (before the check, this run trained with exit 0, half of its prompts as plain GRPO)."""
  from test_trainer import tiny_config

  from ekipl_jax.data import builders
  from ekipl_jax.train import input_pipeline as data_lib
  from ekipl_jax.train import trainer

  cfg = tiny_config(str(tmp_path))
  cfg.stage, cfg.workdir, cfg.aux.store = "rl", str(tmp_path / "rl"), str(tmp_path / "aux")
  cfg.aux.sources = ("solver_strong",)
  ids = builders.example_ids(data_lib.prepare(cfg.data), cfg.data.train_split)
  with AuxStoreWriter(cfg.aux.store, sources=["solver_strong"]) as w:
    for i in ids[::2]:
      w.append(AuxResponse(id=i, source="solver_strong", text="<think>\n</think>\n<answer>\n1\n</answer>"))
  with pytest.raises(aux_store.AuxCoverageError) as e:
    trainer.run(cfg)
  msg = str(e.value)
  assert cfg.aux.store in msg and "'solver_strong'" in msg and repr(ids[1]) in msg and "50.0%" in msg
  assert not any(n.startswith("metrics") for n in os.listdir(cfg.workdir))  # no step ran
