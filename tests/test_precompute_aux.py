"""Auxiliary-store writers (ekipl_jax/data/aux_sources.py): dataset CoT, scripted solvers, a local checkpoint through
our sampler (ekipl_jax/sampling/checkpoint_source.py), and an OpenAI-compatible endpoint (a loopback server started
here); contamination guard; the CLI."""

import base64
import dataclasses
import io
import json
import os
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from ekipl_jax.data import aux_sources as A
from ekipl_jax.data import processor as P
from ekipl_jax.data import synthetic as S
from ekipl_jax.data.aux_store import ContaminationError, open_store

CFG = S.SceneConfig(seed=3)


def _examples(split: str, n: int, start: int = 0) -> list[dict]:
  """Synthetic records in the layout builders.iterate yields (images: HxWx3 uint8 arrays)."""
  out = []
  for i in range(start, start + n):
    ex = S.make_example(CFG, split, i)
    ex["images"] = [np.asarray(Image.open(io.BytesIO(ex.pop("image_png"))).convert("RGB"))]
    ex["image"] = [ex["image"]]
    out.append(ex)
  return out


# ---------------------------------------------------------------------------------------------- (d) solvers, (a) cot
def test_solvers_write_and_read_back(tmp_path):
  root, exs = str(tmp_path / "aux"), _examples("train", 30)
  strong = A.write_from_solver(exs, root, "solver_strong", accuracy=1.0, seed=0, k=2)
  weak = A.write_from_solver(exs, root, "solver_weak", accuracy=0.5, seed=0, k=2)
  assert (strong["written"], strong["skipped"], strong["failed"]) == (60, 0, 0) and weak["written"] == 60
  with open_store(root) as store:
    assert store.sources() == ["solver_strong", "solver_weak"] and len(store) == 30
    correct = {"solver_strong": [], "solver_weak": []}
    for ex in exs:
      for r in store.get(ex["id"]):
        assert r.text.startswith("<think>\n") and r.text.endswith("\n</answer>")
        answer = r.text.split("<answer>\n")[1].split("\n</answer>")[0]
        assert r.provenance["kind"] == "scripted_solver" and r.provenance["answer"] == answer
        assert r.provenance["correct"] == (answer == ex["answer"]) and r.sampling["seed"] == 0
        assert r.provenance["prompt"]["template"] == "counting" and r.created_at
        correct[r.source].append(r.provenance["correct"])
    assert all(correct["solver_strong"]) and 0.2 < np.mean(correct["solver_weak"]) < 0.8
  # resume: nothing new; determinism: a fresh store with the same seed holds the same texts
  again = A.write_from_solver(exs, root, "solver_weak", accuracy=0.5, seed=0, k=2)
  assert (again["written"], again["skipped"]) == (0, 60)
  other = str(tmp_path / "other")
  A.write_from_solver(exs[::-1], other, "solver_weak", accuracy=0.5, seed=0, k=2)
  with open_store(root) as a, open_store(other) as b:
    assert all([r.text for r in a.get(e["id"], "solver_weak")] == [r.text for r in b.get(e["id"])] for e in exs)


def test_cot_source(tmp_path):
  root, exs = str(tmp_path / "aux"), _examples("train", 5)
  exs[2]["cot"] = ""
  summary = A.write_from_cot(exs, root, dataset="/data/A3-Visual-Counting-train-35k-cot.json", split="train")
  assert (summary["written"], summary["failed"]) == (4, 1) and summary["failures"][0]["id"] == exs[2]["id"]
  with open_store(root) as store:
    assert exs[2]["id"] not in store and store.sources() == ["dataset_cot"]
    (r,) = store.get(exs[0]["id"])
    assert r.text == f"<think>\n{exs[0]['cot']}\n</think>\n<answer>\n{exs[0]['answer']}\n</answer>"
    assert r.provenance["kind"] == "dataset_cot" and r.provenance["split"] == "train"
    assert r.provenance["dataset"] == "/data/A3-Visual-Counting-train-35k-cot.json"
  assert A.write_from_cot(exs, root)["skipped"] == 4


