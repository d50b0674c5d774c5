"""Writers of the external-trajectory store (ekipl_jax/data/aux_store/): where the auxiliary responses come from.

  write_from_cot(examples, store_dir, name)                       (a) the dataset's own `cot` field (Reason-RFT-CoT
                                                                      annotations are a strong model's reasoning)
  write_from_checkpoint(examples, store_dir, name, checkpoint)    (b) any local HF checkpoint through our sampler: in
                                                                      ekipl_jax/sampling/checkpoint_source.py (it
                                                                      needs the sampler, a later stage)
  write_from_openai(examples, store_dir, name, base_url=, model=) (c) an OpenAI-compatible chat-completions endpoint
  write_from_solver(examples, store_dir, name, accuracy, seed, k) (d) synthetic task: a scripted solver of chosen
                                                                      accuracy (perfect / noisy external models)

`examples` are dicts as `builders.iterate` yields them (id, images, problem, answer, cot, task, metadata). Each
writer returns {"source", "store", "written", "skipped", "failed", "failures"}: `skipped` counts (id, sample) keys
already in the store (a rerun resumes), `failures` lists what could not be produced, with the reason.

Every record keeps its provenance: {"kind", "model", "prompt": {template, sha256}, ...} plus per-kind fields
(dataset file / split for cot; checkpoint path and sampled token ids for checkpoint; endpoint URL without the key,
response id, finish reason and usage for openai; solver accuracy, seed and correctness for the solver); the
sampling settings go into the record's `sampling`, the time into `created_at`.

Contamination guard: `refuse_ids` (ids of evaluation splits, or a callable) is checked before any work and by the
store on every append and on open; a refused id raises aux_store.ContaminationError naming it.

Each writer holds its source's writer lock in the store while it runs (aux_store.AuxStoreWriter): writers of different
sources may fill one store in parallel; a second writer of the same source is refused, naming the first.

(c) uses the official `openai` client (`pip install -e .[api]`): OpenAI, Gemini's OpenAI-compatible endpoint
(base_url https://generativelanguage.googleapis.com/v1beta/openai/), vLLM and SGLang servers (http://host:port/v1).
The client retries 408/409/429/5xx and timeouts with backoff; a reply that is empty or cut by max_tokens
(finish_reason "length") is a failure, not stored, so a rerun asks again; after `max_failures` consecutive requests
that fail on the endpoint itself (connection error, timeout, or an HTTP error other than 400/413/422) the writer
stops with EndpointError naming the endpoint. A progress bar on stderr counts done / failed / skipped.

This module produces the store before training; nothing on the training path imports it, and it imports nothing
after data/ (imports run forward).
"""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import hashlib
import io
import mimetypes
import os
import urllib.parse
import zlib
from typing import Any, Iterable, Sequence

import numpy as np
import tqdm
from PIL import Image

from ekipl_jax.data import synthetic
from ekipl_jax.data import processor as processor_lib
from ekipl_jax.data.aux_store import AuxResponse, AuxStoreWriter, RefuseIds, check_refused


# ---------------------------------------------------------------------------------------------- shared helpers
def prompt_provenance(ex: dict, templates: dict[str, str] | None) -> dict:
  """Which user-prompt template the response answers (name + hash of its text)."""
  key = processor_lib.template_key(ex["task"], ex.get("answer"))
  text = (templates or processor_lib.PROMPT_TEMPLATES)[key]
  return {"template": key, "sha256": hashlib.sha256(text.encode()).hexdigest()[:16]}


def summary(name: str, store_dir: str, written: int, skipped: int, failures: list[dict]) -> dict:
  """What every writer returns."""
  return {
      "source": name,
      "store": store_dir,
      "written": written,
      "skipped": skipped,
      "failed": len(failures),
      "failures": failures,
  }


