"""`QwenVL`: the policy as one Flax module for both families: embed (vision features at the image pad tokens), decode
(with an optional KV cache), unembed.

Legend: B batch, T tokens, S cache slots, D width, V vocab, N vision patches, M merged vision tokens, L layers,
K kv heads, Dh head dim, 3 = M-RoPE position streams.

Static (changing them recompiles): the config, dtype / param_dtype / remat / mesh, and array shapes (B, T, S, N).
Values (no recompile): token ids, masks, pixel values, positions, cache contents and `cache_index`.
`image_grid_thw` is host data: the vision tower and the 3D positions are derived from it in numpy outside jit. Under
jit, pass `positions` (from `models.rope_index`) and `vision_metadata` (from `vision.vision_metadata`) explicitly;
text-only positions (and image positions, given a traced `image_grid_thw`) are computed in-graph otherwise.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ekipl_jax import sharding
from ekipl_jax.models import rope, vision
from ekipl_jax.models.config import QwenVLConfig, as_config
from ekipl_jax.models.decoder import Dense, DecoderLayer, RMSNorm, attention_mask, dot_f32_lean_grads

Array = Any


def _concrete(*xs) -> bool:
  return not any(isinstance(x, jax.core.Tracer) for x in xs if x is not None)


def rope_index(config: QwenVLConfig, input_ids, attention_mask=None, image_grid_thw=None, mm_token_type_ids=None):
  """positions_3BT, rope_deltas_B: host numpy when the inputs are concrete, in-graph jnp when traced."""
  xp = np if _concrete(input_ids, attention_mask, image_grid_thw, mm_token_type_ids) else jnp
  ids = xp.asarray(input_ids)
  mask = xp.ones(ids.shape, xp.int32) if attention_mask is None else xp.asarray(attention_mask)
  is_img = ids == config.image_token_id if mm_token_type_ids is None else xp.asarray(mm_token_type_ids) == 1
  grid = None if image_grid_thw is None else xp.asarray(image_grid_thw).reshape(-1, 3)
  return rope.mrope_positions(xp, is_img, mask, grid, config.spatial_merge_size)


def vision_config(config: QwenVLConfig) -> vision.VisionConfig:
  return vision.VisionConfig.from_hf(config.vision_hf, config.model_type, out_hidden_size=config.hidden_size)


def place_features(x_RTD, is_img_RT, feats_RMD):
  """x_RTD with row r's image positions (is_img_RT, in order) holding feats_RMD[r, 0], feats_RMD[r, 1], ..."""
  rank_RT = jnp.clip(jnp.cumsum(is_img_RT.astype(jnp.int32), axis=1) - 1, 0, feats_RMD.shape[1] - 1)
  gathered_RTD = jnp.take_along_axis(feats_RMD, rank_RT[..., None], axis=1)
  return jnp.where(is_img_RT[..., None], gathered_RTD, x_RTD)


