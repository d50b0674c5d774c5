"""Sampler throughput: ekipl_jax.sampling.generate vs transformers `generate` (torch), same weights, same machine.

A ~40M-parameter Qwen2.5-VL (text: hidden 512, 8 layers, 8 heads, 2 kv heads, mlp 1536, vocab 8192; a 2-block
vision tower) is built by transformers with a fixed seed and saved; both sides load that folder, in the same dtype
(float32, then bfloat16). Batch 16 text prompts of 64 tokens, 128 new tokens, sampling (temperature 0.9, top-p 0.9,
top-k 50) with EOS disabled so every row makes exactly 128 tokens. Tokens/s = batch * new tokens / wall time of one
call (prefill included), median over `repeats` calls after one warm-up call (compilation excluded).

Also measured, to explain the ratio:
  - our prefill alone (a call with max_new_tokens=1) and so our decode step;
  - the decode step's weight matmuls alone, at the same batch, on both sides (`matmul_chain_*`): per layer
    q/k/v/o and gate/up/down, then the lm head, chained as in the model, as a jit loop (ours) or eager torch
    (`F.linear`). They bound what any sampler built on that GEMM can reach: ours can be at most
    hf_s_per_call / (prefill + (new_tokens - 1) * matmul chain) faster than transformers here (`speedup_bound`);
  - our cached attention alone (`attention_chain_ours`: cache writes + attention of every layer, the sampler's own
    functions, as a jit loop), and the bound with it added to the matmuls (`speedup_bound_with_attention`);
  - XLA compilations during calls with other prompt lengths after warm-up (same length bucket: expected 0).

    python experiments/bench_sampler.py [--repeats 3] [--dtypes float32,bfloat16]   # prints a JSON dict
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import tempfile
import time

import numpy as np

# The text side, shared with bench_tunix.py and bench_update.py (same sizes on every side of every comparison).
TEXT = dict(
    vocab_size=8192,
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
)
ROPE_THETA = 1e6
CONFIG = dict(
    text_config=dict(
        TEXT,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA, "mrope_section": [8, 12, 12]},
    ),
    vision_config=dict(
        depth=2,
        hidden_size=128,
        out_hidden_size=512,
        intermediate_size=256,
        num_heads=4,
        patch_size=14,
        temporal_patch_size=2,
        spatial_merge_size=2,
        in_channels=3,
        window_size=112,
        fullatt_block_indexes=[1],
        tokens_per_second=2,
    ),
    image_token_id=8000,
    video_token_id=8001,
    vision_start_token_id=8002,
    vision_end_token_id=8003,
    tie_word_embeddings=False,
)


def save_model(out_dir: str, seed: int = 0) -> str:
  import torch
  import transformers

  config = transformers.Qwen2_5_VLConfig(**CONFIG)
  torch.manual_seed(seed)
  model = transformers.Qwen2_5_VLForConditionalGeneration(config).to(torch.float32).eval()
  path = os.path.join(out_dir, "qwen2_5_vl_40m")
  model.save_pretrained(path)
  return path


def _prompts(batch: int, length: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  ids = np.random.default_rng(seed).integers(0, 7999, (batch, length)).astype(np.int64)
  return ids, np.ones_like(ids)


def _median_time(fn, repeats: int) -> float:
  fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def matmul_chain_ours(params, batch: int, steps: int = 32, repeats: int = 3) -> float:
  """Seconds per decode step of the model's weight matmuls alone (jit loop, operands in the params' dtype,
  float32 accumulation as in models.decoder.Dense)."""
  import jax
  import jax.numpy as jnp
  from ekipl_jax.models.decoder import dot_f32

  p = params["params"]
  names = sorted((k for k in p if k.startswith("layers_")), key=lambda k: int(k.split("_")[1]))
  layers = [
      tuple(
          p[n][m][w]["kernel"]
          for m, w in [
              ("self_attn", "q_proj"),
              ("self_attn", "k_proj"),
              ("self_attn", "v_proj"),
              ("self_attn", "o_proj"),
              ("mlp", "gate_proj"),
              ("mlp", "up_proj"),
              ("mlp", "down_proj"),
          ]
      )
      for n in names
  ]
  head = p["lm_head"]["kernel"] if "lm_head" in p else p["embed_tokens"]["embedding"].T

  def mm(x, w):
    return dot_f32(x.astype(w.dtype), w, (((1,), (0,)), ((), ())))

  @jax.jit
  def run(layers, head, x_BD):
    def step(_, x_BD):
      for q, k, v, o, g, u, d in layers:
        kv = jnp.mean(mm(x_BD, k), 1, keepdims=True) + jnp.mean(mm(x_BD, v), 1, keepdims=True)
        x_BD = x_BD + 1e-3 * (mm(mm(x_BD, q), o) + kv)
        x_BD = x_BD + 1e-3 * mm(jax.nn.silu(mm(x_BD, g)) * mm(x_BD, u), d)
      return x_BD + 1e-6 * jnp.mean(mm(x_BD, head), 1, keepdims=True)

    return jax.lax.fori_loop(0, steps, step, x_BD)

  x_BD = jnp.ones((batch, head.shape[0]), jnp.float32)
  return _median_time(lambda: run(layers, head, x_BD).block_until_ready(), repeats) / steps


def attention_chain_ours(model, batch: int, prompt_len: int, new_tokens: int, repeats: int = 3) -> float:
  """Seconds per decode step of the cached attention alone, averaged over the decode: per layer, write one key and
  value into the [B, K, S, Dh] cache buffers and attend to them (models.decoder.write_cache / _attend_cached, the
  sampler's own code), for steps 0 .. new_tokens - 2 at slots prompt_len + step, as a jit loop."""
  import jax
  import jax.numpy as jnp
  from ekipl_jax.models import decoder

  c, dt = model.config, model.dtype
  K, G, Dh, S = c.num_kv_heads, c.num_heads // c.num_kv_heads, c.head_dim, prompt_len + new_tokens
  steps = new_tokens - 1

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def run(ks, vs, q_BKGTDh, new_CBKTDh):
    def step(j, carry):
      ks, vs, q_BKGTDh = carry
      ks, vs = list(ks), list(vs)
      mask_BTS = decoder.attention_mask(jnp.ones((batch, S), jnp.int32), 1, prompt_len + j)
      new_BKTDh = new_CBKTDh[j]  # the step's new key / value, as the projections hand them over
      for i in range(c.num_layers):
        ks[i] = decoder.write_cache(ks[i], new_BKTDh, prompt_len + j)
        vs[i] = decoder.write_cache(vs[i], new_BKTDh, prompt_len + j)
        out = decoder._attend_cached(q_BKGTDh, ks[i], vs[i], mask_BTS, dt)
        q_BKGTDh = q_BKGTDh + 1e-3 * out.astype(q_BKGTDh.dtype)
      return tuple(ks), tuple(vs), q_BKGTDh

    return jax.lax.fori_loop(0, steps, step, (ks, vs, q_BKGTDh))

  def call():
    key = jax.random.key(0)
    ks = tuple(jax.random.normal(jax.random.fold_in(key, i), (batch, K, S, Dh), dt) for i in range(c.num_layers))
    vs = tuple(
        jax.random.normal(jax.random.fold_in(key, c.num_layers + i), (batch, K, S, Dh), dt) for i in range(c.num_layers)
    )
    new_CBKTDh = jax.random.normal(key, (steps, batch, K, 1, Dh), dt)
    jax.block_until_ready((ks, vs, new_CBKTDh))
    t = time.perf_counter()
    jax.block_until_ready(run(ks, vs, jnp.ones((batch, K, G, 1, Dh), dt), new_CBKTDh))
    return time.perf_counter() - t

  call()
  return statistics.median(call() for _ in range(repeats)) / steps


def matmul_chain_torch(model, batch: int, steps: int = 32, repeats: int = 3) -> float:
  """The same chain with transformers' weights through `F.linear` (what its nn.Linear layers call), eager."""
  import torch

  F = torch.nn.functional
  lm = model.model.language_model
  dtype = model.lm_head.weight.dtype

  def run():
    x = torch.ones(batch, lm.config.hidden_size, dtype=dtype)
    for _ in range(steps):
      for layer in lm.layers:
        a, m = layer.self_attn, layer.mlp
        kv = F.linear(x, a.k_proj.weight).mean(1, keepdim=True) + F.linear(x, a.v_proj.weight).mean(1, keepdim=True)
        x = x + 1e-3 * (F.linear(F.linear(x, a.q_proj.weight), a.o_proj.weight) + kv)
        x = x + 1e-3 * F.linear(
            F.silu(F.linear(x, m.gate_proj.weight)) * F.linear(x, m.up_proj.weight), m.down_proj.weight
        )
      x = x + 1e-6 * F.linear(x, model.lm_head.weight).mean(1, keepdim=True)
    return x

  with torch.inference_mode():
    return _median_time(run, repeats) / steps


def bench_ours(path: str, ids, mask, new_tokens: int, repeats: int, sampling: dict, dtype: str) -> dict:
  import jax
  import jax.numpy as jnp
  from ekipl_jax.models.hf_checkpoint import load_pretrained
  from ekipl_jax.sampling import generate
  from ekipl_jax.sampling.sampler import count_compilations

  model, params = load_pretrained(path, dtype=jnp.dtype(dtype))
  n_params = sum(x.size for x in jax.tree.leaves(params))

  def call(ids_, mask_, seed, n=new_tokens):
    out = generate(model, params, ids_, mask_, max_new_tokens=n, eos_token_ids=[], rng=jax.random.key(seed), **sampling)
    return np.asarray(out.tokens)

  t = time.perf_counter()
  tokens = call(ids, mask, 0)
  warm_s = time.perf_counter() - t
  assert tokens.shape == (ids.shape[0], new_tokens)
  seeds = iter(range(1, 10**6))
  sec = _median_time(lambda: call(ids, mask, next(seeds)), repeats)
  prefill = _median_time(lambda: call(ids, mask, next(seeds), 1), repeats)
  with count_compilations() as n:
    for length in (40, 50, 57, 63):
      call(*_prompts(ids.shape[0], length, length), length)
  return dict(
      ours_tokens_per_s=ids.shape[0] * new_tokens / sec,
      ours_s_per_call=sec,
      ours_first_call_s=warm_s,
      ours_prefill_s=prefill,
      ours_decode_step_s=(sec - prefill) / max(new_tokens - 1, 1),
      ours_matmul_chain_s=matmul_chain_ours(params, ids.shape[0]),
      ours_attention_s=attention_chain_ours(model, ids.shape[0], ids.shape[1], new_tokens),
      ours_compilations_after_warmup=n[0],
      params=int(n_params),
      jax_devices=str(jax.devices()),
  )


def bench_transformers(path: str, ids, mask, new_tokens: int, repeats: int, sampling: dict, dtype: str) -> dict:
  import torch
  import transformers

  model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
      path, dtype=getattr(torch, dtype), attn_implementation="sdpa"
  ).eval()
  model.generation_config.eos_token_id = None
  model.generation_config.pad_token_id = 0
  kw = dict(
      max_new_tokens=new_tokens,
      min_new_tokens=new_tokens,
      do_sample=True,
      eos_token_id=None,
      pad_token_id=0,
      **sampling,
  )
  ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
  out = []

  def call():
    with torch.inference_mode():
      out.append(model.generate(input_ids=ids_t, attention_mask=mask_t, **kw))

  torch.manual_seed(0)
  sec = _median_time(call, repeats)
  assert out[-1].shape == (ids.shape[0], ids.shape[1] + new_tokens), out[-1].shape
  return dict(
      hf_tokens_per_s=ids.shape[0] * new_tokens / sec,
      hf_s_per_call=sec,
      hf_step_s=sec / new_tokens,
      hf_matmul_chain_s=matmul_chain_torch(model, ids.shape[0]),
      torch_threads=torch.get_num_threads(),
      transformers=transformers.__version__,
  )