# ---------------------------------------------------------------------------------------------- (a) dataset cot
def write_from_cot(
    examples: Iterable[dict],
    store_dir: str,
    name: str = "dataset_cot",
    *,
    dataset: str = "",
    split: str = "",
    model: str = "",
    refuse_ids: RefuseIds = None,
) -> dict:
  """One response per example: "<think>\\n{cot}\\n</think>\\n<answer>\\n{answer}\\n</answer>" (the Reason-RFT SFT
  target). Examples with an empty `cot` are reported as failures. `dataset`: the file / builder it came from."""
  examples = list(examples)
  check_refused([ex["id"] for ex in examples], refuse_ids, f"aux store writer {store_dir}")
  written, skipped, failures = 0, 0, []
  with AuxStoreWriter(store_dir, refuse_ids=refuse_ids, sources=[name]) as w:
    for ex in examples:
      if not ex.get("cot"):
        failures.append({"id": ex["id"], "sample": 0, "error": "empty cot field"})
        continue
      prov = {
          "kind": "dataset_cot",
          "model": model or "unknown (dataset annotation)",
          "dataset": dataset,
          "split": split,
          "prompt": prompt_provenance(ex, None),
      }
      ok = w.append(
          AuxResponse(
              id=ex["id"],
              source=name,
              sample=0,
              text=processor_lib.sft_target(ex["cot"], ex["answer"]),
              provenance=prov,
          )
      )
      written, skipped = written + ok, skipped + (not ok)
  return summary(name, store_dir, written, skipped, failures)


# ---------------------------------------------------------------------------------------------- (d) scripted solver
def write_from_solver(
    examples: Iterable[dict],
    store_dir: str,
    name: str,
    accuracy: float,
    seed: int = 0,
    k: int = 1,
    *,
    refuse_ids: RefuseIds = None,
) -> dict:
  """k responses per synthetic example from `synthetic.noisy_response` (correct with probability `accuracy`;
  1.0 = the perfect solver). Each (id, sample) has its own generator seeded by (seed, crc32(id), sample), so a
  response does not depend on which other ids are written or on resuming."""
  examples = list(examples)
  check_refused([ex["id"] for ex in examples], refuse_ids, f"aux store writer {store_dir}")
  written, skipped = 0, 0
  with AuxStoreWriter(store_dir, refuse_ids=refuse_ids, sources=[name]) as w:
    for ex in examples:
      for s in range(k):
        if (ex["id"], name, s) in w:
          skipped += 1
          continue
        rng = np.random.default_rng([seed, zlib.crc32(ex["id"].encode()), s])
        text, answer = synthetic.noisy_response(ex["metadata"], accuracy, rng)
        prov = {
            "kind": "scripted_solver",
            "model": f"synthetic.noisy_solve(accuracy={accuracy})",
            "answer": str(answer),
            "correct": str(answer) == ex.get("solution", ex["answer"]),  # ground truth, not the SFT teacher's
            "prompt": prompt_provenance(ex, None),
        }
        written += w.append(
            AuxResponse(
                id=ex["id"],
                source=name,
                sample=s,
                text=text,
                sampling={"accuracy": accuracy, "seed": seed},
                provenance=prov,
            )
        )
  return summary(name, store_dir, written, skipped, [])


# ---------------------------------------------------------------------------------------------- (c) openai
class EndpointError(RuntimeError):
  """The endpoint itself fails (not one request): it is down, the URL, key or model is wrong, or the quota is gone."""


def image_data_url(image: Any) -> str:
  """An HxWx3 uint8 array, a PIL image, PNG/JPEG bytes or a file path -> "data:<mime>;base64,..."."""
  if isinstance(image, str):
    mime = mimetypes.guess_type(image)[0] or "image/png"
    with open(image, "rb") as f:
      raw = f.read()
  elif isinstance(image, bytes):
    raw, mime = image, "image/png" if image[:4] == b"\x89PNG" else "image/jpeg"
  else:
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG")
    raw, mime = buf.getvalue(), "image/png"
  return f"data:{mime};base64,{base64.b64encode(raw).decode('ascii')}"


