"""libtpu compiler flags this codebase's programs are planned with; set before JAX starts its TPU backend.

XLA's TPU compiler turns an FSDP matmul with an all-gathered (or reduce-scattered) operand into a "windowed einsum"
(collective matmul: the gather overlapped with slices of the matmul). Each such loop writes into a buffer allocated
up front, and in the backward pass of an unrolled decoder XLA schedules all of those allocations at the start of the
backward pass: one f32 [rows, T, intermediate] buffer per layer stays live at once. Measured with experiments/aot.py
(qwen2_vl_2b SFT step, v5e:2x4, a probe cut to 6 decoder / 2 vision layers): temporaries 4.25 GiB per chip with the
default flags, 3.23 GiB with the two flags below; the full model's step needed 14.00 GiB of temporaries (docs/TPU_PLAN.md).
The cost is the overlap of those collectives with compute; docs/TPU_PLAN.md has the plan compiled with them.

Flags the user already put in LIBTPU_INIT_ARGS win (a flag named there is not added again).
"""

from __future__ import annotations

import os
from typing import MutableMapping

FLAGS = (
    "--xla_tpu_enable_windowed_einsum_for_all_gather=false",
    "--xla_tpu_enable_windowed_einsum_for_reduce_scatter=false",
)


def libtpu_init_args(existing: str = "") -> str:
  """`existing` LIBTPU_INIT_ARGS with every flag of FLAGS it does not name appended."""
  named = {f.split("=", 1)[0] for f in existing.split()}
  return " ".join([existing.strip()] + [f for f in FLAGS if f.split("=", 1)[0] not in named]).strip()


def apply(environ: MutableMapping[str, str] = os.environ) -> str:
  """Set LIBTPU_INIT_ARGS (libtpu reads it when JAX first starts the TPU backend; a no-op on CPU / GPU); -> its value."""
  environ["LIBTPU_INIT_ARGS"] = libtpu_init_args(environ.get("LIBTPU_INIT_ARGS", ""))
  return environ["LIBTPU_INIT_ARGS"]
