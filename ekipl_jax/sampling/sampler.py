"""The sampler: one jit prefill of the (bucketed, left-padded) prompts, then a jit decode loop (lax.while_loop that
stops when every row has sampled an EOS) over a preallocated KV cache that is donated between the two.

Legend: B prompts, N = B * num_samples rows, P prompt tokens (bucketed), C = max_new_tokens, S = P + C cache slots,
L layers, K kv heads, Dh head dim, V vocab, Np vision patches (bucketed), 3 = M-RoPE position streams.

    out = generate(model, params, input_ids, attention_mask, pixel_values, image_grid_thw, max_new_tokens=128,
                   temperature=0.9, top_p=0.9, top_k=50, eos_token_ids=[im_end, eot], rng=key, num_samples=8)

Prompts are left padded; they are padded further (on the left) to a length bucket, and each prompt's image patches
are packed into its own row of a patch bucket (models/packed.py), so varying lengths reuse compilations. The prefill
runs the vision tower per prompt row (jax.vmap over rows, the row axis sharded like the batch): its activations and
attention scale with one row's patches times the rows on a chip, never with the whole batch's patches. The 3D
positions and rope deltas are computed host-side (models.rope_index); a generated token n (0-based) of a row sits at
position n_valid + rope_delta + n in all three streams, as in transformers. num_samples > 1 prefills each prompt once
and repeats its cache rows.
Sharding: with `model.mesh` set, inputs are placed batch-sharded and each layer's cache buffer is constrained to
(batch, kv_heads, sequence, head_dim) by the rules in ekipl_jax/sharding.py; params are used as placed.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from ekipl_jax import sharding
from ekipl_jax.data import processor as processor_lib
from ekipl_jax.models import packed as packed_lib
from ekipl_jax.models.model import init_cache, rope_index, vision_config
from ekipl_jax.sampling.sample import SamplingParams, sample_step

CACHE_AXES = ("batch", "kv_heads", "sequence", "head_dim")  # of each layer's (head-major) buffer
DEFAULT_PROMPT_BUCKETS = tuple(16 * 2**i for i in range(13))  # 16 .. 65536


@flax.struct.dataclass
class SampleOutput:
  """Prompt-major rows: rows b*num_samples .. b*num_samples + num_samples - 1 belong to prompt b.

  tokens [N, C] int32: the new tokens; a finished row holds its EOS and then pad_token_id.
  lengths [N] int32: tokens up to and including the first EOS (C when none was sampled).
  logprobs [N, C] float32: log-prob of each token under the distribution actually sampled from (after temperature,
      top-k and top-p, renormalised); 0 for greedy and on padding.
  policy_logprobs [N, C] float32: log_softmax(logits / temperature) at each token (temperature-scaled policy, no
      top-k / top-p truncation; temperature 1 when greedy): the old-policy log-prob the RL loss needs, equal to
      models.token_logprobs(..., temperature=T) on the same tokens. 0 on padding.
  """

  tokens: jax.Array
  lengths: jax.Array
  logprobs: jax.Array
  policy_logprobs: jax.Array


def patch_buckets(unit: int) -> list[int]:
  """Image patches are padded to the merge unit times a power of two (one compilation per power)."""
  return [unit << k for k in range(32)]


def patch_bucket(n: int, unit: int) -> int:
  return processor_lib.pick_bucket(n, patch_buckets(unit))


def _left_pad(x_BP: np.ndarray, to: int, value) -> np.ndarray:
  pad = to - x_BP.shape[-1]
  return np.pad(x_BP, [(0, 0)] * (x_BP.ndim - 1) + [(pad, 0)], constant_values=value) if pad else x_BP


# ------------------------------------------------------------------------------------------- jitted pieces


def _prefill(
    model,
    sp: SamplingParams,
    C: int,
    num_samples: int,
    eos: tuple[int, ...],
    pad_id: int,
    params,
    ids_BP,
    mask_BP,
    pos_3BP,
    first_pos_B,
    packed,
    rng,
):
  """Prompt -> decode state with the first new token sampled (column 0). packed: the prompts' row-packed images
  (models/packed.py PACKED_KEYS, leading axis B) or None."""
  B, P = ids_BP.shape
  N, S = B * num_samples, P + C
  x_BPD = packed_lib.embed_rows(model, params, ids_BP, pos_3BP, packed)
  key_mask_BS = jnp.concatenate([mask_BP.astype(jnp.int32), jnp.ones((B, C), jnp.int32)], axis=1)
  cache = init_cache(model.config, B, S, model.dtype, per_layer=True)
  cache = jax.tree.map(lambda c: sharding.constrain(c, CACHE_AXES, model.mesh, model.rules), cache)
  h_BPD, cache = model.apply(params, x_BPD, pos_3BP, key_mask_BS, cache=cache, cache_index=0, method="decode")
  logits_BV = model.apply(params, h_BPD[:, -1:], method="unembed")[:, 0]
  rep = lambda a, axis=0: jnp.repeat(a, num_samples, axis=axis) if num_samples > 1 else a
  cache = jax.tree.map(lambda c: sharding.constrain(rep(c), CACHE_AXES, model.mesh, model.rules), cache)
  logits_NV = rep(logits_BV)
  rng, key = jax.random.split(rng)
  tok_N, logp_N, plogp_N = sample_step(logits_NV, key, sp)
  done_N = jnp.isin(tok_N, jnp.asarray(eos, jnp.int32))
  col = lambda v, dtype: jnp.zeros((N, C), dtype).at[:, 0].set(v)
  return dict(
      cache=cache,
      key_mask=rep(key_mask_BS),
      token=tok_N,
      pos=rep(first_pos_B),
      step=jnp.int32(0),
      done=done_N,
      lengths=jnp.ones((N,), jnp.int32),
      tokens=col(tok_N, jnp.int32).at[:, 1:].set(pad_id),
      logprobs=col(logp_N, jnp.float32),
      policy_logprobs=col(plogp_N, jnp.float32),
      rng=rng,
  )


def _decode(model, sp: SamplingParams, C: int, eos: tuple[int, ...], pad_id: int, P: int, params, cache, state):
  """Decode columns 1 .. C-1 (stopping early once all rows are done) -> (SampleOutput, cache). The cache is
  donated and returned (so its buffer is updated in place, not copied); the caller drops it."""
  eos_ids = jnp.asarray(eos, jnp.int32)

  def cond(s):
    return jnp.logical_and(s["step"] < C - 1, jnp.logical_not(jnp.all(s["done"])))

  def body(s):
    j = s["step"]  # the token of column j is fed at slot P + j, position pos + j
    pos_3N1 = jnp.broadcast_to((s["pos"] + j)[None, :, None], (3, s["pos"].shape[0], 1))
    x_N1D, _, _ = model.apply(params, s["token"][:, None], positions=pos_3N1, method="embed")
    h_N1D, cache = model.apply(
        params, x_N1D, pos_3N1, s["key_mask"], cache=s["cache"], cache_index=P + j, method="decode"
    )
    logits_NV = model.apply(params, h_N1D, method="unembed")[:, 0]
    rng, key = jax.random.split(s["rng"])
    tok_N, logp_N, plogp_N = sample_step(logits_NV, key, sp)
    live_N = jnp.logical_not(s["done"])
    tok_N = jnp.where(live_N, tok_N, pad_id)
    put = lambda buf, v: jax.lax.dynamic_update_slice_in_dim(buf, v[:, None].astype(buf.dtype), j + 1, axis=1)
    zero = jnp.zeros_like(logp_N)
    return dict(
        cache=cache,
        key_mask=s["key_mask"],
        token=tok_N,
        pos=s["pos"],
        step=j + 1,
        done=jnp.logical_or(s["done"], jnp.isin(tok_N, eos_ids)),
        lengths=s["lengths"] + live_N.astype(jnp.int32),
        tokens=put(s["tokens"], tok_N),
        logprobs=put(s["logprobs"], jnp.where(live_N, logp_N, zero)),
        policy_logprobs=put(s["policy_logprobs"], jnp.where(live_N, plogp_N, zero)),
        rng=rng,
    )

  s = jax.lax.while_loop(cond, body, dict(state, cache=cache))
  return (
      SampleOutput(
          tokens=s["tokens"], lengths=s["lengths"], logprobs=s["logprobs"], policy_logprobs=s["policy_logprobs"]
      ),
      s["cache"],
  )


_JITTED: dict[tuple, tuple[Any, Any, Any]] = {}


def programs(model, sp, C, num_samples, eos, pad_id, P):
  """(prefill, decode): the jit objects per (model, static settings), cached; their own caches key on shapes.
  experiments/aot.py lowers these same objects for a TPU topology."""
  key = (id(model), sp, C, num_samples, eos, pad_id, P)
  hit = _JITTED.get(key)
  if hit is not None and hit[0] is model:
    return hit[1], hit[2]
  prefill = jax.jit(functools.partial(_prefill, model, sp, C, num_samples, eos, pad_id))
  decode = jax.jit(functools.partial(_decode, model, sp, C, eos, pad_id, P), donate_argnums=(1,))
  _JITTED[key] = (model, prefill, decode)
  return prefill, decode


@contextlib.contextmanager
def count_compilations():
  """`with count_compilations() as n: ...` then n[0] = XLA compilations (jit cache misses) inside the block."""
  counter = [0]

  def listener(event: str, duration: float, **kwargs) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
      counter[0] += 1

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield counter
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


# --------------------------------------------------------------------------------------------- entry point


def prepare_prompts(
    model,
    input_ids,
    attention_mask,
    pixel_values=None,
    image_grid_thw=None,
    prompt_buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS,
):
  """Host side: bucket + left pad, 3D positions, first decode positions, and the images packed per prompt row
  (models/packed.py; None without images). A row's images are the next ones in image_grid_thw's order whose tokens
  make up its image pad tokens."""
  c = model.config
  ids_BT = np.asarray(input_ids)
  mask_BT = np.ones_like(ids_BT) if attention_mask is None else np.asarray(attention_mask)
  if mask_BT[:, -1].min() == 0:
    raise ValueError("prompts must be left padded (attention_mask[:, -1] == 1 for every row)")
  P = processor_lib.pick_bucket(ids_BT.shape[1], prompt_buckets)
  ids_BP = _left_pad(ids_BT, P, 0).astype(np.int32)
  mask_BP = _left_pad(mask_BT, P, 0).astype(np.int32)
  pos_3BP, deltas_B = rope_index(c, ids_BP, mask_BP, image_grid_thw)
  first_pos_B = (mask_BP.sum(1) + np.asarray(deltas_B)).astype(np.int32)
  packed = None
  if pixel_values is not None:
    u = vision_config(c).merge_unit
    grid = np.asarray(image_grid_thw).reshape(-1, 3)
    per_row = images_per_row(ids_BP == c.image_token_id, grid.prod(-1) // u)
    packed = packed_lib.pack_rows(model, pixel_values, grid, per_row, patch_buckets(u))
  return ids_BP, mask_BP, np.asarray(pos_3BP, np.int32), first_pos_B, packed


def images_per_row(is_img_BP: np.ndarray, tokens_I: np.ndarray) -> list[int]:
  """How many of the images (in order; tokens_I image pad tokens each) each row's image pad tokens hold."""
  out, i = [], 0
  for r, n in enumerate(is_img_BP.sum(1).tolist()):
    start = i
    while n > 0 and i < len(tokens_I):
      n, i = n - int(tokens_I[i]), i + 1
    if n != 0:
      raise ValueError(
          f"prompt row {r}: its image pad tokens do not match the images of image_grid_thw in order "
          f"(images {start}..{i - 1} hold {int(np.sum(tokens_I[start:i]))} tokens, the row {int(is_img_BP[r].sum())})"
      )
    out.append(i - start)
  if i != len(tokens_I):
    raise ValueError(f"image_grid_thw has {len(tokens_I)} images, the prompts' image pad tokens hold {i}")
  return out


