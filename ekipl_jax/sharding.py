"""Logical axis names -> mesh axes (data, fsdp, tensor); mesh creation; multi-host start-up.

Model code only names logical axes ("batch", "embed", "heads", ...). `RULES` (config, a tuple of (logical, mesh_axis)
pairs; mesh_axis is a mesh axis name, a tuple of names, or None) decides where each goes. A mesh axis that does not
divide the tensor dimension is dropped for that tensor (so tiny models and odd batches still place).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

MeshAxis = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxis], ...]

RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("sequence", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("vision_embed", "fsdp"),
    ("vision_heads", "tensor"),
    ("vision_mlp", "tensor"),
    ("vision_patch", None),
)


def make_mesh(
    shape: Sequence[int] = (1, -1, 1), axes: Sequence[str] = MESH_AXES, devices: Sequence[jax.Device] | None = None
) -> Mesh:
  """A mesh over `devices` (default all); one entry of `shape` may be -1 (takes the remaining devices)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = list(shape)
  if shape.count(-1) > 1:
    raise ValueError(f"at most one -1 in mesh shape {shape}")
  if -1 in shape:
    rest = int(np.prod([s for s in shape if s != -1]))
    shape[shape.index(-1)] = len(devices) // rest
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f"mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices, have {len(devices)}")
  return Mesh(np.asarray(devices).reshape(shape), tuple(axes))


def _as_tuple(m: MeshAxis) -> tuple[str, ...]:
  return () if m is None else (m,) if isinstance(m, str) else tuple(m)


def logical_to_spec(
    axes: Sequence[str | None], mesh: Mesh, rules: Rules = RULES, shape: Sequence[int] | None = None
) -> PartitionSpec:
  """PartitionSpec for a tensor whose dims carry logical `axes` (None = replicated dim).

  Raises if two dims of the tensor would use the same mesh axis. With `shape`, mesh axes that do not divide the dim
  are dropped."""
  table = dict(rules)
  used: dict[str, str] = {}
  spec = []
  for i, name in enumerate(axes):
    mesh_axes = _as_tuple(table.get(name)) if name is not None else ()
    for m in mesh_axes:
      if m not in mesh.shape:
        raise ValueError(f"rule for {name!r} names mesh axis {m!r}; mesh has {tuple(mesh.shape)}")
      if m in used:
        raise ValueError(f"logical axes {used[m]!r} and {name!r} of one tensor both map to mesh axis {m!r}")
      used[m] = name
    if shape is not None:
      kept, size = [], 1
      for m in mesh_axes:
        if shape[i] % (size * mesh.shape[m]) == 0:
          kept.append(m)
          size *= mesh.shape[m]
      mesh_axes = tuple(kept)
    spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
  return PartitionSpec(*spec)


def logical_sharding(
    axes: Sequence[str | None], mesh: Mesh, rules: Rules = RULES, shape: Sequence[int] | None = None
) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(axes, mesh, rules, shape))


def constrain(x: jax.Array, axes: Sequence[str | None], mesh: Mesh | None, rules: Rules = RULES) -> jax.Array:
  """with_sharding_constraint by logical axes; identity when mesh is None."""
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, logical_sharding(axes, mesh, rules, x.shape))


def constrain_like(tree, shardings):
  """with_sharding_constraint of each leaf of `tree` to its sharding in `shardings` (same structure, or one Sharding
  for every leaf); identity when `shardings` is None."""
  if shardings is None:
    return tree
  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, shardings), tree)
  return jax.tree.map(jax.lax.with_sharding_constraint, tree, shardings)


def params_part(state_sharding):
  """The params' shardings in a train state's out-sharding (a TrainState of shardings, one Sharding for all, or
  None)."""
  return getattr(state_sharding, "params", state_sharding)


def grad_accumulator(params, shardings=None):
  """float32 zeros shaped and placed like `params` (shardings: the params' shardings, or None). A bare jnp.zeros in a
  jitted step carries no sharding and leaves the accumulator's placement to XLA's propagation; pinned, a gradient
  sum is never whole on every chip."""
  return constrain_like(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params), shardings)


def add_grads(g_acc, g, shardings=None):
  """g_acc + g in float32, both kept placed like the params (shardings, or None): one micro-batch's accumulation."""
  return constrain_like(jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g), shardings)


_CLUSTER_VARS = ("JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES")


def to_host(x) -> np.ndarray:
  """A global array as host numpy on every process (all-gathers the slices other hosts hold)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def init_distributed(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None, **kwargs
) -> None:
  """Start multi-host JAX (before any other JAX call). No-op when already started, or on a single process: nothing
  given and no multi-process environment (coordinator variables, SLURM_NTASKS > 1, OMPI_COMM_WORLD_SIZE > 1)."""
  import os

  multi = (
      any(os.environ.get(k) for k in _CLUSTER_VARS)
      or int(os.environ.get("SLURM_NTASKS", "1")) > 1
      or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
  )
  if jax.distributed.is_initialized() or (coordinator_address is None and num_processes in (None, 1) and not multi):
    return
  jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id, **kwargs
  )
