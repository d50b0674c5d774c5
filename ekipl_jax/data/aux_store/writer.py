"""The append side of the aux store: `AuxStoreWriter`, resumable and crash-safe.

The writer appends a record to its source's shard, flushes it, then appends the record's index line, so a crash
leaves at worst an unindexed tail that is ignored (a torn last index line is dropped, and cut by the next writer of
that source). Resume: (id, source, sample) keys already indexed are skipped (the writer reads the index only).
A version-1 store is upgraded in meta.json to version 2; its old shards stay as they are and new records go into
the per-source folders.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable

from ekipl_jax.data.aux_store import layout
from ekipl_jax.data.aux_store.lock import lock_source
from ekipl_jax.data.aux_store.records import AuxResponse, AuxStoreError, RefuseIds, check_refused, now


@dataclasses.dataclass
class _Source:
  """What the writer holds for one source: its lock, its resume keys and its open shard."""

  lock_fd: int
  folder: str
  shard: int
  count: int  # records in the current shard
  data: Any = None
  idx: Any = None


class AuxStoreWriter:
  """Append side, resumable: an (id, source, sample) already in the store is skipped (`append` returns False).

  with AuxStoreWriter(root, sources=["gpt-4o"], refuse_ids=eval_ids) as w:
      w.append(AuxResponse(id="clevr_17", source="gpt-4o", text="<think>...</think><answer>3</answer>"))

  The writer takes the lock of each source it writes: those in `sources` at once, any other on its first append
  (AuxStoreLockedError, naming the holder, if another process writes that source)."""

  def __init__(
      self,
      root: str,
      refuse_ids: RefuseIds = None,
      records_per_shard: int = 100_000,
      notes: str = "",
      sources: Iterable[str] = (),
  ):
    self.root = root
    self.refuse_ids = refuse_ids
    self.records_per_shard = records_per_shard
    os.makedirs(root, exist_ok=True)
    if not os.path.exists(os.path.join(root, layout.META)):
      layout.write_meta(
          root, {"format": layout.FORMAT, "format_version": layout.FORMAT_VERSION, "created_at": now(), "notes": notes}
      )
    meta = layout.read_meta(root)
    if meta["format_version"] != layout.FORMAT_VERSION:  # version 1: its shards stay; new ones go per source
      layout.write_meta(root, {**meta, "format_version": layout.FORMAT_VERSION, "upgraded_at": now()})
    _, index = layout.read_index(root)
    check_refused(index, refuse_ids, f"aux store {root}")
    self._keys = {(i, e[0], e[1]) for i, entries in index.items() for e in entries}  # refreshed per locked source
    self._sources: dict[str, _Source] = {}
    try:
      for s in sources:
        self._take(s)
    except BaseException:
      self.close()
      raise

  def __contains__(self, key: tuple[str, str, int]) -> bool:
    return key in self._keys

  def _take(self, source: str) -> _Source:
    """Lock a source, then re-read its keys (another writer may have added some since this writer opened)."""
    if source in self._sources:
      return self._sources[source]
    if not source or source in (".", "..") or "\t" in source or "\n" in source:
      raise AuxStoreError(f"source name {source!r} is empty, '.', '..' or contains a tab or newline")
    fd = lock_source(self.root, source)
    folder = layout.source_dir(self.root, source)
    fresh: dict[str, list[layout.Entry]] = {}
    for f in (self.root, folder):
      for _, _, idx_path in layout.shards(f):
        layout.read_idx(idx_path, 0, fresh, lambda s: s == source)
    self._keys = {k for k in self._keys if k[1] != source} | {(i, e[0], e[1]) for i, es in fresh.items() for e in es}
    shards = layout.shards(folder)
    shard = shards[-1][0] if shards else 0
    _, idx_path = layout.shard_paths(folder, shard)
    self._drop_torn_tail(idx_path)
    count = layout.read_idx(idx_path, 0, {}, lambda s: False)
    self._sources[source] = _Source(fd, folder, shard, count)
    return self._sources[source]

  @staticmethod
  def _drop_torn_tail(idx_path: str) -> None:
    """Cut a torn last index line (a crash mid-write) so that appends start on a fresh line."""
    if not os.path.exists(idx_path):
      return
    with open(idx_path, "rb+") as f:
      raw = f.read()
      if raw and not raw.endswith(b"\n"):
        f.truncate(raw.rfind(b"\n") + 1)

  def _open(self, src: _Source) -> None:
    if src.count >= self.records_per_shard:
      self._close_files(src)
      src.shard, src.count = src.shard + 1, 0
    if src.data is None:
      data_path, idx_path = layout.shard_paths(src.folder, src.shard)
      src.idx, src.data = open(idx_path, "ab"), open(data_path, "ab")  # index first: no data file without one

  def append(self, response: AuxResponse) -> bool:
    check_refused([response.id], self.refuse_ids, f"aux store writer {self.root}")
    if not response.id or "\t" in response.id or "\n" in response.id:
      raise AuxStoreError(f"id {response.id!r} is empty or contains a tab or newline")
    src = self._take(response.source)
    key = (response.id, response.source, response.sample)
    if key in self._keys:
      return False
    if not response.created_at:
      response = dataclasses.replace(response, created_at=now())
    line = json.dumps(response.to_json(), ensure_ascii=False).encode("utf-8")
    self._open(src)
    offset = src.data.seek(0, os.SEEK_END)
    src.data.write(line + b"\n")
    src.data.flush()
    src.idx.write(f"{response.id}\t{response.source}\t{response.sample}\t{offset}\t{len(line)}\n".encode("utf-8"))
    src.idx.flush()
    self._keys.add(key)
    src.count += 1
    return True

  @staticmethod
  def _close_files(src: _Source) -> None:
    for f in (src.data, src.idx):
      if f is not None:
        f.close()
    src.data = src.idx = None

  def close(self) -> None:
    """Close the shards and release every source lock."""
    for src in self._sources.values():
      self._close_files(src)
      os.close(src.lock_fd)
    self._sources.clear()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