def run(
    batch: int = 16,
    prompt_len: int = 64,
    new_tokens: int = 128,
    repeats: int = 3,
    seed: int = 0,
    dtypes: tuple[str, ...] = ("float32", "bfloat16"),
    model_dir: str | None = None,
) -> dict:
  """Per dtype: both figures, their ratio (ours / transformers), the matmul-chain figures and the bound they set;
  the float32 ratio is also `speedup`."""
  sampling = dict(temperature=0.9, top_p=0.9, top_k=50)
  ids, mask = _prompts(batch, prompt_len, seed)
  res = dict(batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, repeats=repeats, **sampling)
  with tempfile.TemporaryDirectory() as tmp:
    path = save_model(model_dir or tmp, seed)
    for dtype in dtypes:
      r = bench_transformers(path, ids, mask, new_tokens, repeats, sampling, dtype)
      r.update(bench_ours(path, ids, mask, new_tokens, repeats, sampling, dtype))
      r["speedup"] = r["ours_tokens_per_s"] / r["hf_tokens_per_s"]
      r["speedup_bound"] = r["hf_s_per_call"] / (r["ours_prefill_s"] + (new_tokens - 1) * r["ours_matmul_chain_s"])
      r["speedup_bound_with_attention"] = r["hf_s_per_call"] / (
          r["ours_prefill_s"] + (new_tokens - 1) * (r["ours_matmul_chain_s"] + r["ours_attention_s"])
      )
      res[dtype] = r
  res["speedup"] = res[dtypes[0]]["speedup"]
  res["ours_compilations_after_warmup"] = max(res[d]["ours_compilations_after_warmup"] for d in dtypes)
  print(json.dumps(res, indent=1))
  return res


if __name__ == "__main__":
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--prompt_len", type=int, default=64)
  ap.add_argument("--new_tokens", type=int, default=128)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--dtypes", default="float32,bfloat16")
  a = ap.parse_args()
  run(a.batch, a.prompt_len, a.new_tokens, a.repeats, dtypes=tuple(a.dtypes.split(",")))
