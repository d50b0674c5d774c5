"""A record of the aux store: `AuxResponse`, its validation when read, the store's errors, and the contamination
guard.

A record (one JSON line of a shard):

    {"id": str, "source": str (the external model's name), "sample": int (k-th response of that source for the id),
     "text": str (the completion only, no chat markup), "sampling": {temperature, top_p, ...} (free-form dict),
     "behaviour_logprobs": [float] | null (per-token log-probs of the behaviour model),
     "behaviour_tokenizer": str | null (the tokenizer those log-probs refer to: a name or HF path),
     "created_at": ISO-8601 str, "provenance": {...} (free-form: prompt version, API, request id, ...)}

Contamination guard: `refuse_ids` (a set/collection of ids, or a callable id -> bool that is True for a refused id,
e.g. the ids of an evaluation split) is checked on every append and on open (`check_refused`, also used by the
writers in aux_sources.py before any work); refused ids raise ContaminationError naming them.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from typing import Callable, Collection, Iterable

RefuseIds = Collection[str] | Callable[[str], bool] | None


class AuxStoreError(ValueError):
  """A malformed store or record (the message names the id and the file)."""


class AuxStoreLockedError(AuxStoreError):
  """Another process is writing the same source of the store (the message names it: pid, host, since)."""


class AuxCoverageError(AuxStoreError):
  """The store lacks a configured source, or responses for too many training ids (names store, source, ids)."""


class ContaminationError(ValueError):
  """Responses for refused (e.g. evaluation-split) ids were written or found in a store."""


@dataclasses.dataclass(frozen=True)
class AuxResponse:
  id: str
  source: str
  text: str
  sample: int = 0
  sampling: dict = dataclasses.field(default_factory=dict)
  behaviour_logprobs: list[float] | None = None
  behaviour_tokenizer: str | None = None
  created_at: str = ""
  provenance: dict = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


_FIELD_TYPES = {
    "id": str,
    "source": str,
    "text": str,
    "sample": int,
    "sampling": dict,
    "created_at": str,
    "provenance": dict,
}
_OPTIONAL = ("sample", "sampling", "created_at", "provenance")


def now() -> str:
  """The current UTC time as the store writes it (ISO-8601, seconds)."""
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def check_refused(ids: Iterable[str], refuse_ids: RefuseIds, where: str) -> None:
  """Raise ContaminationError naming every refused id among `ids` (`where`: the store or the writer)."""
  if refuse_ids is None:
    return
  test = refuse_ids if callable(refuse_ids) else refuse_ids.__contains__
  bad = sorted({i for i in ids if test(i)})
  if bad:
    shown = ", ".join(repr(b) for b in bad[:20]) + (f" ... ({len(bad)} in all)" if len(bad) > 20 else "")
    raise ContaminationError(f"{where}: responses for refused (evaluation) ids: {shown}")


def parse_record(line: bytes, expected_id: str, path: str) -> AuxResponse:
  """One JSONL line -> AuxResponse, validated; errors name the id and the file."""
  where = f"record for id {expected_id!r} in {path}"
  try:
    d = json.loads(line.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise AuxStoreError(f"malformed {where}: {e}") from None
  if not isinstance(d, dict):
    raise AuxStoreError(f"malformed {where}: not a JSON object")
  for name, typ in _FIELD_TYPES.items():
    if name in _OPTIONAL and name not in d:
      continue
    if not isinstance(d.get(name), typ) or (typ is int and isinstance(d.get(name), bool)):
      raise AuxStoreError(f"malformed {where}: field {name!r} must be {typ.__name__}, got {d.get(name)!r:.80}")
  if d["id"] != expected_id:
    raise AuxStoreError(f"malformed {where}: the record says id {d['id']!r} (index and shard disagree)")
  lp = d.get("behaviour_logprobs")
  if lp is not None and (not isinstance(lp, list) or not all(isinstance(x, (int, float)) for x in lp)):
    raise AuxStoreError(f"malformed {where}: behaviour_logprobs must be a list of numbers or null")
  known = {f.name for f in dataclasses.fields(AuxResponse)}
  return AuxResponse(**{k: v for k, v in d.items() if k in known})
