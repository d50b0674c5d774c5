"""Group assembly: row order, masks, source ids, truncation, behaviour log-probs, missing ids, malformed records."""

import types

import numpy as np
import pytest

from ekipl_jax.data.aux_store import AuxResponse, AuxStore, AuxStoreError, AuxStoreWriter
from ekipl_jax.sampling.groups import Codec, assemble, repeat_images

EOS, PAD = 1, 0
WORDS = {w: i + 10 for i, w in enumerate("a b c d e f g h i j k l".split())}
INV = {v: k for k, v in WORDS.items()}


def tokenize(text):  # a tiny word-level "policy tokenizer"
  return [WORDS[w] for w in text.split()]


def detokenize(ids):
  return " ".join(INV[i] for i in ids)


CODEC = Codec(tokenize, detokenize, end_ids=(EOS,), eos_token_ids=(EOS,), pad_id=PAD)


def _policy(B, N, C):
  """Fake sampler output: row n has n % C + 1 tokens, the last one EOS except for full-length rows."""
  tokens = np.full((B * N, C), PAD, np.int32)
  lengths = np.zeros(B * N, np.int32)
  logp = np.zeros((B * N, C), np.float32)
  plogp = np.zeros((B * N, C), np.float32)
  for n in range(B * N):
    ln = n % C + 1
    tokens[n, :ln] = 10 + n % 5
    if ln < C:
      tokens[n, ln - 1] = EOS
    lengths[n] = ln
    logp[n, :ln] = -0.5
    plogp[n, :ln] = -1.0 - n
  return types.SimpleNamespace(tokens=tokens, lengths=lengths, logprobs=logp, policy_logprobs=plogp)


@pytest.fixture
def store(tmp_path):
  root = str(tmp_path / "store")
  with AuxStoreWriter(root) as w:
    w.append(AuxResponse(id="p0", source="gemini", text="a b"))
    w.append(AuxResponse(id="p0", source="gpt-4o", sample=1, text="c d e"))
    w.append(
        AuxResponse(
            id="p0", source="gpt-4o", sample=0, text="f", behaviour_logprobs=[-1.0, -2.0], behaviour_tokenizer="tiny"
        )
    )
    w.append(AuxResponse(id="p0", source="gpt-4o", sample=2, text="g"))  # beyond K = 2
    w.append(AuxResponse(id="p0", source="other", text="h"))  # not in the name table
    w.append(
        AuxResponse(
            id="p2", source="gpt-4o", text="a b c d e f g", behaviour_logprobs=[-1.0] * 8, behaviour_tokenizer="tiny"
        )
    )  # 7 words + EOS > C = 5: truncated
  return AuxStore(root)


