"""HF folder <-> parameter pytree: config.json + model.safetensors (or a sharded model.safetensors.index.json).

Loading reads each tensor through a memory map and places it straight onto its sharding on the mesh
(`jax.make_array_from_callback`: each device receives only its slice; no full copy on every device). Keys are accepted
in the transformers v5 layout (`model.language_model.*`, `model.visual.*`, `lm_head.*`) and the legacy layout
(`model.layers.*`, `model.embed_tokens.*`, `model.norm.*`, `visual.*`, `lm_head.*`); saving writes the legacy layout,
which is what transformers 5.24's own `save_pretrained` writes and reads back.

Flax path <-> HF key (text): `layers_3/self_attn/q_proj/kernel` <-> `layers.3.self_attn.q_proj.weight` (transposed);
`scale` and `embedding` <-> `weight`. Vision (`vision_hf_to_flax_name`, keys relative to `visual.`):
    a numeric path component joins its parent with "_":   blocks.{i} -> blocks_{i},  merger.mlp.{0,2} -> merger/mlp_{0,2}
    nn.Linear weight [out, in]            -> kernel [in, out]            (transpose)
    nn.Linear / LayerNorm bias            -> bias
    norm1 / norm2 / ln_q weight           -> scale                       (LayerNorm for qwen2_vl, RMSNorm for 2.5)
    patch_embed.proj.weight [D,C,Tp,P,P]  -> patch_embed/proj/kernel [K, D] = weight.reshape(D, K).T
                                             (inverse: kernel.T.reshape(D, C, Tp, P, P); K is in the processor's
                                             flatten order C, Tp, P, P, so the Conv3D is one matmul)
e.g. visual.blocks.3.attn.qkv.weight -> ("blocks_3", "attn", "qkv", "kernel"), transposed.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from ekipl_jax import sharding
from ekipl_jax.models import model as model_lib
from ekipl_jax.models.config import QwenVLConfig, VisionConfig, family_of

_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


# ------------------------------------------------------------------------------------------ safetensors files


def _read_header(path: str) -> tuple[dict, int]:
  with open(path, "rb") as f:
    n = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(n))
  header.pop("__metadata__", None)
  return header, 8 + n


def open_tensors(folder: str) -> dict[str, Callable[[], np.ndarray]]:
  """{key: () -> memory-mapped numpy array} over model.safetensors or every shard of the index."""
  index = os.path.join(folder, INDEX)
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  elif os.path.exists(os.path.join(folder, WEIGHTS)):
    files = [WEIGHTS]
  else:
    raise FileNotFoundError(f"no {WEIGHTS} or {INDEX} in {folder}")
  out = {}
  for name in files:
    path = os.path.join(folder, name)
    header, base = _read_header(path)
    for key, info in header.items():
      a, b = info["data_offsets"]
      dtype, shape = np.dtype(_ST_DTYPES[info["dtype"]]), tuple(info["shape"])
      out[key] = (
          lambda p=path, o=base + a, d=dtype, s=shape: np.memmap(p, dtype=d, mode="r", offset=o, shape=s)
          if int(np.prod(s))
          else np.zeros(s, d)
      )
  return out


def write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
  header, offset = {"__metadata__": {"format": "pt"}}, 0
  for key in sorted(tensors):
    a = tensors[key]
    header[key] = {"dtype": _ST_NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with open(path, "wb") as f:
    f.write(len(blob).to_bytes(8, "little"))
    f.write(blob)
    for key in sorted(tensors):
      f.write(np.ascontiguousarray(tensors[key]).tobytes())


# ------------------------------------------------------------------------------------------------ name mapping


def _text_hf_key(path: tuple[str, ...]) -> tuple[str, bool]:
  """(key relative to the text prefix, transpose?) for a text-side flax path."""
  parts = []
  for p in path[:-1]:
    head, _, tail = p.rpartition("_")
    parts += [head, tail] if head == "layers" and tail.isdigit() else [p]
  leaf = path[-1]
  return ".".join(parts + ["bias" if leaf == "bias" else "weight"]), leaf == "kernel"


_VISION_NORMS = ("norm1", "norm2", "ln_q")
_VISION_PREFIXES = ("model.visual.", "visual.")


def _conv_to_kernel(w: np.ndarray) -> np.ndarray:
  w = np.asarray(w)
  return np.ascontiguousarray(w.reshape(w.shape[0], -1).T)


def _identity(a: np.ndarray) -> np.ndarray:
  return np.asarray(a)


def _transpose(a: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(a).T)


def vision_hf_to_flax_name(hf_key: str) -> tuple[tuple[str, ...], Callable[[np.ndarray], np.ndarray]]:
  """transformers vision key (with or without `model.visual.` / `visual.`) -> (path in the tower's own params,
  torch->flax fn). The policy nests the tower under its `visual` submodule."""
  for prefix in _VISION_PREFIXES:
    if hf_key.startswith(prefix):
      hf_key = hf_key[len(prefix) :]
      break
  *mods, leaf = hf_key.split(".")
  path: list[str] = []
  for part in mods:
    if part.isdigit():
      path[-1] = f"{path[-1]}_{part}"
    else:
      path.append(part)
  if mods == ["patch_embed", "proj"] and leaf == "weight":
    return (*path, "kernel"), _conv_to_kernel
  if mods and mods[-1] in _VISION_NORMS:
    return (*path, "scale" if leaf == "weight" else "bias"), _identity
  if leaf == "weight":
    return (*path, "kernel"), _transpose
  if leaf == "bias":
    return (*path, "bias"), _identity
  raise KeyError(f"no flax name for vision key {hf_key!r}")


def vision_flax_to_hf_name(
    path: tuple[str, ...], config: VisionConfig, prefix: str = "model.visual."
) -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
  """Inverse of vision_hf_to_flax_name: (path in the tower's params) -> (transformers key, flax->torch fn)."""
  *mods, leaf = path
  parts = []
  for m in mods:
    head, _, tail = m.rpartition("_")
    parts.extend([head, tail] if tail.isdigit() and head in ("blocks", "mlp") else [m])
  if list(mods) == ["patch_embed", "proj"]:
    shape = (config.embed_dim, config.in_channels, config.temporal_patch_size, config.patch_size, config.patch_size)
    return prefix + "patch_embed.proj.weight", lambda k: np.ascontiguousarray(np.asarray(k).T.reshape(shape))
  name = {"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf]
  return prefix + ".".join(parts + [name]), _transpose if leaf == "kernel" else _identity


def vision_params_from_state_dict(state_dict: dict[str, np.ndarray]) -> dict:
  """{transformers visual key: numpy array} -> the tower's params tree (numpy leaves; wrap as {"params": ...})."""
  items = []
  for key, value in state_dict.items():
    path, fn = vision_hf_to_flax_name(key)
    items.append((path, fn(value)))
  return _unflatten(items)


def vision_state_dict_from_params(
    params: dict, config: VisionConfig, prefix: str = "model.visual."
) -> dict[str, np.ndarray]:
  """The tower's params tree -> {transformers key: numpy array} (inverse of vision_params_from_state_dict)."""
  out = {}
  for path, value in _paths(params):
    key, fn = vision_flax_to_hf_name(path, config, prefix)
    out[key] = fn(np.asarray(value))
  return out


def hf_name(path: tuple[str, ...], config: QwenVLConfig, v5: bool) -> tuple[str, Callable, Callable]:
  """flax path (under params) -> (HF key, torch->flax fn, flax->torch fn)."""
  if path[0] == "visual":
    key, to_torch = vision_flax_to_hf_name(
        path[1:], model_lib.vision_config(config), "model.visual." if v5 else "visual."
    )
    return key, vision_hf_to_flax_name(key)[1], to_torch
  if path[0] == "lm_head":
    key, tr = "lm_head.weight", True
  else:
    rel, tr = _text_hf_key(path)
    key = ("model.language_model." if v5 else "model.") + rel
  fn = (lambda a: a.T) if tr else (lambda a: a)
  return key, fn, fn


def _paths(tree: dict) -> list[tuple[tuple[str, ...], Any]]:
  return [(tuple(k.key for k in kp), v) for kp, v in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _unflatten(items: list[tuple[tuple[str, ...], Any]]) -> dict:
  tree: dict = {}
  for path, v in items:
    node = tree
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = v
  return tree


# ------------------------------------------------------------------------------------------------ load / save


def read_config(path: str) -> QwenVLConfig:
  """QwenVLConfig of an HF folder; every error names config.json (and the model family when it is known)."""
  cfg_file = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_file):
    raise FileNotFoundError(f"no config.json in {path}")
  with open(cfg_file) as f:
    try:
      hf = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{cfg_file} is not valid JSON: {e}") from None
  if not isinstance(hf, dict):
    raise ValueError(f"{cfg_file}: expected a JSON object, got {type(hf).__name__}")
  try:
    return QwenVLConfig.from_hf(hf)
  except KeyError as e:
    raise ValueError(f"{cfg_file} (model_type {hf.get('model_type')!r}) lacks the field {e.args[0]!r}") from None
  except (ValueError, TypeError, NotImplementedError) as e:
    raise type(e)(f"{cfg_file} (model_type {hf.get('model_type')!r}): {e}") from None


def weights_family(tensors: Iterable[str]) -> str | None:
  """The family the vision weights belong to, from their names (None: no vision tensors): Qwen2.5-VL's vision MLP
  is gate_proj / up_proj / down_proj, Qwen2-VL's fc1 / fc2."""
  for key in tensors:
    if "visual." in key and ".mlp." in key:
      if ".mlp.gate_proj." in key:
        return "qwen2_5_vl"
      if ".mlp.fc1." in key:
        return "qwen2_vl"
  return None


def build(
    config: QwenVLConfig,
    dtype=jnp.float32,
    compute_dtype=None,
    remat: bool = False,
    mesh=None,
    rules: sharding.Rules = sharding.RULES,
    with_vision: bool | None = None,
) -> model_lib.QwenVL:
  if with_vision is None:
    with_vision = bool(config.vision_hf)
  return model_lib.QwenVL(
      config,
      dtype=compute_dtype or dtype,
      param_dtype=dtype,
      remat=remat,
      mesh=mesh,
      rules=rules,
      with_vision=with_vision,
  )


def abstract_params(model: model_lib.QwenVL) -> tuple[dict, dict]:
  """(ShapeDtypeStruct tree, logical-axes tree) of model's variables, without allocating anything."""
  boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), **model_lib.dummy_inputs(model)))
  axes = jax.tree_util.tree_map(
      lambda b: tuple(b.names) if isinstance(b, nn.Partitioned) else None,
      boxed,
      is_leaf=lambda b: isinstance(b, nn.Partitioned),
  )
  return nn.unbox(boxed), axes


