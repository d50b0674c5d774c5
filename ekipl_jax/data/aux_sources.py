"""Writers of the external-trajectory store (ekipl_jax/sampling/aux_store.py): where the auxiliary responses come from.

  write_from_cot(examples, store_dir, name)                       (a) the dataset's own `cot` field (Reason-RFT-CoT
                                                                      annotations are a strong model's reasoning)
  write_from_checkpoint(examples, store_dir, name, checkpoint)    (b) any local HF checkpoint through our sampler
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

This module produces the store before training; nothing on the training path imports it (it imports the sampler and
the policy lazily, for (b) only).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import zlib
from typing import Any, Iterable, Sequence

import numpy as np

from ekipl_jax.data import chat_api, synthetic
from ekipl_jax.data import processor as processor_lib
from ekipl_jax.sampling.aux_store import AuxResponse, AuxStoreWriter, ContaminationError, RefuseIds

PROMPT_BUCKETS = tuple(64 * 2**i for i in range(7))  # 64 .. 4096 prompt tokens


# ---------------------------------------------------------------------------------------------- shared helpers
def check_refused(ids: Iterable[str], refuse_ids: RefuseIds) -> None:
  """Raise ContaminationError naming every refused id (before any response is produced)."""
  if refuse_ids is None:
    return
  test = refuse_ids if callable(refuse_ids) else refuse_ids.__contains__
  bad = sorted({i for i in ids if test(i)})
  if bad:
    shown = ", ".join(repr(b) for b in bad[:20]) + (f" ... ({len(bad)} in all)" if len(bad) > 20 else "")
    raise ContaminationError(f"refusing to write responses for evaluation ids: {shown}")


def prompt_provenance(ex: dict, templates: dict[str, str] | None) -> dict:
  """Which user-prompt template the response answers (name + hash of its text)."""
  key = processor_lib.template_key(ex["task"], ex.get("answer"))
  text = (templates or processor_lib.PROMPT_TEMPLATES)[key]
  return {"template": key, "sha256": hashlib.sha256(text.encode()).hexdigest()[:16]}


def _summary(name: str, store_dir: str, written: int, skipped: int, failures: list[dict]) -> dict:
  return {
      "source": name,
      "store": store_dir,
      "written": written,
      "skipped": skipped,
      "failed": len(failures),
      "failures": failures,
  }


def _done(writer: AuxStoreWriter, example_id: str, name: str, k: int) -> bool:
  return all((example_id, name, s) in writer for s in range(k))


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
  check_refused([ex["id"] for ex in examples], refuse_ids)
  written, skipped, failures = 0, 0, []
  with AuxStoreWriter(store_dir, refuse_ids=refuse_ids) as w:
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
  return _summary(name, store_dir, written, skipped, failures)


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
  check_refused([ex["id"] for ex in examples], refuse_ids)
  written, skipped = 0, 0
  with AuxStoreWriter(store_dir, refuse_ids=refuse_ids) as w:
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
            "correct": str(answer) == ex["answer"],
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
  return _summary(name, store_dir, written, skipped, [])


# ---------------------------------------------------------------------------------------------- (b) checkpoint
def _row_record(proc, tokens_C: np.ndarray, length: int, logprobs_C: np.ndarray) -> tuple[str, dict, list | None]:
  """(text, provenance fields, behaviour log-probs or None) of one sampled row.

  The text is the completion without its EOS. The trainer rebuilds the tokens as encode(text) + [eos]
  (sampling/groups.py); the log-probs go to the record's top level only when that equals the sampled tokens, so
  they line up token for token. Otherwise (special tokens, a non-canonical BPE split) they are kept in the
  provenance with the sampled ids they belong to."""
  ids = [int(t) for t in tokens_C[:length]]
  finished = bool(ids) and ids[-1] == proc.eos_token_id
  body = ids[:-1] if finished else ids
  text = proc.tokenizer.decode(body, skip_special_tokens=True)
  lp = [float(x) for x in logprobs_C[:length]]
  aligned = processor_lib.encode_completion(proc, text, add_eos=finished) == ids
  prov = {"sampled_token_ids": ids, "finished": finished, "behaviour_logprobs_aligned": aligned}
  if not aligned:
    prov["sampled_logprobs"] = lp
  return text, prov, lp if aligned else None


def _padded_batches(items: list[Any], size: int) -> Iterable[tuple[list[Any], int]]:
  """Batches of exactly `size` (the last one padded with copies of its first item, so shapes repeat) and the
  number of real items in each."""
  for i in range(0, len(items), size):
    chunk = items[i : i + size]
    yield chunk + [chunk[0]] * (size - len(chunk)), len(chunk)


def write_from_checkpoint(
    examples: Iterable[dict],
    store_dir: str,
    name: str,
    checkpoint: str,
    *,
    k: int = 1,
    temperature: float = 0.9,
    top_p: float = 0.9,
    top_k: int = 50,
    max_new_tokens: int = 512,
    batch_size: int = 8,
    seed: int = 0,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    prompt_buckets: Sequence[int] = PROMPT_BUCKETS,
    templates: dict[str, str] | None = None,
    dtype: str = "float32",
    refuse_ids: RefuseIds = None,
) -> dict:
  """k samples per example from the HF checkpoint folder (weights + its own processor files), prompts built as the
  trainer builds them (processor.prompt_batch). Behaviour log-probs are those of the distribution actually sampled
  from (temperature, top-k, top-p applied); behaviour_tokenizer = the checkpoint folder. dtype: float32 | bfloat16
  (weights and compute; one device, no mesh)."""
  import jax  # the sampler and the policy are only needed here
  import jax.numpy as jnp

  from ekipl_jax import models, sampling

  examples = list(examples)
  check_refused([ex["id"] for ex in examples], refuse_ids)
  checkpoint = os.path.abspath(checkpoint)
  sp = {
      "temperature": temperature,
      "top_p": top_p,
      "top_k": top_k,
      "max_new_tokens": max_new_tokens,
      "seed": seed,
      "dtype": dtype,
  }
  written, skipped = 0, 0
  with AuxStoreWriter(store_dir, refuse_ids=refuse_ids) as w:
    todo = [ex for ex in examples if not _done(w, ex["id"], name, k)]
    skipped += k * (len(examples) - len(todo))
    if not todo:
      return _summary(name, store_dir, 0, skipped, [])
    model, params = models.load_pretrained(checkpoint, dtype=jnp.dtype(dtype), compute_dtype=jnp.dtype(dtype))
    proc = processor_lib.load(checkpoint, min_pixels, max_pixels)
    with open(os.path.join(checkpoint, "config.json")) as f:
      model_type = json.load(f).get("model_type", "")
    for b, (batch, n_real) in enumerate(_padded_batches(todo, batch_size)):
      pb = processor_lib.prompt_batch(proc, batch, prompt_buckets, templates)
      out = sampling.generate(
          model,
          params,
          pb["input_ids"],
          pb["attention_mask"],
          pb["pixel_values"],
          pb["image_grid_thw"],
          max_new_tokens=max_new_tokens,
          temperature=temperature,
          top_p=top_p,
          top_k=top_k,
          eos_token_ids=[proc.eos_token_id],
          rng=jax.random.fold_in(jax.random.key(seed), b),
          num_samples=k,
          pad_token_id=proc.pad_token_id,
          prompt_buckets=(pb["input_ids"].shape[1],),
      )
      tokens_NC, lengths_N, logp_NC = (np.asarray(x) for x in (out.tokens, out.lengths, out.logprobs))
      for i, ex in enumerate(batch[:n_real]):
        for s in range(k):
          row = i * k + s  # prompt-major rows
          text, extra, lp = _row_record(proc, tokens_NC[row], int(lengths_N[row]), logp_NC[row])
          prov = {
              "kind": "checkpoint",
              "model": checkpoint,
              "model_type": model_type,
              "batch": b,
              "prompt": prompt_provenance(ex, templates),
              **extra,
          }
          ok = w.append(
              AuxResponse(
                  id=ex["id"],
                  source=name,
                  sample=s,
                  text=text,
                  sampling=sp,
                  behaviour_logprobs=lp,
                  behaviour_tokenizer=checkpoint,
                  provenance=prov,
              )
          )
          written, skipped = written + ok, skipped + (not ok)
  return _summary(name, store_dir, written, skipped, [])


# ---------------------------------------------------------------------------------------------- (c) openai
@dataclasses.dataclass(frozen=True)
class Endpoint:
  """Where and how to ask. The key is read from the environment variable `api_key_env` ("" = send no key, e.g. a
  local vLLM / SGLang server)."""

  base_url: str  # e.g. https://api.openai.com/v1, http://127.0.0.1:8000/v1
  model: str  # e.g. gpt-4o, gemini-1.5-pro, the served model name
  api_key_env: str = "OPENAI_API_KEY"
  concurrency: int = 8  # requests in flight at most
  timeout_s: float = 120.0  # per attempt (socket connect / read)
  max_retries: int = 5  # extra attempts on 408/409/429/5xx/timeouts
  backoff_s: float = 1.0  # first retry wait; doubles each time

  def api_key(self) -> str | None:
    if not self.api_key_env:
      return None
    key = os.environ.get(self.api_key_env)
    if not key:
      raise ValueError(
          f"environment variable {self.api_key_env!r} (the API key) is not set; pass api_key_env='' "
          f"for a server without authentication"
      )
    return key


def chat_payload(ex: dict, model: str, sampling: dict, templates: dict[str, str] | None) -> dict:
  """The request body for one example: images (data URLs) then the Reason-RFT question text; no system prompt."""
  text = processor_lib.format_question(ex["problem"], ex["task"], ex.get("answer"), templates)
  return {"model": model, "messages": chat_api.user_message(list(ex.get("images", [])), text), **sampling}


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
) -> dict:
  """k chat completions per example, at most `endpoint.concurrency` in flight; (id, sample) keys already stored
  are not requested again. Sample s asks with seed + s when `seed` is given. `extra_body` is merged into every
  request (e.g. {"top_k": 50} for vLLM). Failed requests are listed in the summary and not stored."""
  examples = list(examples)
  check_refused([ex["id"] for ex in examples], refuse_ids)
  api_key = endpoint.api_key()
  sp = {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens, **(extra_body or {})}
  url = chat_api.public_url(endpoint.base_url)

  def ask(ex: dict, s: int) -> tuple[dict, int]:
    payload = chat_payload(ex, endpoint.model, {**sp, **({} if seed is None else {"seed": seed + s})}, templates)
    return chat_api.complete(
        endpoint.base_url,
        api_key,
        payload,
        timeout_s=endpoint.timeout_s,
        max_retries=endpoint.max_retries,
        backoff_s=endpoint.backoff_s,
    )

  written, skipped, failures = 0, 0, []
  with (
      AuxStoreWriter(store_dir, refuse_ids=refuse_ids) as w,
      concurrent.futures.ThreadPoolExecutor(max(1, endpoint.concurrency)) as pool,
  ):
    futures = {}
    for ex in examples:
      for s in range(k):
        if (ex["id"], name, s) in w:
          skipped += 1
        else:
          futures[pool.submit(ask, ex, s)] = (ex, s)
    try:
      for fut in concurrent.futures.as_completed(futures):  # only this thread writes to the store
        ex, s = futures[fut]
        try:
          reply, attempts = fut.result()
        except chat_api.ChatAPIError as e:
          failures.append({"id": ex["id"], "sample": s, "status": e.status, "error": str(e)})
          continue
        prov = {
            "kind": "openai",
            "model": endpoint.model,
            "endpoint": url,
            "served_model": reply.get("model"),
            "response_id": reply.get("id"),
            "finish_reason": reply["choices"][0].get("finish_reason"),
            "usage": reply.get("usage"),
            "attempts": attempts,
            "prompt": prompt_provenance(ex, templates),
        }
        sampling_rec = {**sp, **({} if seed is None else {"seed": seed + s})}
        written += w.append(
            AuxResponse(
                id=ex["id"],
                source=name,
                sample=s,
                text=chat_api.reply_text(reply),
                sampling=sampling_rec,
                provenance=prov,
            )
        )
    except BaseException:
      pool.shutdown(wait=False, cancel_futures=True)
      raise
  return _summary(name, store_dir, written, skipped, failures)
