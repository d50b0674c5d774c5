"""Writer (b) of the external-trajectory store: a local HF checkpoint sampled through our sampler.

  write_from_checkpoint(examples, store_dir, name, checkpoint, k=..., temperature=..., ...)

It lives here, not with the other writers in ekipl_jax/data/aux_sources.py, because it needs the sampler and the
policy (imports run forward: data -> models -> sampling). Records, provenance, resume and the contamination guard are
those of aux_sources (see its docstring); the per-token behaviour log-probs are stored, which
`external_treatment="importance"` needs.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ekipl_jax import models
from ekipl_jax.data import aux_sources
from ekipl_jax.data import processor as processor_lib
from ekipl_jax.data.aux_store import AuxResponse, AuxStoreWriter, RefuseIds, check_refused
from ekipl_jax.sampling.config import SamplingConfig

PROMPT_BUCKETS = tuple(64 * 2**i for i in range(7))  # 64 .. 4096 prompt tokens


def _done(writer: AuxStoreWriter, example_id: str, name: str, k: int) -> bool:
  return all((example_id, name, s) in writer for s in range(k))


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
  examples = list(examples)
  check_refused([ex["id"] for ex in examples], refuse_ids, f"aux store writer {store_dir}")
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
  with AuxStoreWriter(store_dir, refuse_ids=refuse_ids, sources=[name]) as w:
    todo = [ex for ex in examples if not _done(w, ex["id"], name, k)]
    skipped += k * (len(examples) - len(todo))
    if not todo:
      return aux_sources.summary(name, store_dir, 0, skipped, [])
    model, params = models.load_pretrained(checkpoint, dtype=jnp.dtype(dtype), compute_dtype=jnp.dtype(dtype))
    proc = processor_lib.load(checkpoint, min_pixels, max_pixels)
    sc = SamplingConfig(k, max_new_tokens, temperature, top_p, top_k, (proc.eos_token_id,), proc.pad_token_id)
    with open(os.path.join(checkpoint, "config.json")) as f:
      model_type = json.load(f).get("model_type", "")
    for b, (batch, n_real) in enumerate(_padded_batches(todo, batch_size)):
      pb = processor_lib.prompt_batch(proc, batch, prompt_buckets, templates)
      rng = jax.random.fold_in(jax.random.key(seed), b)
      out = sc.generate_batch(model, params, pb, rng=rng, prompt_buckets=(pb["input_ids"].shape[1],))
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
              "prompt": aux_sources.prompt_provenance(ex, templates),
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
  return aux_sources.summary(name, store_dir, written, skipped, [])