def _place(model, x, axes):
  if x is None or model.mesh is None:
    return x
  return jax.device_put(x, sharding.logical_sharding(axes, model.mesh, model.rules, np.shape(x)))


def generate(
    model,
    params,
    input_ids,
    attention_mask,
    pixel_values=None,
    image_grid_thw=None,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_token_ids: Sequence[int],
    rng: jax.Array,
    num_samples: int = 1,
    pad_token_id: int = 0,
    prompt_buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS,
) -> SampleOutput:
  """Sample max_new_tokens (at most) per row; see SampleOutput for the fields and the module doc for the rest."""
  sp = SamplingParams(float(temperature), float(top_p), int(top_k))
  eos = tuple(sorted({int(e) for e in eos_token_ids}))
  ids_BP, mask_BP, pos_3BP, first_pos_B, packed = prepare_prompts(
      model, input_ids, attention_mask, pixel_values, image_grid_thw, prompt_buckets
  )
  P = ids_BP.shape[1]
  prefill, decode = programs(model, sp, int(max_new_tokens), int(num_samples), eos, int(pad_token_id), P)
  state = prefill(
      params,
      _place(model, ids_BP, ("batch", "sequence")),
      _place(model, mask_BP, ("batch", "sequence")),
      _place(model, pos_3BP, (None, "batch", "sequence")),
      _place(model, first_pos_B, ("batch",)),
      None if packed is None else {k: _place(model, v, ("batch",) + (None,) * (v.ndim - 1)) for k, v in packed.items()},
      rng,
  )
  cache = state.pop("cache")
  out, _ = decode(params, cache, state)
  return out
