"""The read side of the aux store: `AuxStore` (`open_store`), a lazy lookup id -> responses.

Opening a store reads the `.idx` files only (a few tens of bytes per record) into a dict
id -> [(source, sample, file, offset, length)]; `get(id)` seeks and reads just those byte ranges, so a lookup is O(1)
and a store of a million responses is never read whole. Every record read is validated (records.parse_record) and
checked against its index entry.
"""

from __future__ import annotations

from typing import Any, Iterator

from ekipl_jax.data.aux_store import layout
from ekipl_jax.data.aux_store.records import AuxResponse, AuxStoreError, RefuseIds, check_refused, parse_record


class AuxStore:
  """Read side. `store[id]` / `store.get(id)` -> list[AuxResponse] (sources in folder order, each source's responses
  in write order; [] if none).

  Only the index is held in memory; `bytes_read` counts the record bytes read so far (for tests/metrics)."""

  def __init__(self, root: str, refuse_ids: RefuseIds = None):
    self.root = root
    self._paths, self._index = layout.read_index(root)
    check_refused(self._index, refuse_ids, f"aux store {root}")
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

  def sources_of(self, example_id: str) -> set[str]:
    """The sources with at least one response for the id (from the index; nothing is read)."""
    return {e[0] for e in self._index.get(example_id, ())}

  def _file(self, file_no: int):
    if file_no not in self._files:
      self._files[file_no] = open(self._paths[file_no], "rb")
    return self._files[file_no]

  def get(self, example_id: str, source: str | None = None) -> list[AuxResponse]:
    out = []
    for src, _, file_no, offset, length in self._index.get(example_id, ()):
      if source is not None and src != source:
        continue
      f = self._file(file_no)
      f.seek(offset)
      line = f.read(length)
      self.bytes_read += len(line)
      path = self._paths[file_no]
      if len(line) != length:
        raise AuxStoreError(
            f"malformed record for id {example_id!r} in {path}: "
            f"index says {length} bytes at offset {offset}, file ends early"
        )
      rec = parse_record(line, example_id, path)
      if rec.source != src:
        raise AuxStoreError(
            f"malformed record for id {example_id!r} in {path}: source {rec.source!r} but the index says {src!r}"
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
