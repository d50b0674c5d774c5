"""The settings of a sampler call, held once: `SamplingConfig`, and its `generate` that passes them to the sampler.

RL rollouts (train/rl_stages.sample), evaluation (train/evaluate.py) and the local-checkpoint aux-store writer
(sampling/checkpoint_source.py) sample prompt batches with the same arguments; each builds a SamplingConfig and calls
`sc.generate(...)` (prompt arrays) or `sc.generate_batch(...)` (a processor.prompt_batch dict) instead of spelling
out sampling.generate's keywords.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax

from ekipl_jax.sampling.sampler import SampleOutput, generate


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """N samples of at most C tokens per prompt, the truncated distribution they come from, and the tokenizer's ids."""

  num_samples: int  # N samples per prompt (rows b*N .. b*N+N-1 belong to prompt b)
  max_new_tokens: int  # C
  temperature: float  # 0 = greedy (argmax)
  top_p: float = 1.0  # nucleus mass kept (1 = off)
  top_k: int = 0  # most likely tokens kept (0 = off)
  eos_token_ids: tuple[int, ...] = ()  # a sampled one ends the row
  pad_token_id: int = 0  # fills a row after its end

  @classmethod
  def from_config(cls, rcfg, eos_token_ids: Sequence[int], pad_token_id: int) -> SamplingConfig:
    """RL rollouts: config rl.sampling and rl.num_policy_samples."""
    s = rcfg.sampling
    return cls(
        rcfg.num_policy_samples, s.max_new_tokens, s.temperature, s.top_p, s.top_k, tuple(eos_token_ids), pad_token_id
    )

  def generate(
      self,
      model,
      params,
      input_ids_BP,
      attention_mask_BP,
      pixel_values,
      image_grid_thw,
      *,
      rng: jax.Array,
      prompt_buckets: Sequence[int],
  ) -> SampleOutput:
    """sampling.generate with these settings; B*N rows, prompt-major."""
    return generate(
        model,
        params,
        input_ids_BP,
        attention_mask_BP,
        pixel_values,
        image_grid_thw,
        max_new_tokens=self.max_new_tokens,
        temperature=self.temperature,
        top_p=self.top_p,
        top_k=self.top_k,
        eos_token_ids=self.eos_token_ids,
        rng=rng,
        num_samples=self.num_samples,
        pad_token_id=self.pad_token_id,
        prompt_buckets=prompt_buckets,
    )

  def generate_batch(self, model, params, batch: Mapping, *, rng: jax.Array, prompt_buckets: Sequence[int]):
    """generate on a processor prompt batch (processor.prompt_batch: input_ids, attention_mask, pixel_values,
    image_grid_thw)."""
    return self.generate(
        model,
        params,
        batch["input_ids"],
        batch["attention_mask"],
        batch["pixel_values"],
        batch["image_grid_thw"],
        rng=rng,
        prompt_buckets=prompt_buckets,
    )