def user_message(images: Sequence[Any], text: str) -> list[dict]:
  """One user turn: the images (inline data URLs) first, then the text, as the policy's prompt has them."""
  parts = [{"type": "image_url", "image_url": {"url": image_data_url(im)}} for im in images]
  return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


def public_url(url: str) -> str:
  """The URL without user info, query or fragment (nothing secret goes into provenance or messages)."""
  u = urllib.parse.urlsplit(url)
  netloc = (u.hostname or "") + (f":{u.port}" if u.port else "")
  return urllib.parse.urlunsplit((u.scheme, netloc, u.path.rstrip("/"), "", ""))


@dataclasses.dataclass(frozen=True)
class Endpoint:
  """Where and how to ask. The key is read from the environment variable `api_key_env` ("" = no key, e.g. a local
  vLLM / SGLang server; the client then sends the placeholder "EMPTY")."""

  base_url: str  # e.g. https://api.openai.com/v1, http://127.0.0.1:8000/v1
  model: str  # e.g. gpt-4o, gemini-2.0-flash, the served model name
  api_key_env: str = "OPENAI_API_KEY"
  concurrency: int = 8  # requests in flight at most
  timeout_s: float = 120.0  # per attempt
  max_retries: int = 5  # extra attempts on 408/409/429/5xx/timeouts/connection errors (the client's backoff)
  max_failures: int = 10  # stop after this many consecutive requests failing on the endpoint itself (0: never)

  def api_key(self) -> str:
    if not self.api_key_env:
      return "EMPTY"
    key = os.environ.get(self.api_key_env)
    if not key:
      raise ValueError(
          f"environment variable {self.api_key_env!r} (the API key) is not set; pass api_key_env='' "
          f"for a server without authentication"
      )
    return key

  def client(self):
    try:
      import openai  # an install extra: pip install -e .[api]
    except ImportError as e:
      raise ImportError("the openai source needs the `openai` package: pip install -e .[api]") from e
    return openai.OpenAI(
        base_url=self.base_url, api_key=self.api_key(), timeout=self.timeout_s, max_retries=self.max_retries
    )


def chat_payload(ex: dict, model: str, templates: dict[str, str] | None) -> dict:
  """The model and messages of one request: images (data URLs) then the Reason-RFT question; no system prompt."""
  text = processor_lib.format_question(ex["problem"], ex["task"], ex.get("answer"), templates)
  return {"model": model, "messages": user_message(list(ex.get("images", [])), text)}


def _failure(ex: dict, s: int, e: Exception, timeout_s: float) -> dict:
  """The summary entry of a failed request; `endpoint` marks failures of the endpoint rather than of the request."""
  import openai

  status = getattr(e, "status_code", None)
  if isinstance(e, openai.APITimeoutError):
    error = f"timeout after {timeout_s} s per attempt: {e}"
  elif isinstance(e, openai.APIConnectionError):
    error = f"connection error: {e} ({e.__cause__!r})"
  else:
    error = f"{type(e).__name__}: {e}"
  endpoint = isinstance(e, openai.APIConnectionError) or (
      isinstance(e, openai.APIStatusError) and status not in (400, 413, 422)
  )
  return {"id": ex["id"], "sample": s, "status": status, "error": error, "endpoint": endpoint}


def _reply_problem(reply, max_tokens: int) -> str | None:
  """Why a reply is not a usable response (None: it is): no choice, empty text, or cut by max_tokens."""
  if not reply.choices:
    return "reply has no choices"
  choice = reply.choices[0]
  if choice.finish_reason == "length":
    return f"finish_reason 'length': the reply was cut at max_tokens={max_tokens}"
  if not (choice.message.content or "").strip():
    return f"empty reply (finish_reason {choice.finish_reason!r})"
  return None


