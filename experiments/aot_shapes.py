"""experiments/aot.py, part 1: the abstract model and inputs. The config's model as config.json fields, the image and
prompt geometry the paper batch has, and the trainer's arrays as ShapeDtypeStructs placed as the trainer places them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

GiB = 1024**3

# Images per prompt by data.task: Reason-RFT's spatial task (TRANCE) shows the initial and the final state.
IMAGES_PER_TASK = {"counting": 1, "structure": 1, "spatial": 2}


def hf_config_for(cfg) -> tuple[dict, str]:
  """(config.json dict, where it came from): init_from's config.json when on disk; else the config's from-scratch
  model.arch; else the known config of the model its name / init_from names."""
  from ekipl_jax.models import known_configs
  from ekipl_jax.train import policy

  path = os.path.join(cfg.model.init_from, "config.json") if cfg.model.init_from else ""
  if path and os.path.isfile(path):
    with open(path) as f:
      return json.load(f), path
  if not cfg.model.init_from and cfg.model.arch:
    V = int(cfg.model.vocab_size)
    if V <= 8:
      raise ValueError("config key model.vocab_size: a from-scratch model.arch needs the vocabulary size (> 8)")
    # Special ids only place the image tokens; the shapes do not depend on them.
    names = ("eos_token_id", "pad_token_id", "image_token_id", "video_token_id", "vision_start_token_id")
    special = dict(vocab_size=V, vision_end_token_id=V - 6, **{n: V - 1 - i for i, n in enumerate(names)})
    return policy.scratch_hf_config(cfg.model.family, cfg.model.arch, special), "model.arch"
  name = known_configs.find(cfg.name, cfg.model.init_from)
  if name is None:
    raise ValueError(
        f"config key model.init_from: no config.json at {cfg.model.init_from!r} and no known model name in the config "
        f"name {cfg.name!r} or the path (known: {sorted(known_configs.CONFIGS)}, ekipl_jax/models/known_configs.py)"
    )
  return known_configs.lookup(name), f"known_configs.{name}"


def largest_image_grid(dcfg, vcfg) -> tuple[int, int, int]:
  """(t, h, w) patch grid of the largest image the processor makes under data.max_pixels (transformers'
  smart_resize over aspect ratios up to 1:8, at most max_pixels; the factor is patch_size * merge_size)."""
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

  f = vcfg.patch_size * vcfg.spatial_merge_size
  side = int(math.isqrt(int(dcfg.max_pixels)) * 3) // f * f + f
  best = (0, 0)
  for h in range(f, side + 1, f):
    for w in range(h, min(8 * h, side * 3) + 1, f):
      rh, rw = smart_resize(h, w, factor=f, min_pixels=int(dcfg.min_pixels), max_pixels=int(dcfg.max_pixels))
      if best[0] * best[1] < rh * rw <= dcfg.max_pixels:  # (min_pixels can push odd aspect ratios above it)
        best = (rh, rw)
  return 1, best[0] // vcfg.patch_size, best[1] // vcfg.patch_size


# ------------------------------------------------------------------------------------------ abstract inputs


def sds(shape, dtype, sharding):
  import jax

  return jax.ShapeDtypeStruct(tuple(int(s) for s in shape), dtype, sharding=sharding)


def batch_sharding(shape, mesh, rules):
  """update.shard_batch's placement: the leading axis on the logical "batch" axis. (shard_batch applies the default
  sharding.RULES, not mesh.rules; `rules` is unused so that this stays what the trainer does.)"""
  from ekipl_jax import sharding

  del rules
  return sharding.logical_sharding(("batch",) + (None,) * (len(shape) - 1), mesh, sharding.RULES, shape=shape)


@dataclasses.dataclass
class Geometry:
  grid: tuple[int, int, int]  # one image's (t, h, w) patches
  images_per_prompt: int
  image_tokens: int  # per prompt (merged)
  prompt_tokens: int  # real prompt tokens (text + image tokens + vision start / end)
  P: int  # prompt bucket


def geometry(cfg, model, text_tokens: int, images_per_prompt: int) -> Geometry:
  from ekipl_jax.data import processor as processor_lib
  from ekipl_jax.models.model import vision_config

  vcfg = vision_config(model.config)
  grid = largest_image_grid(cfg.data, vcfg)
  n = images_per_prompt if images_per_prompt >= 0 else IMAGES_PER_TASK.get(cfg.data.task, 1)
  tok = n * (grid[0] * grid[1] * grid[2] // vcfg.merge_unit)
  length = text_tokens + tok + 2 * n
  return Geometry(grid, n, tok, length, processor_lib.pick_bucket(length, cfg.data.prompt_buckets))


def prompt_ids(model, geo: Geometry, B: int):
  """[B, P] left-padded prompt ids / mask: text, then per image <vision_start> <image_pad> x tokens <vision_end>."""
  import numpy as np

  c = model.config
  per = geo.image_tokens // max(geo.images_per_prompt, 1)
  row = [0] * (geo.prompt_tokens - geo.image_tokens - 2 * geo.images_per_prompt)
  for _ in range(geo.images_per_prompt):
    row += [c.vision_start_token_id] + [c.image_token_id] * per + [c.vision_start_token_id + 1]
  ids = np.zeros((B, geo.P), np.int32)
  mask = np.zeros((B, geo.P), np.int32)
  ids[:, geo.P - len(row) :] = row
  mask[:, geo.P - len(row) :] = 1
  return ids, mask


def abstract_rows_batch(model, geo: Geometry, R: int, C: int, mesh, rules) -> dict:
  """train/batching.rows_batch's arrays for R identical rows (built for one row on the host, leading axis scaled
  to R) as ShapeDtypeStructs placed as update.shard_batch places them."""
  import numpy as np

  from ekipl_jax.models.model import vision_config
  from ekipl_jax.train import batching

  vcfg = vision_config(model.config)
  ids, mask = prompt_ids(model, geo, 1)
  grid = np.tile(np.asarray(geo.grid, np.int64), (geo.images_per_prompt, 1))
  n_patches = int(grid.prod(-1).sum())
  b = batching.rows_batch(
      model,
      ids,
      mask,
      np.zeros((1, C), np.int32),
      np.ones((1, C), np.int32),
      np.zeros((n_patches, vcfg.patch_dim), np.float32) if geo.images_per_prompt else None,
      grid if geo.images_per_prompt else None,
      [geo.images_per_prompt],
  )
  out = {}
  for k, v in b.items():
    shape = (R * v.shape[0],) + v.shape[1:]
    out[k] = sds(shape, v.dtype, batch_sharding(shape, mesh, rules))
  return out


def update_batch(rows: dict, R: int, C: int, with_sampler_logp: bool, mesh, rules):
  """The rl/batch.UpdateBatch train/rl_stages.rl_step builds from the kept rows (before ref_logp_RC), as
  ShapeDtypeStructs;
  sampler_logp_RC only when the loss's log-prob temperature is the sampler's (as rl_step decides)."""
  import numpy as np

  from ekipl_jax.rl import batch as rl_batch

  one = lambda shape, dtype: sds(shape, dtype, batch_sharding(shape, mesh, rules))
  return rl_batch.from_rows(
      rows,
      A_R=one((R,), np.float32),
      is_external_R=one((R,), np.bool_),
      behaviour_logp_RC=one((R, C), np.float32),
      has_behaviour_R=one((R,), np.bool_),
      sampler_logp_RC=one((R, C), np.float32) if with_sampler_logp else None,
  )


def with_shardings(shapes, shardings):
  import jax

  return jax.tree.map(lambda s, sh: sds(s.shape, s.dtype, sh), shapes, shardings)


def abstract_params(model, mesh, rules):
  from ekipl_jax.models import hf_checkpoint

  shapes, _ = hf_checkpoint.abstract_params(model)
  return with_shardings(shapes, hf_checkpoint.param_shardings(model, mesh, rules))


def per_chip_bytes(tree) -> int:
  """Bytes one chip holds of a tree of ShapeDtypeStructs with shardings (the largest shard)."""
  import jax
  import numpy as np

  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    try:
      item = np.dtype(x.dtype).itemsize
    except TypeError:  # PRNG key arrays
      item = 8
    total += int(np.prod(shape, dtype=np.int64)) * item
  return total