class QwenVL(nn.Module):
  config: QwenVLConfig
  dtype: Any = jnp.float32  # compute dtype
  param_dtype: Any = jnp.float32
  remat: bool = False  # rematerialise each decoder layer (and vision block) in the backward pass
  mesh: jax.sharding.Mesh | None = None  # activations are constrained on it when given
  rules: sharding.Rules = sharding.RULES
  with_vision: bool = True  # False: a text-only policy (no `visual` params)

  def setup(self):
    c, dt, pdt = self.config, self.dtype, self.param_dtype
    self.embed_tokens = nn.Embed(
        c.vocab_size,
        c.hidden_size,
        dtype=dt,
        param_dtype=pdt,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
    )
    layer = nn.remat(DecoderLayer) if self.remat else DecoderLayer
    self.layers = [layer(c, dt, pdt, name=f"layers_{i}") for i in range(c.num_layers)]
    self.norm = RMSNorm(c.rms_norm_eps, dt, pdt)
    if not c.tie_word_embeddings:
      self.lm_head = Dense(
          c.vocab_size,
          use_bias=False,
          dtype=dt,
          param_dtype=pdt,
          kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", "vocab")),
          dot_general=dot_f32_lean_grads,  # no float32 copy of the [D, V] kernel's gradient (see there)
      )
    if self.with_vision:
      self.visual = vision.VisionTower(vision_config(c), dt, pdt, remat=self.remat)

  def _constrain(self, x, axes):
    return sharding.constrain(x, axes, self.mesh, self.rules)

  def __call__(
      self,
      input_ids,
      attention_mask=None,
      pixel_values=None,
      image_grid_thw=None,
      mm_token_type_ids=None,
      positions=None,
      vision_metadata=None,
  ):
    """logits_BTV of the full sequence (no cache)."""
    h_BTD = self.hidden(
        input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids, positions, vision_metadata
    )
    return self.unembed(h_BTD)

  def hidden(
      self,
      input_ids,
      attention_mask=None,
      pixel_values=None,
      image_grid_thw=None,
      mm_token_type_ids=None,
      positions=None,
      vision_metadata=None,
  ):
    """Final-norm hidden states h_BTD (what `unembed` turns into logits)."""
    if attention_mask is None:
      attention_mask = jnp.ones(jnp.shape(input_ids), jnp.int32)
    x_BTD, pos_3BT, _ = self.embed(
        input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids, positions, vision_metadata
    )
    h_BTD, _ = self.decode(x_BTD, pos_3BT, attention_mask)
    return h_BTD

  def embed(
      self,
      input_ids,
      attention_mask=None,
      pixel_values=None,
      image_grid_thw=None,
      mm_token_type_ids=None,
      positions=None,
      vision_metadata=None,
  ):
    """x_BTD (token embeddings, vision features at image pad tokens), positions_3BT, rope_deltas_B."""
    c = self.config
    if positions is None:
      positions, deltas_B = rope_index(c, input_ids, attention_mask, image_grid_thw, mm_token_type_ids)
    else:
      deltas_B = None
    ids_BT = jnp.asarray(input_ids)
    x_BTD = self.embed_tokens(ids_BT)
    if pixel_values is not None:
      if not self.with_vision:
        raise ValueError("pixel_values given to a policy built with with_vision=False")
      if vision_metadata is None:
        feats_MD = self.visual(jnp.asarray(pixel_values), image_grid_thw=np.asarray(image_grid_thw))
      else:
        feats_MD = self.visual(jnp.asarray(pixel_values), metadata=vision_metadata)
      x_BTD = self._place_features(input_ids, x_BTD, feats_MD.astype(x_BTD.dtype), image_grid_thw, vision_metadata)
    return self._constrain(x_BTD, ("batch", "sequence", None)), jnp.asarray(positions), deltas_B

  def _place_features(self, input_ids, x_BTD, feats_MD, image_grid_thw, vision_metadata):
    c = self.config
    is_img_BT = jnp.asarray(input_ids) == c.image_token_id
    if _concrete(input_ids) and vision_metadata is None:
      n_tok = int(np.sum(np.asarray(input_ids) == c.image_token_id))
      if n_tok != feats_MD.shape[0]:
        raise ValueError(
            f"image pad tokens ({n_tok}, token id {c.image_token_id}) != image features "
            f"({feats_MD.shape[0]} from image_grid_thw {np.asarray(image_grid_thw).tolist()})"
        )
    (B, T), D = is_img_BT.shape, x_BTD.shape[-1]  # the batch's images in row-major order: one row of B * T tokens
    return place_features(x_BTD.reshape(1, B * T, D), is_img_BT.reshape(1, B * T), feats_MD[None]).reshape(B, T, D)

  def decode(self, x_BTD, positions_3BT, attention_mask_BS, cache=None, cache_index=None):
    """h_BTD, cache. Without a cache the mask is over the T tokens; with one the T new tokens are written at slots
    cache_index .. cache_index+T-1 and `attention_mask_BS` covers all S slots (1 = slot holds a real token,
    including the new ones). The cache is returned in the form given (see `init_cache`): per-layer head-major
    buffers {"k", "v": tuple of L [B,K,S,Dh]}, each updated in place when the cache is donated (the sampler's
    form), or stacked {"k", "v": [L,B,S,K,Dh]}, converted to and from that per call (copies of the cache)."""
    c = self.config
    cos_BTDh, sin_BTDh = rope.mrope_cos_sin(
        jnp.asarray(positions_3BT), c.head_dim, c.rope_theta, c.mrope_section, self.dtype
    )
    mask_BTS = attention_mask(jnp.asarray(attention_mask_BS), x_BTD.shape[1], None if cache is None else cache_index)
    L = len(self.layers)
    k_layers, v_layers = ([None] * L, [None] * L) if cache is None else (_per_layer(cache["k"]), _per_layer(cache["v"]))
    for i, layer in enumerate(self.layers):
      x_BTD, k_layers[i], v_layers[i] = layer(
          x_BTD, cos_BTDh, sin_BTDh, mask_BTS, k_layers[i], v_layers[i], cache_index
      )
      x_BTD = self._constrain(x_BTD, ("batch", "sequence", None))
    new_cache = (
        None if cache is None else {"k": _in_form_of(cache["k"], k_layers), "v": _in_form_of(cache["v"], v_layers)}
    )
    return self.norm(x_BTD), new_cache

  def unembed(self, h_BTD):
    if self.config.tie_word_embeddings:
      # nn.Embed.attend, accumulating in float32. The compute copy is pinned to the table's own (vocab, embed) placement
      # where it is used (in each log-prob chunk, models/logprobs.py), so its gradient is asked for in that placement;
      # the whole-table float32 gradient per chip that was the peak of Qwen2.5-VL-3B's update step on v5e-8 went with
      # dot_f32_lean_grads, not with this pin (measured, docs/TPU_PLAN.md).
      emb_VD = self._constrain(self.embed_tokens.embedding.astype(self.dtype), ("vocab", "embed"))
      dims = (((h_BTD.ndim - 1,), (1,)), ((), ()))
      logits_BTV = dot_f32_lean_grads(h_BTD.astype(self.dtype), emb_VD, dims).astype(self.dtype)
    else:
      logits_BTV = self.lm_head(h_BTD)
    return self._constrain(logits_BTV, ("batch", "sequence", "vocab"))