def write_from_openai(
    examples: Iterable[dict],
    store_dir: str,
    name: str,
    endpoint: Endpoint,
    *,
    k: int = 1,
    temperature: float = 0.9,
    top_p: float = 0.9,
    max_tokens: int = 1024,
    seed: int | None = None,
    extra_body: dict | None = None,
    templates: dict[str, str] | None = None,
    refuse_ids: RefuseIds = None,
    progress: bool = True,
) -> dict:
  """k chat completions per example, at most `endpoint.concurrency` in flight; (id, sample) keys already stored
  are not requested again. Sample s asks with seed + s when `seed` is given. `extra_body` is merged into every
  request (e.g. {"top_k": 50} for vLLM). Failed requests (errors, empty or length-cut replies) are listed in the
  summary and not stored; EndpointError after `endpoint.max_failures` consecutive endpoint failures."""
  examples = list(examples)
  check_refused([ex["id"] for ex in examples], refuse_ids, f"aux store writer {store_dir}")
  client = endpoint.client()
  sp = {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens}
  url = public_url(endpoint.base_url)

  def ask(ex: dict, s: int):
    raw = client.chat.completions.with_raw_response.create(
        **chat_payload(ex, endpoint.model, templates),
        **sp,
        **({} if seed is None else {"seed": seed + s}),
        extra_body=extra_body or None,
    )
    return raw.parse(), raw.retries_taken + 1

  written, skipped, failures, streak = 0, 0, [], 0
  with AuxStoreWriter(store_dir, refuse_ids=refuse_ids, sources=[name]) as w:
    pool = concurrent.futures.ThreadPoolExecutor(max(1, endpoint.concurrency))
    futures = {}
    for ex in examples:
      for s in range(k):
        if (ex["id"], name, s) in w:
          skipped += 1
        else:
          futures[pool.submit(ask, ex, s)] = (ex, s)
    bar = tqdm.tqdm(total=len(examples) * k, initial=skipped, desc=f"{name} <- {url}", unit="req", disable=not progress)

    def tick(n: int = 1):
      bar.set_postfix_str(f"done {written}, failed {len(failures)}, skipped {skipped}", refresh=False)
      bar.update(n)

    tick(0)
    try:
      for fut in concurrent.futures.as_completed(futures):  # only this thread writes to the store
        ex, s = futures[fut]
        try:
          reply, attempts = fut.result()
        except Exception as e:  # pylint: disable=broad-except
          failures.append(_failure(ex, s, e, endpoint.timeout_s))
          streak = streak + 1 if failures[-1]["endpoint"] else 0
          tick()
          if endpoint.max_failures and streak >= endpoint.max_failures:
            raise EndpointError(
                f"{streak} consecutive requests to {url} (model {endpoint.model!r}) failed on the endpoint; the "
                f"last: {failures[-1]['error']}. Check that the server is up and the URL, key and model are right. "
                f"Stopped early (max_failures={endpoint.max_failures}, flag --max_failures); the {written} "
                f"responses written are kept and a rerun resumes."
            ) from e
          continue
        streak = 0
        problem = _reply_problem(reply, max_tokens)
        if problem:
          failures.append({"id": ex["id"], "sample": s, "status": 200, "error": problem, "endpoint": False})
          tick()
          continue
        choice = reply.choices[0]
        prov = {
            "kind": "openai",
            "model": endpoint.model,
            "endpoint": url,
            "served_model": reply.model,
            "response_id": reply.id,
            "finish_reason": choice.finish_reason,
            "usage": reply.usage.model_dump() if reply.usage is not None else None,
            "attempts": attempts,
            "prompt": prompt_provenance(ex, templates),
        }
        sampling_rec = {**sp, **(extra_body or {}), **({} if seed is None else {"seed": seed + s})}
        written += w.append(
            AuxResponse(
                id=ex["id"],
                source=name,
                sample=s,
                text=choice.message.content,
                sampling=sampling_rec,
                provenance=prov,
            )
        )
        tick()
    finally:
      bar.close()
      pool.shutdown(wait=False, cancel_futures=True)
  return summary(name, store_dir, written, skipped, failures)
