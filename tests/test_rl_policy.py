"""The update step with the real tiny Qwen2-VL policy (text only): 8-device mesh with micro-batches == 1 device."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ekipl_jax import models, sharding
from ekipl_jax.rl import update
from ekipl_jax.rl.batch import UpdateBatch
from hf_fixtures import TEXT_VOCAB, tiny_config_dict
from test_rl_update import replicate, rl_cfg

B, P, C = 8, 4, 5


def _logprob_fn(model, params, inputs):
  return models.token_logprobs(
      model, params, inputs["input_ids"], inputs["attention_mask"], targets_from=P + 0, chunk_size=4
  )


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, C + 1, B)
  mask = (np.arange(C)[None] < lengths[:, None]).astype(np.float32)
  return UpdateBatch(
      inputs={
          "input_ids": rng.integers(3, TEXT_VOCAB, (B, P + C)).astype(np.int32),
          "attention_mask": np.concatenate([np.ones((B, P), np.int32), mask.astype(np.int32)], 1),
      },
      mask_RC=mask,
      A_R=rng.normal(0, 1, B).astype(np.float32),
      is_external_R=np.arange(B) % 4 == 3,
      ref_logp_RC=np.full((B, C), -5.0, np.float32),
  )


def _run(model, params, cfg, batch, mesh=None):
  opt = optax.sgd(10.0)
  state = update.init_state(params, opt)
  kw = {}
  if mesh is not None:
    state, batch = replicate(state, mesh), update.shard_batch(batch, mesh)
    kw["state_sharding"] = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  step = update.make_train_step(functools.partial(_logprob_fn, model), opt, cfg, **kw)
  state, m = step(state, batch)
  return jax.tree.map(np.asarray, state.params), jax.tree.map(np.asarray, m)


def test_real_policy_step_on_mesh_matches_one_device():
  model, params = models.init(tiny_config_dict("qwen2_vl"), jax.random.key(0), dtype=jnp.float32, with_vision=False)
  before = jax.tree.map(np.asarray, params)
  cfg, batch = rl_cfg(micro_batches=2, aggregation="token_mean"), _batch()
  p1, m1 = _run(model, params, cfg, batch)
  p8, m8 = _run(model, jax.tree.map(jnp.asarray, before), cfg, batch, mesh=sharding.make_mesh((8, 1, 1)))
  assert np.isfinite(m1["loss"]) and m1["skipped"] == 0
  np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-6, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p8, p1)
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), p1, before))
  assert max(moved) > 0


def test_logprob_temperature_switch():
  """rl.logprob_temperature: None -> the sampling temperature, 1.0 -> Reason-RFT's; checked against
  log_softmax(logits / T) of the model's full forward pass at the completion tokens."""
  from ml_collections import ConfigDict

  from ekipl_jax.rl import config
  from ekipl_jax.train import batching
  from ekipl_jax.train import rl_stages

  model, params = models.init(tiny_config_dict("qwen2_vl"), jax.random.key(1), dtype=jnp.float32, with_vision=False)
  ids = np.random.default_rng(0).integers(3, TEXT_VOCAB, (2, P + C)).astype(np.int32)
  ones = np.ones_like(ids)
  batch = batching.rows_batch(model, ids[:, :P], ones[:, :P], ids[:, P:], ones[:, P:])
  logits = model.apply(params, jnp.asarray(ids), jnp.asarray(ones))[:, P - 1 : -1]

  def expected(T):
    return np.take_along_axis(np.asarray(jax.nn.log_softmax(logits / T)), ids[:, P:, None], -1)[..., 0]

  rcfg = config.default()
  rcfg.sampling = ConfigDict(dict(temperature=0.7))
  for setting, T in ((None, 0.7), (1.0, 1.0)):
    rcfg.logprob_temperature = setting
    assert rl_stages.logprob_temperature(rcfg) == T
    logp = rl_stages.make_logprob_fn(model, P, 4, rl_stages.logprob_temperature(rcfg))(params, batch)[0]
    np.testing.assert_allclose(np.asarray(logp), expected(T), rtol=1e-5, atol=1e-5)
  assert np.abs(expected(1.0) - expected(0.7)).max() > 1e-3