def test_contamination_guard_on_write_and_on_load(tmp_path):
  root = str(tmp_path / "aux")
  train, test = _examples("train", 3), _examples("test_id", 2)
  eval_ids = {ex["id"] for ex in test}
  with pytest.raises(ContaminationError) as e:
    A.write_from_solver(train + test, root, "s", accuracy=1.0, refuse_ids=eval_ids)
  assert all(i in str(e.value) for i in eval_ids) and train[0]["id"] not in str(e.value)
  with pytest.raises(ContaminationError, match=test[0]["id"]):
    A.write_from_cot(test[:1], root, refuse_ids=lambda i: i.startswith("test"))
  assert not os.path.exists(os.path.join(root, "shard-00000.jsonl"))  # refused before anything was written
  A.write_from_solver(train + test, root, "s", accuracy=1.0)  # a store written without the guard ...
  with pytest.raises(ContaminationError) as e:  # ... is refused on load, naming the ids
    open_store(root, refuse_ids=eval_ids)
  assert all(i in str(e.value) for i in eval_ids)
  with pytest.raises(ContaminationError, match=test[1]["id"]):  # and the writer refuses to resume it
    A.write_from_solver(train, root, "s2", accuracy=1.0, refuse_ids=eval_ids)


# ---------------------------------------------------------------------------------------------- (b) checkpoint
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> str:
  """A random tiny Qwen2-VL policy saved with a processor folder whose special ids match its config."""
  import jax

  from ekipl_jax import models
  from ekipl_jax.data import tokenizer as T
  import hf_fixtures as F

  root = tmp_path_factory.mktemp("ckpt")
  proc_dir = T.build_processor_folder(
      S.corpus(CFG, 40) + P.template_corpus(),
      str(root / "proc"),
      384,
      "qwen2_vl",
      min_pixels=112 * 112,
      max_pixels=112 * 112,
  )
  ids = T.read_special_token_ids(proc_dir)
  cfg = F.tiny_config_dict("qwen2_vl")
  cfg["text_config"].update(
      vocab_size=ids["vocab_size"], eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"]
  )
  cfg.update({k: ids[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")})
  model, params = models.init(cfg, jax.random.key(0))
  out = str(root / "tiny_policy")
  models.save_pretrained(model, params, out, processor_dir=proc_dir)
  return out


def test_checkpoint_source(tmp_path, tiny_checkpoint, monkeypatch):
  import jax

  from ekipl_jax import models
  from ekipl_jax.sampling import checkpoint_source

  root, exs = str(tmp_path / "aux"), _examples("train", 3)
  kw = dict(
      k=2,
      temperature=1.0,
      top_p=1.0,
      top_k=0,
      max_new_tokens=6,
      batch_size=2,
      seed=1,
      min_pixels=112 * 112,
      max_pixels=112 * 112,
      prompt_buckets=(128, 256),
  )
  summary = checkpoint_source.write_from_checkpoint(exs, root, "tiny", tiny_checkpoint, **kw)
  assert (summary["written"], summary["skipped"], summary["failed"]) == (6, 0, 0)
  proc = P.load(tiny_checkpoint, 112 * 112, 112 * 112)
  model, params = models.load_pretrained(tiny_checkpoint)
  with open_store(root) as store:
    for ex in exs:
      recs = store.get(ex["id"])
      assert [r.sample for r in recs] == [0, 1] and all(r.source == "tiny" for r in recs)
      for r in recs:
        prov = r.provenance
        assert prov["kind"] == "checkpoint" and prov["model"] == os.path.abspath(tiny_checkpoint)
        assert r.behaviour_tokenizer == os.path.abspath(tiny_checkpoint)
        assert r.sampling == {
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": 0,
            "max_new_tokens": 6,
            "seed": 1,
            "dtype": "float32",
        }
        ids = prov["sampled_token_ids"]
        assert 1 <= len(ids) <= 6 and prov["finished"] == (ids[-1] == proc.eos_token_id)
        body = ids[:-1] if prov["finished"] else ids
        assert r.text == proc.tokenizer.decode(body, skip_special_tokens=True)
        aligned = P.encode_completion(proc, r.text, add_eos=prov["finished"]) == ids
        assert prov["behaviour_logprobs_aligned"] == aligned
        lp = r.behaviour_logprobs if aligned else prov["sampled_logprobs"]
        assert (r.behaviour_logprobs is None) != aligned and len(lp) == len(ids)
  # the stored log-probs are the policy's own log-probs of the sampled tokens (temperature 1, no truncation):
  # teacher-force all 6 rows at once, completions right padded to 6 tokens (one compilation)
  with open_store(root) as store:
    recs = [r for ex in exs for r in store.get(ex["id"])]
  pb = P.prompt_batch(proc, [ex for ex in exs for _ in range(2)], (256,))
  comp = np.zeros((len(recs), 6), np.int32)
  comp_mask = np.zeros_like(comp)
  for i, r in enumerate(recs):
    ids = r.provenance["sampled_token_ids"]
    comp[i, : len(ids)], comp_mask[i, : len(ids)] = ids, 1
  inputs = (
      np.concatenate([pb["input_ids"], comp], 1),
      np.concatenate([pb["attention_mask"], comp_mask], 1),
      pb["pixel_values"],
      pb["image_grid_thw"],
  )  # host constants: positions and vision layout need them
  want, _ = jax.jit(lambda p: models.token_logprobs(model, p, *inputs, targets_from=pb["input_ids"].shape[1]))(params)
  for i, r in enumerate(recs):
    got = r.behaviour_logprobs or r.provenance["sampled_logprobs"]
    np.testing.assert_allclose(got, np.asarray(want)[i, : len(got)], atol=2e-4)
  # resume: nothing to sample, the policy is not even loaded
  monkeypatch.setattr(models, "load_pretrained", lambda *a, **k: pytest.fail("loaded the policy on resume"))
  again = checkpoint_source.write_from_checkpoint(exs, root, "tiny", tiny_checkpoint, **kw)
  assert (again["written"], again["skipped"]) == (0, 6)


# ---------------------------------------------------------------------------------------------- (c) openai endpoint
class FakeOpenAI:
  """A chat-completions server on 127.0.0.1 (ephemeral port). `script[question key]` lists the reply of each
  attempt: "ok", an HTTP error status ("500", "400", "429" with Retry-After: 0), "sleep" (longer than the client
  timeout), "empty" (content "") or "length" (finish_reason "length"); after the list runs out, "ok". A key that is
  not in the script gets `default` on every attempt."""

  def __init__(
      self, script: dict[str, list[str]] | None = None, delay_s: float = 0.0, sleep_s: float = 1.0, default: str = "ok"
  ):
    self.script, self.delay_s, self.sleep_s, self.default = script or {}, delay_s, sleep_s, default
    self.requests: dict[str, int] = {}
    self.problems: list[str] = []
    self.in_flight = self.max_in_flight = 0
    self.lock = threading.Lock()
    server = self

    class Handler(BaseHTTPRequestHandler):

      def log_message(self, *args):
        pass

      def do_POST(self):
        with server.lock:
          server.in_flight += 1
          server.max_in_flight = max(server.max_in_flight, server.in_flight)
        try:
          server.handle(self)  # leaves in_flight when it starts answering
        except (BrokenPipeError, ConnectionResetError):
          pass  # the client gave up (timeout)

    self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.httpd.daemon_threads = True
    self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
    threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

  def check(self, h, body: dict) -> str:
    """The question key ("q3") of a well-formed request; problems are recorded."""
    if h.path != "/v1/chat/completions" or h.headers.get("Authorization") != "Bearer sk-test-123":
      self.problems.append(f"path {h.path} / auth {h.headers.get('Authorization')}")
    if body.get("model") != "test-model" or body.get("temperature") != 0.7 or body.get("max_tokens") != 64:
      self.problems.append(f"settings {body}")
    (msg,) = body["messages"]
    image, text = msg["content"]
    url = image["image_url"]["url"]
    if msg["role"] != "user" or image["type"] != "image_url" or not url.startswith("data:image/png;base64,"):
      self.problems.append(f"message {str(msg)[:200]}")
    img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    if img.size != (CFG.image_size, CFG.image_size) or text["type"] != "text":
      self.problems.append(f"image {img.size} / {text['type']}")
    return text["text"].split(" ")[0]

  def handle(self, h) -> None:
    body = json.loads(h.rfile.read(int(h.headers["Content-Length"])))
    key = self.check(h, body)
    with self.lock:
      attempt = self.requests.get(key, 0)
      self.requests[key] = attempt + 1
    plan = self.script.get(key, [])
    action = plan[attempt] if attempt < len(plan) else "ok" if key in self.script else self.default
    time.sleep(self.delay_s)
    if action == "sleep":
      time.sleep(self.sleep_s)
    if action.isdigit():  # an HTTP error status
      reply, status = {"error": {"message": f"scripted {action}"}}, int(action)
    else:
      reply, status = {
          "id": f"chatcmpl-{key}-{attempt}",
          "object": "chat.completion",
          "model": "test-model-0613",
          "choices": [
              {
                  "index": 0,
                  "finish_reason": "length" if action == "length" else "stop",
                  "message": {
                      "role": "assistant",
                      "content": "" if action == "empty" else f"<think>\n{key}\n</think>\n<answer>\n3\n</answer>",
                  },
              }
          ],
          "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
      }, 200
    data = json.dumps(reply).encode()
    with self.lock:  # answered from here on: the client may send its next request before this thread ends
      self.in_flight -= 1
    h.send_response(status)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(data)))
    if action == "429":
      h.send_header("Retry-After", "0")
    h.end_headers()
    h.wfile.write(data)

  def close(self) -> None:
    self.httpd.shutdown()
    self.httpd.server_close()


def _questions(n: int) -> list[dict]:
  """Examples whose problem starts with a key the server reads back ("q0", "q1", ...)."""
  exs = _examples("train", n)
  for i, ex in enumerate(exs):
    ex["problem"] = f"q{i} {ex['problem']}"
  return exs


@pytest.fixture
def serve(monkeypatch):
  monkeypatch.setenv("TEST_OPENAI_KEY", "sk-test-123")
  monkeypatch.setenv("NO_PROXY", "127.0.0.1")
  servers = []

  def start(**kw) -> FakeOpenAI:
    servers.append(FakeOpenAI(**kw))
    return servers[-1]

  yield start
  for s in servers:
    s.close()


def _endpoint(server: FakeOpenAI, **kw) -> A.Endpoint:
  kw = {"api_key_env": "TEST_OPENAI_KEY", "concurrency": 4, "timeout_s": 0.4, "max_retries": 2, **kw}
  return A.Endpoint(server.base_url, "test-model", **kw)


SETTINGS = dict(temperature=0.7, top_p=0.9, max_tokens=64)


def test_openai_errors_retries_and_timeouts(tmp_path, serve):
  server = serve(script={"q1": ["500"], "q2": ["400"], "q3": ["sleep"], "q4": ["sleep"] * 3, "q5": ["429", "502"]})
  root, exs = str(tmp_path / "aux"), _questions(6)
  summary = A.write_from_openai(exs, root, "gpt-test", _endpoint(server), seed=5, **SETTINGS)
  assert server.problems == []
  assert summary["written"] == 4 and summary["failed"] == 2
  failed = {f["id"]: f for f in summary["failures"]}
  assert failed.keys() == {exs[2]["id"], exs[4]["id"]}
  assert failed[exs[2]["id"]]["status"] == 400 and "scripted 400" in failed[exs[2]["id"]]["error"]
  assert failed[exs[4]["id"]]["status"] is None and "timeout" in failed[exs[4]["id"]]["error"]
  assert server.requests == {"q0": 1, "q1": 2, "q2": 1, "q3": 2, "q4": 3, "q5": 3}  # 400: no retry; max 2 retries
  with open_store(root) as store:
    assert exs[2]["id"] not in store and exs[4]["id"] not in store
    (r,) = store.get(exs[1]["id"])
    assert r.text == "<think>\nq1\n</think>\n<answer>\n3\n</answer>" and r.source == "gpt-test"
    assert r.sampling == {**SETTINGS, "seed": 5}
    p = r.provenance
    assert (p["kind"], p["model"], p["endpoint"], p["served_model"]) == (
        "openai",
        "test-model",
        server.base_url,
        "test-model-0613",
    )
    assert p["response_id"] == "chatcmpl-q1-1" and p["attempts"] == 2 and p["finish_reason"] == "stop"
    assert p["usage"]["total_tokens"] == 15
  for folder, _, names in os.walk(root):  # the key is never written
    for name in names:
      assert b"sk-test-123" not in open(os.path.join(folder, name), "rb").read()


def test_openai_resume_and_bounded_concurrency(tmp_path, serve):
  server = serve(delay_s=0.1)
  root, exs = str(tmp_path / "aux"), _questions(12)
  summary = A.write_from_openai(exs, root, "gpt-test", _endpoint(server, concurrency=3, timeout_s=5.0), k=2, **SETTINGS)
  assert (summary["written"], summary["failed"]) == (24, 0) and server.problems == []
  assert server.max_in_flight == 3  # bounded, and actually concurrent
  sent = dict(server.requests)
  again = A.write_from_openai(exs, root, "gpt-test", _endpoint(server, concurrency=3), k=2, **SETTINGS)
  assert (again["written"], again["skipped"]) == (0, 24) and server.requests == sent  # no request for stored ids
  more = A.write_from_openai(exs, root, "gpt-test", _endpoint(server, concurrency=3), k=3, **SETTINGS)
  assert (more["written"], more["skipped"]) == (12, 24)  # only the new samples are asked for
  with open_store(root) as store:
    assert sorted(r.sample for r in store.get(exs[0]["id"])) == [0, 1, 2]  # written as they complete


def test_openai_base_url_with_trailing_slash(tmp_path, serve):
  """Gemini's OpenAI-compatible base URL is documented with a trailing slash (.../v1beta/openai/)."""
  server = serve()
  endpoint = dataclasses.replace(_endpoint(server), base_url=server.base_url + "/")
  summary = A.write_from_openai(_questions(2), str(tmp_path / "aux"), "g", endpoint, **SETTINGS)
  assert (summary["written"], server.problems) == (2, [])


def test_openai_key_and_guard(tmp_path, serve, monkeypatch):
  server = serve()
  exs = _questions(2)
  monkeypatch.delenv("TEST_OPENAI_KEY")
  with pytest.raises(ValueError, match="TEST_OPENAI_KEY"):
    A.write_from_openai(exs, str(tmp_path / "a"), "g", _endpoint(server), **SETTINGS)
  with pytest.raises(ContaminationError, match=exs[1]["id"]):
    A.write_from_openai(
        exs, str(tmp_path / "b"), "g", _endpoint(server, api_key_env=""), refuse_ids={exs[1]["id"]}, **SETTINGS
    )
  assert server.requests == {}  # refused before any request


# ---------------------------------------------------------------------------------------------- the CLI
def test_cli_writes_train_and_refuses_eval_split(tmp_path, capsys, monkeypatch):
  import importlib.util

  from absl import flags

  store = str(tmp_path / "aux")
  argv = [
      "precompute_aux",
      "--source=solver",
      "--name=solver_strong",
      "--accuracy=1.0",
      "--k=2",
      f"--store={store}",
      "--data.builder=synthetic_reasoning",
      "--data.num_train=6",
      "--data.num_test=2",
      "--data.image_size=112",
      f"--data.data_dir={tmp_path / 'tfds'}",
  ]
  monkeypatch.setattr(sys, "argv", argv)  # ml_collections defines the --data.* override flags from sys.argv
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "precompute_aux.py")
  spec = importlib.util.spec_from_file_location("precompute_aux", path)
  cli = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cli)
  try:
    flags.FLAGS(argv)
    assert cli.main(["precompute_aux"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["written"] == 12
    with open_store(store) as s:
      assert len(s) == 6 and s.sources() == ["solver_strong"] and all(i.startswith("train-") for i in s.ids())
    flags.FLAGS(argv + ["--split=test_ood"])
    with pytest.raises(ContaminationError, match="test_ood-000001"):
      cli.main(["precompute_aux"])
    with socket.socket() as sock:  # a port nobody listens on: one clear line and exit status 2
      sock.bind(("127.0.0.1", 0))
      dead = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    flags.FLAGS.unparse_flags()
    flags.FLAGS(argv[:1] + argv[5:] + ["--source=openai", f"--base_url={dead}", "--model=m", "--api_key_env="])
    flags.FLAGS(["precompute_aux", "--max_failures=2", "--max_retries=0", "--concurrency=1", "--noprogress"])
    capsys.readouterr()
    assert cli.main(["precompute_aux"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 2 consecutive requests to " + dead) and "Traceback" not in err
  finally:
    flags.FLAGS.unparse_flags()