def param_shardings(model: model_lib.QwenVL, mesh, rules: sharding.Rules = sharding.RULES) -> dict:
  """NamedSharding per parameter (replicated where no logical axes are declared)."""
  shapes, axes = abstract_params(model)
  return jax.tree_util.tree_map(
      lambda s, a: sharding.logical_sharding(a or (None,) * len(s.shape), mesh, rules, s.shape), shapes, axes
  )


def load_pretrained(
    path: str,
    dtype=jnp.float32,
    mesh=None,
    compute_dtype=None,
    remat: bool = False,
    rules: sharding.Rules = sharding.RULES,
    check_finite: bool = True,
) -> tuple[model_lib.QwenVL, dict]:
  """(model, params) of an HF folder. check_finite: a NaN/inf weight is an error naming the tensor (each host checks
  the slices it loads; False loads them as they are)."""
  config = read_config(path)
  model = build(config, dtype, compute_dtype, remat, mesh, rules)
  tensors = open_tensors(path)
  v5 = any(k.startswith("model.language_model.") for k in tensors)
  family = family_of(config.model_type)
  found = weights_family(tensors)
  if found is not None and found != family:
    raise ValueError(
        f"{os.path.join(path, 'config.json')} says model_type {config.model_type!r}, but the weights in {path} are "
        f"a {found} checkpoint (their vision MLP tensors); use that checkpoint's own config.json"
    )
  where = f"checkpoint {path!r} (model_type {config.model_type!r} from its config.json)"
  try:
    shapes, axes = abstract_params(model)
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{where}: cannot build the model from its config: {type(e).__name__}: {e}") from e
  flat_axes = jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: x is None or isinstance(x, tuple))[0]
  axes_by_path = {tuple(k.key for k in kp): a for kp, a in flat_axes}
  np_dtype = np.dtype(jnp.dtype(dtype))
  used, items = set(), []
  for p, sds in _paths(shapes["params"]):
    key, to_flax, _ = hf_name(p, config, v5)
    if key not in tensors:
      raise KeyError(f"{where} is missing tensor {key!r} (needed for params {'/'.join(p)})")
    used.add(key)
    try:
      host = to_flax(tensors[key]())
    except Exception as e:
      raise ValueError(f"{where}: tensor {key!r} cannot be converted to shape {sds.shape}: {e}") from e
    if tuple(host.shape) != tuple(sds.shape):
      raise ValueError(
          f"{where}: tensor {key!r} has shape {tuple(tensors[key]().shape)}; "
          f"expected {tuple(sds.shape)} after conversion for params {'/'.join(p)}"
      )
    ax = axes_by_path.get(("params",) + p) or (None,) * len(sds.shape)
    shard = (
        sharding.logical_sharding(ax, mesh, rules, sds.shape)
        if mesh is not None
        else jax.sharding.SingleDeviceSharding(jax.devices()[0])
    )

    def load_slice(idx, h=host, key=key):
      a = np.asarray(h[idx], dtype=np_dtype)
      if check_finite and jnp.issubdtype(a.dtype, jnp.inexact) and not np.isfinite(a).all():
        raise ValueError(
            f"{where}: tensor {key!r} holds {int(a.size - np.isfinite(a).sum())} non-finite values (NaN/inf); "
            f"the checkpoint is broken (e.g. a diverged run). load_pretrained(..., check_finite=False) loads it anyway"
        )
      return a

    items.append((p, jax.make_array_from_callback(sds.shape, shard, load_slice)))
  unexpected = sorted(set(tensors) - used - ({"lm_head.weight"} if config.tie_word_embeddings else set()))
  if unexpected:
    raise KeyError(f"unexpected tensors in {where}: {unexpected[:10]}" + (" ..." if len(unexpected) > 10 else ""))
  return model, {"params": _unflatten(items)}


