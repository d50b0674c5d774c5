"""Group assembly: policy samples + stored external responses -> one padded host-side layout (numpy).

Legend: B prompts in the batch; N policy samples per prompt (the sampler's rows: B*N, prompt-major); R output rows
(per prompt: its N policy rows, then its external rows); P prompt tokens (left padded); C completion tokens
(= max_new_tokens, right padded). (G, the kept group size, belongs to selection: rl/selection.py.)

Per prompt b the rows are: its N policy samples (in sampler order), then up to K responses of each external source
in `source_names` order (source id 1..M), each source's responses in stored `sample` order. An external response is
tokenized with the policy's tokenizer (`codec.tokenize`: text -> ids, no special tokens added) and followed by
`codec.end_ids` (the chat template's end of an assistant turn, e.g. [<|im_end|>]), exactly as the sampler emits a
finished completion (it stops right after the EOS it sampled, and that EOS is part of the completion). A response
longer than C is cut to C tokens (no end token then) and flagged `truncated`; a policy row that hit max_new_tokens
without an EOS is flagged the same way.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from ekipl_jax.data.aux_store import AuxResponse, AuxStore

POLICY = "policy"


@dataclasses.dataclass(frozen=True)
class Codec:
  """How completions are read and written with the policy's tokenizer."""

  tokenize: Callable[[str], Sequence[int]]  # text -> ids, no special tokens (the completion sits after the prompt)
  detokenize: Callable[[Sequence[int]], str]  # ids -> completion text for the rewards (EOS and padding removed)
  end_ids: tuple[int, ...]  # appended after an external text: the chat template's end of an assistant turn
  eos_token_ids: tuple[int, ...]  # tokens that end a policy sample
  pad_id: int = 0  # completion padding


@dataclasses.dataclass
class Groups:
  """Host arrays, R rows. source_names[s] names source id s (0 = "policy")."""

  prompt_ids_RP: np.ndarray  # int32, left padded
  prompt_mask_RP: np.ndarray  # int32
  completion_ids_RC: np.ndarray  # int32, right padded with pad_id
  completion_mask_RC: np.ndarray  # int32, 1 on completion tokens (EOS/end token included)
  source_R: np.ndarray  # int32, 0 policy, 1..M external
  behaviour_logp_RC: np.ndarray  # float32, 0 where unknown (policy rows: the sampler's log-probs)
  has_behaviour_R: np.ndarray  # bool
  sampler_logp_RC: np.ndarray  # float32: policy rows: the sampler's log_softmax(logits / T) (0 if not given); else 0
  truncated_R: np.ndarray  # bool: ended at C tokens without an end token
  prompt_index_R: np.ndarray  # int32, which prompt of the batch the row belongs to
  texts: list[str]  # completion texts for the rewards
  source_names: tuple[str, ...]
  metrics: dict[str, float]


def _external_row(
    resp: AuxResponse,
    tokenize: Callable[[str], Sequence[int]],
    end_ids: Sequence[int],
    C: int,
    tokenizer_name: str | None,
):
  """(ids, behaviour logp or None, truncated) for one external response."""
  ids = list(tokenize(resp.text)) + list(end_ids)
  lp = resp.behaviour_logprobs
  known = (
      lp is not None
      and tokenizer_name is not None
      and resp.behaviour_tokenizer == tokenizer_name
      and len(lp) == len(ids)
  )
  truncated = len(ids) > C
  ids = ids[:C]
  return ids, (np.asarray(lp[:C], np.float32) if known else None), truncated


