"""The jit update step on a toy policy: exact micro-batch accumulation, mu epochs, non-finite skip, 8-device mesh.

The toy policy (also used by test_rl_distributed.py): embedding + dense + log_softmax over a small vocabulary,
teacher-forced on batch["input_ids"]; the completion is the last C tokens.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from ekipl_jax import sharding
from ekipl_jax.rl import config, loss, update
from ekipl_jax.rl.batch import UpdateBatch

V, D, P, C = 13, 8, 3, 6


@pytest.fixture(autouse=True)
def _strict_ranks():
  with jax.numpy_rank_promotion("raise"):
    yield


def toy_params(seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {
      "embed": rng.normal(0, 0.5, (V, D)).astype(np.float32),
      "w": rng.normal(0, 0.5, (D, V)).astype(np.float32),
      "b": np.zeros((V,), np.float32),
  }


def toy_logprob_fn(params, inputs):
  ids_BT = inputs["input_ids"]
  logits_BTV = params["embed"][ids_BT[:, :-1]] @ params["w"] + params["b"][None, None]
  logp_BTV = jax.nn.log_softmax(logits_BTV)
  logp_BT = jnp.take_along_axis(logp_BTV, ids_BT[:, 1:, None], axis=-1)[..., 0]
  entropy_BT = -(jnp.exp(logp_BTV) * logp_BTV).sum(-1)
  return logp_BT[:, -C:], entropy_BT[:, -C:]


def toy_batch(seed: int = 0, B: int = 16, **replace) -> UpdateBatch:
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, C + 1, B)
  batch = UpdateBatch(
      inputs={"input_ids": rng.integers(0, V, (B, P + C)).astype(np.int32)},
      mask_RC=(np.arange(C)[None] < lengths[:, None]).astype(np.float32),
      A_R=rng.normal(0, 1, B).astype(np.float32),
      is_external_R=(np.arange(B) % 4 == 3),
      ref_logp_RC=np.log(rng.uniform(0.02, 0.3, (B, C))).astype(np.float32),
      behaviour_logp_RC=np.log(rng.uniform(0.02, 0.3, (B, C))).astype(np.float32),
      has_behaviour_R=(np.arange(B) % 8 == 3),
  )
  return batch.replace(**replace)


def rl_cfg(**kw):
  c = config.default()
  c.update(dict(beta=0.04, eps_high=0.28, entropy_coef=0.01, max_len_norm=C))
  c.update(kw)
  return c


def replicate(tree, mesh):
  """Every leaf fully replicated over the mesh (multi-process safe: each process passes the same values)."""
  s = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.tree.map(lambda x: jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x)[idx]), tree)


def run_steps(cfg, batch, n_steps=1, optimizer=None, mesh=None, params=None):
  """Returns (params as numpy, list of metrics as numpy)."""
  optimizer = optimizer or optax.sgd(1.0)
  params = toy_params() if params is None else params
  state = update.init_state(jax.tree.map(jnp.asarray, params), optimizer)
  step_fn, state_sharding = update.make_train_step(toy_logprob_fn, optimizer, cfg), None
  if mesh is not None:
    state_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = replicate(state, mesh)
    batch = update.shard_batch(batch, mesh)
    step_fn = update.make_train_step(toy_logprob_fn, optimizer, cfg, state_sharding=state_sharding)
  metrics = []
  for _ in range(n_steps):
    state, m = step_fn(state, batch)
    metrics.append(jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), m))
  local = lambda x: np.asarray(x.addressable_data(0))
  return jax.tree.map(local, state.params), metrics, jax.tree.map(local, state)


def _close(a, b, **kw):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **kw), a, b)


@pytest.mark.parametrize("aggregation", loss.AGGREGATIONS)
def test_micro_batches_equal_big_batch(aggregation):
  """k micro-batches == one batch: loss, and the gradient (SGD with lr 1: new params = params - grad)."""
  cfg1, cfg4 = rl_cfg(aggregation=aggregation), rl_cfg(aggregation=aggregation, micro_batches=4)
  batch = toy_batch(1)
  p1, m1, _ = run_steps(cfg1, batch)
  p4, m4, _ = run_steps(cfg4, batch)
  np.testing.assert_allclose(m4[0]["loss"], m1[0]["loss"], rtol=1e-6, atol=1e-7)
  _close(p4, p1, rtol=1e-6, atol=1e-7)
  for key in ("kl", "entropy", "rho_mean/policy", "rho_max/external"):
    np.testing.assert_allclose(m4[0][key], m1[0][key], rtol=1e-6)


def test_step_gradient_matches_direct_grad():
  """The step's gradient is the gradient of loss_sum / denom of the whole batch."""
  cfg, batch = rl_cfg(aggregation="seq_mean_token_mean", micro_batches=2), toy_batch(2)
  params = jax.tree.map(jnp.asarray, toy_params())

  def direct(p):
    logp, ent = toy_logprob_fn(p, batch.inputs)
    s, d, _ = loss.grpo_loss(logp, logp, batch.replace(behaviour_logp_RC=None), cfg, entropy_BC=ent)
    return s / d

  g = jax.grad(direct)(params)
  p_new, m, _ = run_steps(cfg, batch)
  _close(jax.tree.map(lambda p, n: p - n, toy_params(), p_new), g, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(m[0]["loss"], direct(params), rtol=1e-6)


def test_mu_epochs_fix_old_logp():
  """mu = 2 == two mu = 1 updates that both use pi_old = the policy before the first update; rho != 1 after it."""
  cfg2, batch = rl_cfg(mu=2, micro_batches=2, external_treatment="importance"), toy_batch(3)
  opt = optax.adam(0.05)
  p2, m2, s2 = run_steps(cfg2, batch, optimizer=opt)
  old = np.asarray(toy_logprob_fn(jax.tree.map(jnp.asarray, toy_params()), batch.inputs)[0])
  manual = batch.replace(old_logp_RC=old)
  cfg1 = rl_cfg(mu=1, micro_batches=2, external_treatment="importance")
  p1, m1, s1 = run_steps(cfg1, manual, n_steps=2, optimizer=opt)
  _close(p2, p1, rtol=1e-5, atol=1e-6)
  assert int(s2.step) == 1 and int(s1.step) == 2
  assert m2[0]["rho_max/policy"] > 1.0 + 1e-3 or m2[0]["rho_min/policy"] < 1.0 - 1e-3


def test_non_finite_skips_update():
  cfg, batch = rl_cfg(micro_batches=2), toy_batch(4)
  batch.A_R[5] = np.nan
  opt = optax.adam(0.1)
  p, m, s = run_steps(cfg, batch, n_steps=2, optimizer=opt)
  _close(p, toy_params(), rtol=0, atol=0)
  fresh = jax.tree.map(np.asarray, update.init_state(jax.tree.map(jnp.asarray, toy_params()), opt).opt_state)
  _close(s.opt_state, fresh, rtol=0, atol=0)
  assert int(s.skipped_steps) == 2 and int(s.step) == 2
  assert m[0]["skipped"] == 1 and m[1]["skipped_steps"] == 2 and not np.isfinite(m[0]["loss"])


def test_beta_zero_needs_no_reference():
  cfg, batch = rl_cfg(beta=0.0), toy_batch(5, ref_logp_RC=None)
  p, m, _ = run_steps(cfg, batch)
  assert np.isfinite(m[0]["loss"]) and "kl" not in m[0]


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1)])
def test_mesh_matches_one_device(mesh_shape):
  """8 CPU devices (batch over data x fsdp) == 1 device: loss and params after two AdamW steps."""
  assert jax.device_count() >= 8
  cfg = rl_cfg(mu=2, micro_batches=2, external_treatment="luffy")
  opt = update.make_optimizer(_opt_cfg())
  batch = toy_batch(6)
  p1, m1, _ = run_steps(cfg, batch, n_steps=2, optimizer=opt)
  mesh = sharding.make_mesh(mesh_shape)
  p8, m8, _ = run_steps(cfg, batch, n_steps=2, optimizer=opt, mesh=mesh)
  for a, b in zip(m1, m8):
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-6, atol=1e-6)
  _close(p8, p1, rtol=1e-6, atol=1e-6)


