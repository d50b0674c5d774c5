"""Sharding rules and the policy on a mesh of 8 CPU devices (== the 1-device result, params really sharded)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as PS

import hf_fixtures as F
from ekipl_jax import models, sharding


def test_make_mesh_shapes():
  mesh = sharding.make_mesh((2, -1, 2))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  with pytest.raises(ValueError, match="needs 16 devices"):
    sharding.make_mesh((2, 4, 2))


def test_logical_to_spec_rules_and_divisibility():
  mesh = sharding.make_mesh((2, 2, 2))
  assert sharding.logical_to_spec(("embed", "heads"), mesh) == PS("fsdp", "tensor")
  assert sharding.logical_to_spec(("batch", "sequence", None), mesh) == PS(("data", "fsdp"), None, None)
  assert sharding.logical_to_spec(("batch", None), mesh, shape=(2, 5)) == PS("data", None)  # fsdp dropped: 2 % 4
  assert sharding.logical_to_spec(("vocab",), mesh, shape=(7,)) == PS(None)


def test_rule_collision_rejected():
  mesh = sharding.make_mesh((2, 2, 2))
  rules = (("embed", "tensor"), ("heads", "tensor"))
  with pytest.raises(ValueError, match="both map to mesh axis 'tensor'"):
    sharding.logical_to_spec(("embed", "heads"), mesh, rules)
  with pytest.raises(ValueError, match="mesh axis 'model'"):
    sharding.logical_to_spec(("embed",), mesh, (("embed", "model"),))


def test_init_distributed_single_process_is_noop():
  sharding.init_distributed()
  assert jax.process_count() == 1


@pytest.mark.parametrize("family", F.FAMILIES)
def test_forward_on_8_device_mesh_equals_single_device(family, tmp_path):
  assert jax.device_count() == 8
  path = F.tiny_hf_model(family, tmp_path, seed=31)
  inputs = F.make_inputs(path, [[3, (4, 4), 5], [2, (2, 4), 4], [9], [6]] * 2, seed=4)
  args = (inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], inputs["image_grid_thw"])
  model1, params1 = models.load_pretrained(path)
  ref = np.asarray(model1.apply(params1, *args))
  mesh = sharding.make_mesh((2, 2, 2))
  model8, params8 = models.load_pretrained(path, mesh=mesh)
  q = params8["params"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
  assert q.sharding.spec == PS("fsdp", "tensor")
  assert q.addressable_shards[0].data.shape == (32, 32)  # each device holds a quarter, not a full copy
  got = model8.apply(params8, *args)
  assert len(got.sharding.device_set) == 8
  valid = inputs["attention_mask"].astype(bool)
  assert np.abs(np.asarray(got) - ref)[valid].max() <= 1e-5
  # a freshly initialised policy lands on the same shardings
  model_i, params_i = models.init(model8.config, jax.random.PRNGKey(0), mesh=mesh)
  assert params_i["params"]["layers_0"]["self_attn"]["q_proj"]["kernel"].sharding.spec == PS("fsdp", "tensor")
