"""The GRPO update step: achieved FLOP/s against the machine's peak, peak memory against an analytic estimate (and
what remat and chunked log-probs save), compilations after warm-up across prompt lengths.

The step is the trainer's: `update.make_train_step(rl_stages.make_logprob_fn(model, P, chunk), optimizer, cfg.rl)` on
a row batch from `train.batching.rows_batch` (B rows of P prompt + C completion tokens), default rl config (AdamW,
grad clip, beta 0.04 with ref_logp given, mu 1, one micro-batch), text-only policy.

FLOPs, counted analytically (matmul FLOPs only; a multiply-add is 2 FLOPs; backward = 2x forward):
  per token, forward: 2 * N_dense       (N_dense: the decoder's matmul weights, embeddings and lm head excluded)
  attention, forward: 2 * 2 * L * B * T * T * D   (QK^T and PV over the full T x T square as computed, mask applied)
  lm head,   forward: 2 * B * C * D * V           (only the C completion positions are unembedded)
  step = 3 * (forward)  [+ 1 extra forward of the decoder when remat recomputes it]
Cross-checked against XLA's `compiled.cost_analysis()["flops"]` (which also counts elementwise work).

Peak memory, measured: XLA's `compiled.memory_analysis()` (argument + output + temp - aliased, i.e. the buffers the
step holds at once with the donated state updated in place). Analytic estimate: params + grads + AdamW mu, nu (4 x
params, f32) + the batch + activations saved for the backward pass (without remat, per layer: the layer's inputs and
intermediates that reverse mode keeps; with remat only each layer's input) + the log-prob logits (full [B, C, V] or one
[B, K, V] chunk, f32, a few copies).

    python experiments/bench_update.py        # prints a JSON dict; `run(...)` returns it
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import bench_sampler  # experiments/, the script's own folder
from ekipl_jax import models
from ekipl_jax.rl import batch as rl_batch
from ekipl_jax.rl import config as rl_config
from ekipl_jax.rl import update
from ekipl_jax.sampling.sampler import count_compilations
from ekipl_jax.train import batching
from ekipl_jax.train import rl_stages

TEXT = bench_sampler.TEXT  # the text side of the ~40M Qwen2.5-VL bench config
TOY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
)

# Dense bf16 / f32 matmul peaks (FLOP/s) of known accelerators, by jax `device_kind` substring.
KNOWN_PEAKS = {
    "H100": (989e12, 67e12),
    "H200": (989e12, 67e12),
    "A100": (312e12, 19.5e12),
    "TPU v4": (275e12, 275e12 / 4),
    "TPU v5 lite": (197e12, 197e12 / 4),
    "TPU v5p": (459e12, 459e12 / 4),
    "TPU v6": (918e12, 918e12 / 4),
}


def hf_config(text: dict) -> dict:
  half = text["hidden_size"] // text["num_attention_heads"] // 2
  section = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
  return dict(
      model_type="qwen2_5_vl",
      tie_word_embeddings=False,
      text_config=dict(
          text,
          rope_parameters={"rope_type": "default", "rope_theta": bench_sampler.ROPE_THETA, "mrope_section": section},
      ),
  )


def matmul_peak(n: int = 2048, repeats: int = 10, dtype=jnp.float32) -> dict:
  """Best-of-`repeats` FLOP/s of one jitted n x n @ n x n product (2 n^3 FLOPs)."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  f = jax.jit(jnp.dot)
  f(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return dict(matmul_n=n, matmul_dtype=jnp.dtype(dtype).name, matmul_peak_flops=2 * n**3 / best)


def device_peak() -> tuple[str, float | None]:
  """(device kind, known f32 matmul peak or None: then the measured matmul peak is the reference)."""
  kind = jax.devices()[0].device_kind
  for name, (_, f32) in KNOWN_PEAKS.items():
    if name.lower() in kind.lower():
      return kind, f32
  return kind, None


def make_batch(model, B: int, P: int, C: int, prompt_len: int | None = None, seed: int = 0) -> rl_batch.UpdateBatch:
  """Rows of `prompt_len` real prompt tokens left padded to P, then C completion tokens (all real)."""
  rng = np.random.default_rng(seed)
  n = P if prompt_len is None else prompt_len
  prompt_ids_BP = np.zeros((B, P), np.int32)
  prompt_mask_BP = np.zeros((B, P), np.int32)
  prompt_ids_BP[:, P - n :] = rng.integers(1, model.config.vocab_size - 1, (B, n))
  prompt_mask_BP[:, P - n :] = 1
  completion_BC = rng.integers(1, model.config.vocab_size - 1, (B, C)).astype(np.int32)
  rows = batching.rows_batch(model, prompt_ids_BP, prompt_mask_BP, completion_BC, np.ones((B, C), np.int32))
  batch = rl_batch.from_rows(
      rows,
      A_R=rng.normal(size=B).astype(np.float32),
      is_external_R=np.zeros(B, bool),
      ref_logp_RC=np.log(rng.uniform(1e-4, 1e-3, (B, C))).astype(np.float32),
  )
  return jax.tree.map(jnp.asarray, batch)


def build(text: dict, B: int, P: int, C: int, remat: bool, chunk: int):
  """(jitted step, state, batch, model) for one setting."""
  model, params = models.init(hf_config(text), jax.random.key(0), remat=remat, with_vision=False)
  cfg = rl_config.default()
  opt = update.make_optimizer(cfg.optimizer)
  step = update.make_train_step(rl_stages.make_logprob_fn(model, P, chunk), opt, cfg)
  return step, update.init_state(params, opt), make_batch(model, B, P, C), model


def analytic_flops(text: dict, n_dense: int, B: int, P: int, C: int, remat: bool) -> dict:
  D, L, V = text["hidden_size"], text["num_hidden_layers"], text["vocab_size"]
  T = P + C
  fwd_dense = 2 * n_dense * B * T
  fwd_attn = 2 * 2 * L * B * T * T * D
  fwd_head = 2 * B * C * D * V
  step = 3 * (fwd_dense + fwd_attn + fwd_head) + (fwd_dense + fwd_attn if remat else 0)
  return dict(flops_dense_fwd=fwd_dense, flops_attention_fwd=fwd_attn, flops_lm_head_fwd=fwd_head, flops_analytic=step)


def analytic_memory(text: dict, n_params: int, B: int, P: int, C: int, remat: bool, chunk: int) -> dict:
  """Bytes (f32 everywhere), see the module docstring."""
  D, L, V, F = text["hidden_size"], text["num_hidden_layers"], text["vocab_size"], text["intermediate_size"]
  H, K = text["num_attention_heads"], text["num_key_value_heads"]
  Dh, T, f32 = D // H, P + C, 4
  state = 4 * n_params * f32  # params, grads, AdamW mu and nu
  batch = B * T * (3 + 2) * 4 + B * C * 2 * f32  # ids, mask, positions; mask, ref_logp
  # per layer, kept for reverse mode: 2 norms in/out (4 x BTD), q, o (2 x BTD), k, v (2 x BTKDh), scores + probs
  # (2 x BHTT), gate, up, silu*up (3 x BTF)
  per_layer = B * T * (6 * D + 2 * K * Dh + 3 * F) + 2 * B * H * T * T
  act = L * B * T * D + (per_layer if remat else L * per_layer)  # remat: layer inputs + one layer recomputed
  K_ = min(chunk, C)
  logits = 3 * B * K_ * V  # logits, exp, their cotangent of one chunk
  return dict(
      mem_state_bytes=state,
      mem_activation_bytes=act * f32,
      mem_logits_bytes=logits * f32,
      mem_analytic_bytes=state + batch + (act + logits) * f32,
  )


def compiled_stats(step, state, batch) -> dict:
  t = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  peak = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
  return dict(
      compile_s=compile_s,
      flops_xla=float(cost.get("flops", float("nan"))),
      mem_xla_bytes=int(peak),
      mem_xla_temp_bytes=int(mem.temp_size_in_bytes),
      mem_xla_argument_bytes=int(mem.argument_size_in_bytes),
  )


def time_step(step, state, batch, repeats: int) -> tuple[float, float]:
  """(first call seconds incl. compile, median of `repeats` further calls)."""
  t = time.perf_counter()
  state, m = step(state, batch)
  jax.block_until_ready(m)
  first = time.perf_counter() - t
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready((state, m))
    times.append(time.perf_counter() - t)
  return first, statistics.median(times)


def compilations_after_warmup(text: dict, B: int, P: int, C: int, lengths=(3, 5, 7)) -> int:
  """Warm up on full-length prompts, then count compilations over prompts of other real lengths, left padded to the
  same bucket P (what the trainer does); expected 0."""
  step, state, batch, model = build(text, B, P, C, remat=False, chunk=C)
  state, m = step(state, batch)
  jax.block_until_ready(m)
  with count_compilations() as n:
    for i, length in enumerate(lengths):
      state, m = step(state, make_batch(model, B, P, C, prompt_len=min(length, P), seed=i + 1))
      jax.block_until_ready(m)
  return n[0]


def run(
    text: dict = TEXT,
    B: int = 16,
    P: int = 256,
    C: int = 256,
    chunk: int = 128,
    repeats: int = 2,
    matmul_n: int = 2048,
    memory_variants: bool = True,
    toy: dict = TOY,
) -> dict:
  res = dict(B=B, P=P, C=C, chunk=chunk, repeats=repeats, **matmul_peak(matmul_n))
  res["device_kind"], res["device_peak_flops"] = device_peak()
  step, state, batch, _ = build(text, B, P, C, remat=False, chunk=chunk)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  n_embed = 2 * text["vocab_size"] * text["hidden_size"]
  n_norms = (2 * text["num_hidden_layers"] + 1) * text["hidden_size"]
  res.update(params=int(n_params), params_dense=int(n_params - n_embed - n_norms))
  res.update(analytic_flops(text, res["params_dense"], B, P, C, remat=False))
  res.update(compiled_stats(step, state, batch))
  res.update(analytic_memory(text, n_params, B, P, C, remat=False, chunk=chunk))
  res["first_call_s"], res["step_s"] = time_step(step, state, batch, repeats)
  res["achieved_flops"] = res["flops_analytic"] / res["step_s"]
  res["mfu_vs_matmul_peak"] = res["achieved_flops"] / res["matmul_peak_flops"]
  if res["device_peak_flops"]:
    res["mfu_vs_device_peak"] = res["achieved_flops"] / res["device_peak_flops"]
  del step, state, batch
  if memory_variants:  # compile only: what remat and chunked log-probs do to the peak
    variants = {}
    for remat in (False, True):
      for ch in (chunk, C):
        step, state, batch, _ = build(text, B, P, C, remat=remat, chunk=ch)
        stats = compiled_stats(step, state, batch)
        est = analytic_memory(text, n_params, B, P, C, remat=remat, chunk=ch)
        variants[f"remat={remat},chunk={ch}"] = dict(
            mem_xla_bytes=stats["mem_xla_bytes"],
            mem_analytic_bytes=est["mem_analytic_bytes"],
            flops_xla=stats["flops_xla"],
            flops_analytic=analytic_flops(text, res["params_dense"], B, P, C, remat)["flops_analytic"],
        )
    res["memory_variants"] = variants
  res["compilations_after_warmup"] = compilations_after_warmup(toy, B=4, P=8, C=8)
  return res


if __name__ == "__main__":
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--B", type=int, default=16)
  ap.add_argument("--P", type=int, default=256)
  ap.add_argument("--C", type=int, default=256)
  ap.add_argument("--repeats", type=int, default=2)
  a = ap.parse_args()
  print(json.dumps(run(B=a.B, P=a.P, C=a.C, repeats=a.repeats), indent=1))
