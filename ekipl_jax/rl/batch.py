"""The update batch: everything one update step (rl/update.py) reads, as a typed pytree (flax.struct), so that jit,
jax.tree.map, micro-batch splitting and sharding see its arrays and the contract lives in the type.

Legend: R rows (the kept rows of a step), C completion tokens, T = P + C tokens of a row (P prompt tokens).
Every leaf's leading axis is R, or a multiple n*R whose row r owns entries r*n .. r*n+n-1 (per-row image patches).
"""

from __future__ import annotations

from typing import Any, Optional

import flax
import jax
import numpy as np

Array = jax.Array | np.ndarray


@flax.struct.dataclass
class UpdateBatch:
  mask_RC: Array  # 1 on completion tokens (the end token included), 0 on padding
  A_R: Array  # float32 advantages A_i
  is_external_R: Array  # bool: the row is a stored external response (source > 0)
  # The policy's row inputs (train/batching.rows_batch): input_ids [R, T], attention_mask [R, T],
  # mm_token_type_ids [R, T], positions [R, 3, T] and the packed image arrays (models/packed.py: PACKED_KEYS); the
  # step hands them to logprob_fn unchanged.
  inputs: Optional[dict[str, Array]] = None
  behaviour_logp_RC: Optional[Array] = None  # log pi_behaviour of external rows ('importance', 'importance_tis')
  has_behaviour_R: Optional[Array] = None  # bool: behaviour_logp_RC is known for the row (None: every row)
  ref_logp_RC: Optional[Array] = None  # log pi_ref of the frozen reference (needed when beta != 0)
  old_logp_RC: Optional[Array] = None  # log pi_old (else the policy's log-probs before the first inner update)
  sampler_logp_RC: Optional[Array] = None  # the sampler's log-probs of policy rows (health check metric)

  @property
  def num_rows(self) -> int:
    return self.mask_RC.shape[0]


def from_rows(rows: dict[str, Any], **fields) -> UpdateBatch:
  """An UpdateBatch from train/batching.rows_batch's dict (its "mask" becomes mask_RC) and the named fields."""
  inputs = {k: v for k, v in rows.items() if k != "mask"}
  return UpdateBatch(mask_RC=rows["mask"], inputs=inputs, **fields)
