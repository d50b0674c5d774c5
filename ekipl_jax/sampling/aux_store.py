"""The external-trajectory store: precomputed responses of auxiliary models, keyed by example id.

On-disk format (format_version 1), one folder:

    meta.json          {"format": "ekipl_aux_store", "format_version": 1, "created_at": ..., "notes": ...}
    shard-00000.jsonl  one JSON record per line (UTF-8), fields below
    shard-00000.idx    the offset index of that shard, one line per record:
                       "<id>\\t<source>\\t<sample>\\t<byte offset>\\t<byte length>\\n" (ids/sources hold no tab)
    shard-00001.jsonl  ... a new shard starts every `records_per_shard` records

A record:

    {"id": str, "source": str (the external model's name), "sample": int (k-th response of that source for the id),
     "text": str (the completion only, no chat markup), "sampling": {temperature, top_p, ...} (free-form dict),
     "behaviour_logprobs": [float] | null (per-token log-probs of the behaviour model),
     "behaviour_tokenizer": str | null (the tokenizer those log-probs refer to: a name or HF path),
     "created_at": ISO-8601 str, "provenance": {...} (free-form: prompt version, API, request id, ...)}

Reading is lazy: opening a store reads the `.idx` files only (a few tens of bytes per record) into a dict
id -> [(source, sample, shard, offset, length)]; `get(id)` seeks and reads just those byte ranges, so a lookup is
O(1) and a store of a million responses is never read whole (the writer's resume needs the index only). The writer
appends a record to the shard, flushes it, then appends its index line, so a crash leaves at worst an unindexed tail
that is ignored (a torn last index line is dropped, and cut by the next writer).
Resume: the writer skips (id, source, sample) keys already indexed. One writer at a time.

Contamination guard: `refuse_ids` (a set/collection of ids, or a callable id -> bool that is True for a refused id,
e.g. the ids of an evaluation split) is checked on every append and on open; refused ids raise ContaminationError
naming them.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from typing import Any, Callable, Collection, Iterable, Iterator

FORMAT = "ekipl_aux_store"
FORMAT_VERSION = 1
META = "meta.json"

RefuseIds = Collection[str] | Callable[[str], bool] | None


class AuxStoreError(ValueError):
  """A malformed store or record (the message names the id and the file)."""


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


def _shard_paths(root: str, shard: int) -> tuple[str, str]:
  return os.path.join(root, f"shard-{shard:05d}.jsonl"), os.path.join(root, f"shard-{shard:05d}.idx")


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _refused(ids: Iterable[str], refuse_ids: RefuseIds) -> list[str]:
  if refuse_ids is None:
    return []
  test = refuse_ids if callable(refuse_ids) else refuse_ids.__contains__
  return sorted({i for i in ids if test(i)})


def _raise_refused(bad: list[str], where: str) -> None:
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
    if name in ("sample", "sampling", "created_at", "provenance") and name not in d:
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


Entry = tuple[str, int, int, int, int]  # (source, sample, shard, offset, length)


def _read_index(root: str) -> tuple[list[str], dict[str, list[Entry]], dict[int, int]]:
  """(shard data paths, id -> [entries], shard -> number of records) from meta.json and the .idx files."""
  meta_path = os.path.join(root, META)
  try:
    with open(meta_path) as f:
      meta = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise AuxStoreError(f"cannot read {meta_path}: {e}") from None
  if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
    raise AuxStoreError(
        f"{meta_path}: format {meta.get('format')!r} version {meta.get('format_version')!r}; "
        f"this reader knows {FORMAT!r} version {FORMAT_VERSION}"
    )
  index: dict[str, list[Entry]] = {}
  counts: dict[int, int] = {}
  paths: list[str] = []
  shard = 0
  while os.path.exists(_shard_paths(root, shard)[1]):
    data_path, idx_path = _shard_paths(root, shard)
    paths.append(data_path)
    n = 0
    with open(idx_path, "rb") as f:
      raw = f.read()
    lines = raw.split(b"\n")
    if lines and lines[-1] != b"":  # torn last line (crash mid-write): the record is not indexed
      lines = lines[:-1]
    for lineno, ln in enumerate(lines, 1):
      if not ln:
        continue
      parts = ln.decode("utf-8").split("\t")
      try:
        entry = (parts[1], int(parts[2]), shard, int(parts[3]), int(parts[4]))
        if len(parts) != 5:
          raise ValueError
      except (ValueError, IndexError):
        raise AuxStoreError(f"malformed index line {lineno} in {idx_path}: {ln[:80]!r}") from None
      index.setdefault(parts[0], []).append(entry)
      n += 1
    counts[shard] = n
    shard += 1
  return paths, index, counts


class AuxStore:
  """Read side. `store[id]` / `store.get(id)` -> list[AuxResponse] (in write order; [] if none).

  Only the index is held in memory; `bytes_read` counts the record bytes read so far (for tests/metrics)."""

  def __init__(self, root: str, refuse_ids: RefuseIds = None):
    self.root = root
    self._paths, self._index, _ = _read_index(root)
    _raise_refused(_refused(self._index, refuse_ids), f"aux store {root}")
    self._files: dict[int, Any] = {}
    self.bytes_read = 0

  def __contains__(self, example_id: str) -> bool:
    return example_id in self._index

  def __len__(self) -> int:  # number of ids with at least one response
    return len(self._index)

  def ids(self) -> Iterator[str]:
    return iter(self._index)

  def num_records(self) -> int:
    return sum(len(v) for v in self._index.values())

  def _file(self, shard: int):
    if shard not in self._files:
      self._files[shard] = open(self._paths[shard], "rb")
    return self._files[shard]

  def get(self, example_id: str, source: str | None = None) -> list[AuxResponse]:
    out = []
    for src, _, shard, offset, length in self._index.get(example_id, ()):
      if source is not None and src != source:
        continue
      f = self._file(shard)
      f.seek(offset)
      line = f.read(length)
      self.bytes_read += len(line)
      if len(line) != length:
        raise AuxStoreError(
            f"malformed record for id {example_id!r} in {self._paths[shard]}: "
            f"index says {length} bytes at offset {offset}, file ends early"
        )
      rec = parse_record(line, example_id, self._paths[shard])
      if rec.source != src:
        raise AuxStoreError(
            f"malformed record for id {example_id!r} in {self._paths[shard]}: source "
            f"{rec.source!r} but the index says {src!r}"
        )
      out.append(rec)
    return out

  __getitem__ = get

  def sources(self) -> list[str]:
    """All source names (from the index)."""
    return sorted({e[0] for entries in self._index.values() for e in entries})

  def close(self) -> None:
    for f in self._files.values():
      f.close()
    self._files.clear()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def open_store(root: str, refuse_ids: RefuseIds = None) -> AuxStore:
  return AuxStore(root, refuse_ids=refuse_ids)


class AuxStoreWriter:
  """Append side, resumable: an (id, source, sample) already in the store is skipped (`append` returns False).

  with AuxStoreWriter(root, refuse_ids=eval_ids) as w:
      w.append(AuxResponse(id="clevr_17", source="gpt-4o", text="<think>...</think><answer>3</answer>"))
  """

  def __init__(self, root: str, refuse_ids: RefuseIds = None, records_per_shard: int = 100_000, notes: str = ""):
    self.root = root
    self.refuse_ids = refuse_ids
    self.records_per_shard = records_per_shard
    os.makedirs(root, exist_ok=True)
    if not os.path.exists(os.path.join(root, META)):
      with open(os.path.join(root, META), "w") as f:
        json.dump(
            {"format": FORMAT, "format_version": FORMAT_VERSION, "created_at": _now(), "notes": notes}, f, indent=1
        )
    paths, index, counts = _read_index(root)
    _raise_refused(_refused(index, refuse_ids), f"aux store {root}")
    self._keys = {(i, e[0], e[1]) for i, entries in index.items() for e in entries}
    self._shard = max(len(paths) - 1, 0)
    self._drop_torn_tail(_shard_paths(root, self._shard)[1])
    self._count = counts.get(self._shard, 0)
    self._data = self._idx = None

  def __contains__(self, key: tuple[str, str, int]) -> bool:
    return key in self._keys

  @staticmethod
  def _drop_torn_tail(idx_path: str) -> None:
    """Cut a torn last index line (a crash mid-write) so that appends start on a fresh line."""
    if not os.path.exists(idx_path):
      return
    with open(idx_path, "rb+") as f:
      raw = f.read()
      if raw and not raw.endswith(b"\n"):
        f.truncate(raw.rfind(b"\n") + 1)

  def _open(self) -> None:
    if self._count >= self.records_per_shard:
      self.close()
      self._shard, self._count = self._shard + 1, 0
    if self._data is None:
      data_path, idx_path = _shard_paths(self.root, self._shard)
      self._data, self._idx = open(data_path, "ab"), open(idx_path, "ab")

  def append(self, response: AuxResponse) -> bool:
    _raise_refused(_refused([response.id], self.refuse_ids), f"aux store writer {self.root}")
    key = (response.id, response.source, response.sample)
    if key in self._keys:
      return False
    for name in (response.id, response.source):
      if "\t" in name or "\n" in name or not name:
        raise AuxStoreError(f"id/source {name!r} is empty or contains a tab or newline")
    if not response.created_at:
      response = dataclasses.replace(response, created_at=_now())
    line = json.dumps(response.to_json(), ensure_ascii=False).encode("utf-8")
    self._open()
    offset = self._data.seek(0, os.SEEK_END)
    self._data.write(line + b"\n")
    self._data.flush()
    self._idx.write(f"{response.id}\t{response.source}\t{response.sample}\t{offset}\t{len(line)}\n".encode("utf-8"))
    self._idx.flush()
    self._keys.add(key)
    self._count += 1
    return True

  def close(self) -> None:
    for f in (self._data, self._idx):
      if f is not None:
        f.close()
    self._data = self._idx = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
