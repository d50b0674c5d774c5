"""Sampler tokens/s: ekipl_jax.sampling.generate vs tunix's own JAX sampler (google-tunix 0.1.7), same machine, same
text-only Qwen2 config, same batch / prompt / new-token / sampling settings.

tunix lives in its own venv (.venv-tunix, made by `make bench`; it pins its own jax / flax / transformers), so its
side runs as a subprocess of this file (`--side tunix`) and prints one JSON line. Both sides use random weights (the
speed of a dense decoder does not depend on their values) and never stop early: EOS is disabled on our side and set
to -1 (never sampled) on tunix's, so every row makes exactly `new_tokens` tokens. Our policy runs text-only
(`with_vision=False`); with text-only positions its M-RoPE equals Qwen2's 1D RoPE, so both compute the same model.

Tokens/s = batch * new_tokens / wall time of one sampler call (prefill included, compilation excluded: one warm-up
call first), median over `repeats` calls. tunix's call also tokenises (ints written as text) and detokenises; that
host work is < 1 ms here.

    python experiments/bench_tunix.py                 # both sides; prints a JSON dict (`run(...)` returns it)
    .venv-tunix/bin/python experiments/bench_tunix.py --side tunix
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

import bench_sampler  # experiments/, the script's own folder (stdlib + numpy at import: runs in .venv-tunix too)

TEXT = dict(bench_sampler.TEXT, rope_theta=bench_sampler.ROPE_THETA)  # the text side of its ~40M Qwen2.5-VL config
SAMPLING = dict(temperature=0.9, top_p=0.9, top_k=50)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TUNIX_PYTHON = os.path.join(ROOT, ".venv-tunix", "bin", "python")


def prompts(batch: int, length: int, seed: int = 0) -> np.ndarray:
  """Token ids in [1, 8000): no pad (0) inside a prompt."""
  return np.random.default_rng(seed).integers(1, 8000, (batch, length)).astype(np.int32)


def _timed(call, repeats: int) -> tuple[float, float]:
  """(first call seconds, median of `repeats` further calls)."""
  t = time.perf_counter()
  call(0)
  first = time.perf_counter() - t
  times = []
  for i in range(repeats):
    t = time.perf_counter()
    call(i + 1)
    times.append(time.perf_counter() - t)
  return first, statistics.median(times)


# ------------------------------------------------------------------------------------------------ tunix side


class IntTokenizer:
  """What tunix's TokenizerAdapter asks of a tokenizer: ids written as space-separated integers."""

  def encode(self, text: str, **_) -> list[int]:
    return [int(t) for t in text.split()]

  def decode(self, ids, **_) -> str:
    return " ".join(str(int(i)) for i in ids)

  def bos_id(self):
    return None

  def eos_id(self) -> int:
    return -1

  def pad_id(self) -> int:
    return 0


def tunix_side(batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict:
  import jax
  import jax.numpy as jnp
  import tunix
  from flax import nnx
  from tunix.generate import sampler as sampler_lib
  from tunix.models.qwen2 import model as qwen2

  cfg = qwen2.ModelConfig(
      num_layers=TEXT["num_hidden_layers"],
      vocab_size=TEXT["vocab_size"],
      embed_dim=TEXT["hidden_size"],
      hidden_dim=TEXT["intermediate_size"],
      num_heads=TEXT["num_attention_heads"],
      head_dim=TEXT["hidden_size"] // TEXT["num_attention_heads"],
      num_kv_heads=TEXT["num_key_value_heads"],
      rope_theta=int(TEXT["rope_theta"]),
      norm_eps=TEXT["rms_norm_eps"],
      use_tied_embedding=False,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
  )
  model = qwen2.Qwen2(cfg, rngs=nnx.Rngs(0))
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  cache = sampler_lib.CacheConfig(
      cache_size=prompt_len + new_tokens,
      num_layers=cfg.num_layers,
      num_kv_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim,
  )
  sampler = sampler_lib.Sampler(model, IntTokenizer(), cache)
  texts = [" ".join(map(str, row)) for row in prompts(batch, prompt_len)]

  def call(seed: int):
    out = sampler(
        texts, max_generation_steps=new_tokens, max_prompt_length=prompt_len, eos_tokens=[-1], seed=seed, **SAMPLING
    )
    assert all(len(t) == new_tokens for t in out.tokens), [len(t) for t in out.tokens]

  first, sec = _timed(call, repeats)
  import importlib.metadata as md

  return dict(
      tunix_tokens_per_s=batch * new_tokens / sec,
      tunix_s_per_call=sec,
      tunix_first_call_s=first,
      tunix_params=int(n_params),
      tunix_version=md.version("google-tunix"),
      tunix_jax=jax.__version__,
      tunix_flax=md.version("flax"),
      tunix_devices=str(jax.devices()),
  )


# -------------------------------------------------------------------------------------------------- our side


def ours_side(batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict:
  import jax
  from ekipl_jax import models
  from ekipl_jax.sampling import generate

  hf = dict(
      model_type="qwen2_5_vl",
      tie_word_embeddings=False,
      text_config=dict(
          TEXT, rope_parameters={"rope_type": "default", "rope_theta": TEXT["rope_theta"], "mrope_section": [8, 12, 12]}
      ),
  )
  model, params = models.init(hf, jax.random.key(0), with_vision=False)
  ids = prompts(batch, prompt_len)
  mask = np.ones_like(ids)

  def call(seed: int):
    out = generate(
        model, params, ids, mask, max_new_tokens=new_tokens, eos_token_ids=[], rng=jax.random.key(seed), **SAMPLING
    )
    assert np.asarray(out.tokens).shape == (batch, new_tokens)

  first, sec = _timed(call, repeats)
  return dict(
      ours_tokens_per_s=batch * new_tokens / sec,
      ours_s_per_call=sec,
      ours_first_call_s=first,
      ours_params=int(sum(x.size for x in jax.tree.leaves(params))),
  )


def run(
    batch: int = 16, prompt_len: int = 64, new_tokens: int = 128, repeats: int = 3, tunix_python: str = TUNIX_PYTHON
) -> dict:
  """Both sides and their ratio (ours / tunix). The tunix side runs in `tunix_python`'s venv."""
  res = dict(batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, repeats=repeats, **SAMPLING)
  cmd = [
      tunix_python,
      os.path.abspath(__file__),
      "--side",
      "tunix",
      "--batch",
      str(batch),
      "--prompt_len",
      str(prompt_len),
      "--new_tokens",
      str(new_tokens),
      "--repeats",
      str(repeats),
  ]
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")}
  env["JAX_PLATFORMS"] = os.environ.get("JAX_PLATFORMS", "")
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
  if proc.returncode != 0:
    raise RuntimeError(f"tunix side failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
  res.update(json.loads(proc.stdout.strip().splitlines()[-1]))
  res.update(ours_side(batch, prompt_len, new_tokens, repeats))
  res["ours_over_tunix"] = res["ours_tokens_per_s"] / res["tunix_tokens_per_s"]
  return res


if __name__ == "__main__":
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--side", choices=("both", "tunix", "ours"), default="both")
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--prompt_len", type=int, default=64)
  ap.add_argument("--new_tokens", type=int, default=128)
  ap.add_argument("--repeats", type=int, default=3)
  a = ap.parse_args()
  side = {"both": run, "tunix": tunix_side, "ours": ours_side}[a.side]
  print(json.dumps(side(a.batch, a.prompt_len, a.new_tokens, a.repeats)))
