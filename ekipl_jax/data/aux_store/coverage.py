"""Coverage check of the aux store, run by the trainer before RL starts: every configured source is in the store
and covers at least `min_coverage` of the training ids (config key aux.min_coverage); otherwise EKIPL would quietly
train as GRPO on the uncovered prompts."""

from __future__ import annotations

from typing import Callable, Iterable

from ekipl_jax.data.aux_store.reader import AuxStore
from ekipl_jax.data.aux_store.records import AuxCoverageError


def check_coverage(
    store: AuxStore,
    ids: Iterable[str],
    sources: Iterable[str],
    min_coverage: float = 1.0,
    log: Callable[[str], None] | None = print,
) -> dict[str, float]:
  """{source: share of `ids` with at least one response of that source}; one line per source goes to `log`.

  Raises AuxCoverageError (naming the store, the source and example ids) when no source is configured, when a
  configured source is not in the store, or when a source covers less than `min_coverage` of the ids (config key
  aux.min_coverage; 1.0 = every id). Run before RL: an uncovered prompt gets no external response, and EKIPL on it
  is plain GRPO."""
  if not 0.0 <= min_coverage <= 1.0:
    raise ValueError(f"config key aux.min_coverage: {min_coverage} is not in [0, 1]")
  ids, sources = list(dict.fromkeys(ids)), list(sources)
  present = store.sources()
  if not sources:
    raise AuxCoverageError(
        f"config key aux.sources names no source to draw from (the store {store.root} has {present})"
    )
  for source in sources:
    if source not in present:
      raise AuxCoverageError(
          f"aux store {store.root} has no responses of source {source!r} (config key aux.sources); it has "
          f"{present or 'none'}"
      )
  shares = {}
  for source in sources:
    missing = [i for i in ids if source not in store.sources_of(i)]
    shares[source] = 1.0 - len(missing) / len(ids) if ids else 1.0
    if log is not None:
      log(f"aux store {store.root}: source {source!r} covers {len(ids) - len(missing)} of {len(ids)} training ids")
    if shares[source] < min_coverage:
      shown = ", ".join(repr(i) for i in missing[:5]) + (" ..." if len(missing) > 5 else "")
      raise AuxCoverageError(
          f"aux store {store.root}: source {source!r} has no response for {len(missing)} of {len(ids)} training ids "
          f"({shares[source]:.1%} covered, config key aux.min_coverage = {min_coverage}), e.g. {shown}. Write them "
          f"(experiments/precompute_aux.py resumes) or lower aux.min_coverage to train on the rest as plain GRPO"
      )
  return shares