def test_assemble_layout(store):
  B, N, C, P = 3, 2, 5, 4
  prompt_ids = np.arange(B * P).reshape(B, P)
  prompt_mask = np.ones((B, P), np.int32)
  prompt_mask[1, :2] = 0
  policy = _policy(B, N, C)
  g = assemble(
      prompt_ids,
      prompt_mask,
      ["p0", "p1", "p2"],
      policy,
      store,
      CODEC,
      source_names=["gpt-4o", "gemini"],
      k_per_source=2,
      tokenizer_name="tiny",
  )
  assert g.source_names == ("policy", "gpt-4o", "gemini")
  # p0: 2 policy, gpt-4o samples 0 and 1, gemini; p1: 2 policy (missing); p2: 2 policy, 1 gpt-4o.
  np.testing.assert_array_equal(g.prompt_index_R, [0, 0, 0, 0, 0, 1, 1, 2, 2, 2])
  np.testing.assert_array_equal(g.source_R, [0, 0, 1, 1, 2, 0, 0, 0, 0, 1])
  np.testing.assert_array_equal(g.prompt_ids_RP, prompt_ids[g.prompt_index_R])
  np.testing.assert_array_equal(g.prompt_mask_RP, prompt_mask[g.prompt_index_R])
  assert g.metrics["groups/missing_external"] == 1 and g.metrics["groups/external_rows"] == 4
  assert g.metrics["groups/external_truncated"] == 1
  # policy rows are copied as sampled
  pol = np.flatnonzero(g.source_R == 0)
  np.testing.assert_array_equal(g.completion_ids_RC[pol], policy.tokens)
  np.testing.assert_array_equal(g.completion_mask_RC[pol].sum(1), policy.lengths)
  assert g.has_behaviour_R[pol].all()
  # the sampler's temperature-scaled log-probs ride along with each policy row (0 on external rows)
  np.testing.assert_array_equal(g.sampler_logp_RC[pol], policy.policy_logprobs)
  assert (g.sampler_logp_RC[g.source_R > 0] == 0).all()
  np.testing.assert_array_equal(g.truncated_R[pol], policy.lengths == C)  # rows that never sampled EOS
  # external rows: tokens + EOS, right padded, in sample order
  np.testing.assert_array_equal(g.completion_ids_RC[2], [WORDS["f"], EOS, PAD, PAD, PAD])
  np.testing.assert_array_equal(g.completion_ids_RC[3], [WORDS["c"], WORDS["d"], WORDS["e"], EOS, PAD])
  np.testing.assert_array_equal(g.completion_mask_RC[3], [1, 1, 1, 1, 0])
  np.testing.assert_array_equal(g.completion_ids_RC[4], [WORDS["a"], WORDS["b"], EOS, PAD, PAD])
  assert g.texts[2] == "f" and g.texts[4] == "a b"
  assert not g.truncated_R[2:5].any()
  # behaviour log-probs only where the tokenizer and length match
  assert g.has_behaviour_R[2] and not g.has_behaviour_R[3] and not g.has_behaviour_R[4]
  np.testing.assert_array_equal(g.behaviour_logp_RC[2], [-1, -2, 0, 0, 0])
  np.testing.assert_array_equal(g.behaviour_logp_RC[3], 0)
  # truncated external: first C tokens, no EOS, flagged, text decoded from what is kept
  np.testing.assert_array_equal(g.completion_ids_RC[9], [WORDS[w] for w in "a b c d e".split()])
  assert g.truncated_R[9] and g.completion_mask_RC[9].all() and g.texts[9] == "a b c d e"
  assert g.has_behaviour_R[9] and (g.behaviour_logp_RC[9] == -1).all()
  # policy texts drop the EOS
  assert g.texts[0] == detokenize(policy.tokens[0, : policy.lengths[0] - 1])


def test_no_store_gives_policy_only():
  policy = _policy(2, 3, 4)
  g = assemble(
      np.ones((2, 3)),
      np.ones((2, 3)),
      ["a", "b"],
      policy,
      None,
      Codec(tokenize, detokenize, (EOS,), (EOS,)),
      source_names=[],
      k_per_source=1,
  )
  assert (g.source_R == 0).all() and len(g.texts) == 6 and g.metrics["groups/missing_external"] == 2


def test_malformed_record_raises_with_id_and_file(tmp_path):
  root = str(tmp_path / "store")
  with AuxStoreWriter(root) as w:
    w.append(AuxResponse(id="p0", source="gpt-4o", text="a"))
  path = f"{root}/sources/gpt-4o/shard-00000.jsonl"  # one folder per source (data/aux_store/layout.py)
  raw = open(path, "rb").read()
  open(path, "wb").write(raw.replace(b'"text"', b'"tex\\u'))  # broken JSON escape, same length
  with pytest.raises(AuxStoreError, match=r"'p0'.*shard-00000\.jsonl"):
    assemble(
        np.ones((1, 2)),
        np.ones((1, 2)),
        ["p0"],
        _policy(1, 1, 3),
        AuxStore(root),
        CODEC,
        source_names=["gpt-4o"],
        k_per_source=1,
    )


def test_repeat_images():
  grid = np.array([[1, 2, 2], [1, 2, 4], [1, 4, 2]])
  pv = np.arange(20)[:, None].astype(np.float32)  # 4 + 8 + 8 patches
  out_pv, out_grid = repeat_images(pv, grid, [1, 2], np.array([0, 1, 1, 0]))
  np.testing.assert_array_equal(out_grid, grid[[0, 1, 2, 1, 2, 0]])
  np.testing.assert_array_equal(
      out_pv[:, 0], np.concatenate([np.arange(4), np.arange(4, 20), np.arange(4, 20), np.arange(4)])
  )