def assemble(
    prompt_ids_BP: np.ndarray,
    prompt_mask_BP: np.ndarray,
    example_ids: Sequence[str],
    policy,
    store: AuxStore | None,
    codec: Codec,
    *,
    source_names: Sequence[str],
    k_per_source: int,
    tokenizer_name: str | None = None,
) -> Groups:
  """Build the group layout. `policy` is the sampler's output (`generate`, num_samples = N): prompt-major rows
  B*N with .tokens [B*N, C], .lengths [B*N], .logprobs [B*N, C] (the log-probs of the distribution actually sampled
  from; they become the policy rows' behaviour log-probs; may be None) and .policy_logprobs [B*N, C] (optional: the
  temperature-scaled policy's, kept as sampler_logp_RC).

  source_names: the external model names in source-id order 1..M (responses of other sources are ignored);
  k_per_source: K responses read per source; tokenizer_name: the policy tokenizer's name, to decide whether stored
  behaviour log-probs refer to our tokens."""
  prompt_ids_BP, prompt_mask_BP = np.asarray(prompt_ids_BP), np.asarray(prompt_mask_BP)
  tokens_XC = np.asarray(policy.tokens)  # X = B*N sampler rows
  B, X, C = prompt_ids_BP.shape[0], tokens_XC.shape[0], tokens_XC.shape[1]
  if X % B or len(example_ids) != B:
    raise ValueError(f"{X} policy rows for {B} prompts / {len(example_ids)} ids")
  N = X // B
  lengths_X = np.asarray(policy.lengths)
  logp_XC = None if getattr(policy, "logprobs", None) is None else np.asarray(policy.logprobs, np.float32)
  plogp_XC = getattr(policy, "policy_logprobs", None)
  plogp_XC = None if plogp_XC is None else np.asarray(plogp_XC, np.float32)
  source_id = {name: i + 1 for i, name in enumerate(source_names)}
  eos = set(int(e) for e in codec.eos_token_ids)

  rows = []  # (prompt b, source, ids, logp or None, truncated, text, sampler row or -1)
  n_missing = n_ext = n_trunc_ext = 0
  for b in range(B):
    for n in range(b * N, (b + 1) * N):
      ln = int(lengths_X[n])
      ids = tokens_XC[n, :ln].tolist()
      ended = ln > 0 and ids[-1] in eos
      text = codec.detokenize(ids[:-1] if ended else ids)
      rows.append((b, 0, ids, None if logp_XC is None else logp_XC[n, :ln], not ended, text, n))
    responses = [] if store is None else store.get(example_ids[b])
    by_source: dict[int, list[AuxResponse]] = {}
    for r in responses:
      if r.source in source_id:
        by_source.setdefault(source_id[r.source], []).append(r)
    if not by_source:
      n_missing += 1
    for s in sorted(by_source):
      for r in sorted(by_source[s], key=lambda r: r.sample)[:k_per_source]:
        ids, lp, trunc = _external_row(r, codec.tokenize, codec.end_ids, C, tokenizer_name)
        text = codec.detokenize(ids) if trunc else r.text
        rows.append((b, s, ids, lp, trunc, text, -1))
        n_ext += 1
        n_trunc_ext += int(trunc)

  R = len(rows)
  completion_ids = np.full((R, C), codec.pad_id, np.int32)
  completion_mask = np.zeros((R, C), np.int32)
  behaviour = np.zeros((R, C), np.float32)
  sampler_logp = np.zeros((R, C), np.float32)
  has_behaviour = np.zeros(R, bool)
  truncated = np.zeros(R, bool)
  source = np.zeros(R, np.int32)
  prompt_index = np.zeros(R, np.int32)
  for r, (b, s, ids, lp, trunc, _, n) in enumerate(rows):
    completion_ids[r, : len(ids)] = ids
    completion_mask[r, : len(ids)] = 1
    if lp is not None:
      behaviour[r, : len(lp)] = lp
      has_behaviour[r] = True
    if n >= 0 and plogp_XC is not None:
      sampler_logp[r] = plogp_XC[n]
    truncated[r], source[r], prompt_index[r] = trunc, s, b
  metrics = {
      "groups/missing_external": float(n_missing),
      "groups/external_rows": float(n_ext),
      "groups/external_truncated": float(n_trunc_ext),
      "groups/external_with_behaviour": float((has_behaviour & (source > 0)).sum()),  # stored log-probs used
      "groups/rows": float(R),
  }
  return Groups(
      prompt_ids_RP=prompt_ids_BP[prompt_index].astype(np.int32),
      prompt_mask_RP=prompt_mask_BP[prompt_index].astype(np.int32),
      completion_ids_RC=completion_ids,
      completion_mask_RC=completion_mask,
      source_R=source,
      behaviour_logp_RC=behaviour,
      has_behaviour_R=has_behaviour,
      sampler_logp_RC=sampler_logp,
      truncated_R=truncated,
      prompt_index_R=prompt_index,
      texts=[row[5] for row in rows],
      source_names=(POLICY, *source_names),
      metrics=metrics,
  )


def repeat_images(
    pixel_values_NP: np.ndarray | None,
    image_grid_thw: np.ndarray | None,
    images_per_prompt: Sequence[int],
    prompt_index_R: np.ndarray,
):
  """Patches and grids for the rows (images in row order), given how many images each prompt of the batch has."""
  if pixel_values_NP is None:
    return None, None
  grid = np.asarray(image_grid_thw)
  patches = grid.prod(-1)
  img_start = np.concatenate([[0], np.cumsum(images_per_prompt)])
  patch_start = np.concatenate([[0], np.cumsum(patches)])
  pv, gr = [], []
  for b in np.asarray(prompt_index_R):
    for i in range(img_start[b], img_start[b + 1]):
      pv.append(pixel_values_NP[patch_start[i] : patch_start[i + 1]])
      gr.append(grid[i])
  if not gr:
    return None, None
  return np.concatenate(pv), np.stack(gr)