def save_pretrained(
    model: model_lib.QwenVL, params: dict, out_dir: str, processor_dir: str | None = None, check_finite: bool = True
) -> None:
  """Write an HF folder (config.json, model.safetensors in transformers' own key layout, processor files).
  check_finite: refuse (ValueError naming the tensors, nothing written) weights holding NaN/inf."""
  tensors = {}
  for path, value in _paths(params["params"]):
    key, _, to_torch = hf_name(path, model.config, v5=False)
    tensors[key] = np.ascontiguousarray(to_torch(sharding.to_host(value)))
  bad = [k for k, t in tensors.items() if jnp.issubdtype(t.dtype, jnp.inexact) and not np.isfinite(t).all()]
  if check_finite and bad:
    raise ValueError(
        f"refusing to export to {out_dir}: {len(bad)} of {len(tensors)} tensors hold NaN/inf, e.g. {bad[:5]} "
        f"(a diverged run; save_pretrained(..., check_finite=False) writes them anyway)"
    )
  os.makedirs(out_dir, exist_ok=True)
  dtype = {
      np.dtype(np.float32): "float32",
      np.dtype(ml_dtypes.bfloat16): "bfloat16",
      np.dtype(np.float16): "float16",
  }.get(next(iter(tensors.values())).dtype, "float32")
  write_safetensors(os.path.join(out_dir, WEIGHTS), tensors)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(model.config.to_hf(dtype), f, indent=2, sort_keys=True)
  if processor_dir is not None:
    for name in sorted(os.listdir(processor_dir)):
      src = os.path.join(processor_dir, name)
      if os.path.isfile(src) and name != "config.json" and not name.startswith("model.safetensors"):
        shutil.copy2(src, os.path.join(out_dir, name))
