"""Evaluation: generate with the benchmark's settings, score with the exact Reason-RFT scorers, Pass@K."""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from ekipl_jax import rewards
from ekipl_jax import sharding
from ekipl_jax.data import processor as processor_lib
from ekipl_jax.sampling.config import SamplingConfig
from ekipl_jax.train import report

# Reason-RFT test split -> scorer of rewards.score(), per task.
SCORERS = {
    ("counting", "test_id"): "clevr-math",
    ("counting", "test_ood"): "super-clevr",
    ("structure", "test_id"): "geomath",
    ("structure", "test_ood"): "geometry3k",
    ("spatial", "test_id"): "trance",
    ("spatial", "test_ood_left"): "trance-left",
    ("spatial", "test_ood_right"): "trance-right",
}


def scorer_for(dcfg, split: str) -> str:
  if dcfg.eval_scorer:
    return dcfg.eval_scorer
  try:
    return SCORERS[(dcfg.task, split)]
  except KeyError:
    raise ValueError(f"config key data.eval_scorer: no scorer known for task {dcfg.task!r} split {split!r}") from None


def evaluate(
    model,
    params,
    proc,
    examples: Sequence[dict],
    *,
    scorer: str,
    ecfg,
    prompt_buckets: Sequence[int],
    rng: jax.Array,
    templates=None,
) -> tuple[dict[str, float], list[dict]]:
  """-> ({accuracy, pass@k, mean_length} in percent / tokens, per-example predictions)."""
  k = int(ecfg.pass_k)
  sc = SamplingConfig(
      k, ecfg.max_new_tokens, ecfg.temperature, ecfg.top_p, ecfg.top_k, (proc.eos_token_id,), proc.pad_token_id
  )
  scores, passes, lengths, preds = [], [], [], []
  for start in range(0, len(examples), ecfg.batch_size):
    chunk = list(examples[start : start + ecfg.batch_size])
    pb = processor_lib.prompt_batch(proc, chunk, prompt_buckets, templates)
    out = sc.generate_batch(model, params, pb, rng=jax.random.fold_in(rng, start), prompt_buckets=prompt_buckets)
    tokens, lens = sharding.to_host(out.tokens), sharding.to_host(out.lengths)
    for b, ex in enumerate(chunk):
      texts = [proc.tokenizer.decode(tokens[b * k + j, : lens[b * k + j]], skip_special_tokens=True) for j in range(k)]
      s = [rewards.score(scorer, t, ex["answer"]) for t in texts]
      scores += s
      lengths += [int(n) for n in lens[b * k : (b + 1) * k]]
      passes.append(report.pass_at_k(k, sum(v == 1.0 for v in s), k))
      preds.append({"id": ex["id"], "answer": ex["answer"], "predictions": texts, "scores": s})
  metrics = {
      "accuracy": 100.0 * float(np.mean(scores)),
      f"pass@{k}": 100.0 * float(np.mean(passes)),
      "mean_length": float(np.mean(lengths)),
  }
  return metrics, preds