def _opt_cfg():
  o = config.default().optimizer
  o.lr, o.schedule, o.warmup_steps, o.total_steps, o.weight_decay = 1e-2, "cosine", 1, 10, 0.1
  return o


def test_config_defaults_and_schedules():
  c = config.default()
  assert (c.group_size, c.beta, c.kl_estimator, c.adv_eps, c.mu, c.optimizer.lr) == (8, 0.04, "k3", 1e-4, 1, 1e-6)
  assert c.dual_clip is None and c.optimizer.grad_clip == 1.0
  o = c.optimizer
  o.lr, o.warmup_steps = 1.0, 0
  assert float(update.lr_schedule(o)(5)) == 1.0
  o.schedule = "cosine"
  o.total_steps = 10
  assert float(update.lr_schedule(o)(0)) == pytest.approx(1.0) and float(update.lr_schedule(o)(10)) == pytest.approx(
      0.0
  )
  o.warmup_steps, o.schedule = 4, "constant"
  assert float(update.lr_schedule(o)(2)) == pytest.approx(0.5) and float(update.lr_schedule(o)(9)) == 1.0


@pytest.mark.parametrize("which", ["rl", "sft"])
def test_mu_dtype_bfloat16_is_adamw_with_a_rounded_first_moment(which):
  """Two AdamW steps by hand (Loshchilov & Hutter; optax's bias correction), m stored in bfloat16 between steps: optax
  computes b1 * m in m's dtype, adds (1 - b1) g in float32, and rounds the new m to bfloat16 only when storing it."""
  from ekipl_jax.train import sft  # pylint: disable=g-import-not-at-top

  lr, b1, b2, eps, wd = 0.1, 0.9, 0.999, 1e-8, 0.0
  if which == "rl":
    o = config.default().optimizer
    o.lr, o.grad_clip, o.mu_dtype = lr, None, "bfloat16"
    opt = update.make_optimizer(o)
  else:
    s = ml_collections.ConfigDict(dict(lr=lr, warmup_steps=0, weight_decay=wd, grad_clip=1e6, mu_dtype="bfloat16"))
    opt = sft.optimizer_for(s, total_steps=10**6)  # cosine over 10^6 steps: lr constant to 1e-11 over two steps
  p = {"w": np.array([0.3, -1.7, 2.2], np.float32)}
  grads = [np.array([0.123456, -3.3, 1e-3], np.float32), np.array([-0.5, 0.77777, 2.0], np.float32)]
  state = opt.init(p)
  leaves = [x for x in jax.tree.leaves(state) if getattr(x, "shape", ()) == (3,)]
  assert sorted(str(x.dtype) for x in leaves) == ["bfloat16", "float32"]  # m in bfloat16, v in float32
  m = v = np.zeros(3, np.float64)
  bf16 = lambda x: np.asarray(jnp.asarray(x, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32), np.float64)
  w = p["w"].astype(np.float64)
  for t, g in enumerate(grads, start=1):
    upd, state = opt.update({"w": g}, state, p)
    p = optax.apply_updates(p, upd)
    b1_m = np.asarray(bf16(bf16(b1) * m), np.float64)  # a weakly typed b1 times bf16 m: b1 rounded, product rounded
    m_f32 = (1 - b1) * g.astype(np.float64) + b1_m  # this step's m, used unrounded for the update
    v = b2 * v + (1 - b2) * g.astype(np.float64) ** 2
    w = w - lr * ((m_f32 / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps) + wd * w)
    m = np.asarray(bf16(m_f32), np.float64)  # stored
    np.testing.assert_allclose(np.asarray(p["w"]), w, rtol=1e-5, atol=1e-6)
  m_stored = [x for x in jax.tree.leaves(state) if getattr(x, "dtype", None) == jnp.bfloat16][0]
  np.testing.assert_array_equal(np.asarray(m_stored, np.float64), m)
  full = update.make_optimizer(config.default().optimizer)  # the default keeps m in float32
  assert all(x.dtype != jnp.bfloat16 for x in jax.tree.leaves(full.init(p)))