def dummy_inputs(model: QwenVL) -> dict:
  """Smallest inputs that touch every parameter (one 2x2-patch image when the policy has a vision tower)."""
  c = model.config
  if not model.with_vision:
    return dict(input_ids=np.zeros((1, 2), np.int32))
  m = c.spatial_merge_size
  patch_dim = vision_config(c).patch_dim
  return dict(
      input_ids=np.array([[0, c.image_token_id]], np.int32),
      attention_mask=np.ones((1, 2), np.int32),
      pixel_values=np.zeros((m * m, patch_dim), np.float32),
      image_grid_thw=np.array([[1, m, m]]),
  )


def _per_layer(cache_part) -> list:
  """A cache's "k" (or "v") as a list of L head-major [B,K,S,Dh] buffers."""
  if isinstance(cache_part, (tuple, list)):
    return list(cache_part)
  return [c_BSKDh.transpose(0, 2, 1, 3) for c_BSKDh in cache_part]  # stacked [L,B,S,K,Dh]


def _in_form_of(cache_part, layers_BKSDh: list):
  if isinstance(cache_part, (tuple, list)):
    return tuple(layers_BKSDh)
  return jnp.stack([c_BKSDh.transpose(0, 2, 1, 3) for c_BKSDh in layers_BKSDh])


def init_cache(config: QwenVLConfig, batch: int, max_len: int, dtype=jnp.float32, per_layer: bool = False) -> dict:
  """Zero KV cache with S = max_len slots: stacked {"k": [L,B,S,K,Dh], "v": [L,B,S,K,Dh]}, or with per_layer the
  form the sampler keeps, {"k": tuple of L head-major [B,K,S,Dh], "v": ...} (see QwenVL.decode)."""
  c = as_config(config)
  if per_layer:
    shape = (batch, c.num_kv_heads, max_len, c.head_dim)
    return {n: tuple(jnp.zeros(shape, dtype) for _ in range(c.num_layers)) for n in ("k", "v")}
  shape = (c.num_layers, batch, max_len, c.num_kv_heads, c.head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
