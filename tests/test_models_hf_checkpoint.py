"""Checkpoints: load -> save -> transformers loads -> same logits; sharded index; v5 key layout; bf16 files;
processor files copied; every error names the key or file.
"""

from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import hf_fixtures as F
from ekipl_jax import models

ROWS = [[3, (4, 4), 5], [2, (2, 4), 4]]


@pytest.fixture(scope="module", params=F.FAMILIES)
def hf_path(request, tmp_path_factory):
  return F.tiny_hf_model(request.param, tmp_path_factory.mktemp(request.param), seed=21)


def logits(model, params, inputs):
  return np.asarray(
      model.apply(
          params, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], inputs["image_grid_thw"]
      )
  )


def test_round_trip_through_transformers(hf_path, tmp_path):
  model, params = models.load_pretrained(hf_path)
  proc = tmp_path / "proc"
  proc.mkdir()
  (proc / "tokenizer_config.json").write_text("{}")
  (proc / "config.json").write_text("not copied")
  out = str(tmp_path / "out")
  models.save_pretrained(model, params, out, processor_dir=str(proc))
  assert json.load(open(os.path.join(out, "config.json")))["model_type"] == model.config.model_type
  assert os.path.exists(os.path.join(out, "tokenizer_config.json"))
  inputs = F.make_inputs(hf_path, ROWS, seed=1)
  valid = inputs["attention_mask"].astype(bool)
  ref = F.hf_logits(F.load_hf(hf_path), inputs)
  back = F.hf_logits(F.load_hf(out), inputs)  # transformers' own from_pretrained on our folder
  assert np.abs(back - ref)[valid].max() <= 1e-5
  assert set(load_file(os.path.join(out, "model.safetensors"))) == set(
      load_file(os.path.join(hf_path, "model.safetensors"))
  )
  model2, params2 = models.load_pretrained(out)
  np.testing.assert_array_equal(logits(model2, params2, inputs), logits(model, params, inputs))


def test_sharded_index_and_v5_layout(hf_path, tmp_path):
  tensors = load_file(os.path.join(hf_path, "model.safetensors"))
  v5 = {
      ("model.language_model." + k[len("model.") :])
      if k.startswith("model.")
      else ("model." + k)
      if k.startswith("visual.")
      else k: v
      for k, v in tensors.items()
  }
  out = tmp_path / "v5"
  out.mkdir()
  shutil.copy(os.path.join(hf_path, "config.json"), out / "config.json")
  keys = sorted(v5)
  halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
  for name, ks in halves.items():
    save_file({k: v5[k] for k in ks}, str(out / name), metadata={"format": "pt"})
  index = {"metadata": {}, "weight_map": {k: n for n, ks in halves.items() for k in ks}}
  (out / "model.safetensors.index.json").write_text(json.dumps(index))
  inputs = F.make_inputs(hf_path, ROWS, seed=2)
  np.testing.assert_array_equal(
      logits(*models.load_pretrained(str(out)), inputs), logits(*models.load_pretrained(hf_path), inputs)
  )


def test_bfloat16_params_and_bf16_file(hf_path, tmp_path):
  model, params = models.load_pretrained(hf_path, dtype=jnp.bfloat16)
  assert params["params"]["layers_0"]["mlp"]["up_proj"]["kernel"].dtype == jnp.bfloat16
  out = str(tmp_path / "bf16")
  models.save_pretrained(model, params, out)
  assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"
  model2, params2 = models.load_pretrained(out, dtype=jnp.float32)  # BF16 tensors read from the file
  inputs = F.make_inputs(hf_path, ROWS, seed=3)
  np.testing.assert_array_equal(logits(model2, params2, inputs), logits(model2, jax_cast(params, jnp.float32), inputs))


def jax_cast(params, dtype):
  import jax

  return jax.tree_util.tree_map(lambda a: a.astype(dtype), params)


def _copy(hf_path, tmp_path, edit_tensors=None, edit_config=None):
  out = tmp_path / "edited"
  out.mkdir()
  tensors = load_file(os.path.join(hf_path, "model.safetensors"))
  cfg = json.load(open(os.path.join(hf_path, "config.json")))
  if edit_tensors:
    edit_tensors(tensors)
  if edit_config:
    edit_config(cfg)
  save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
  (out / "config.json").write_text(json.dumps(cfg))
  return str(out)


def test_missing_tensor_named(hf_path, tmp_path):
  key = "model.layers.1.self_attn.k_proj.bias"
  path = _copy(hf_path, tmp_path, edit_tensors=lambda t: t.pop(key))
  with pytest.raises(KeyError, match=key.replace(".", r"\.")):
    models.load_pretrained(path)


def test_missing_vision_tensor_named(hf_path, tmp_path):
  key = "visual.merger.mlp.2.weight"
  path = _copy(hf_path, tmp_path, edit_tensors=lambda t: t.pop(key))
  with pytest.raises(KeyError, match=key.replace(".", r"\.")):
    models.load_pretrained(path)


def test_wrong_shape_named(hf_path, tmp_path):
  key = "model.layers.0.mlp.gate_proj.weight"
  path = _copy(hf_path, tmp_path, edit_tensors=lambda t: t.__setitem__(key, t[key][:-1]))
  with pytest.raises(ValueError, match=key.replace(".", r"\.")):
    models.load_pretrained(path)


def test_unexpected_tensor_named(hf_path, tmp_path):
  path = _copy(hf_path, tmp_path, edit_tensors=lambda t: t.__setitem__("model.extra.weight", np.zeros(3, np.float32)))
  with pytest.raises(KeyError, match=r"model\.extra\.weight"):
    models.load_pretrained(path)


def test_unknown_model_type_named(hf_path, tmp_path):
  path = _copy(hf_path, tmp_path, edit_config=lambda c: c.__setitem__("model_type", "llava_next"))
  with pytest.raises(ValueError, match="llava_next"):
    models.load_pretrained(path)


def test_folder_without_config_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    models.load_pretrained(str(tmp_path))


def test_folder_without_weights_named(hf_path, tmp_path):
  shutil.copy(os.path.join(hf_path, "config.json"), tmp_path / "config.json")
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    models.load_pretrained(str(tmp_path))
