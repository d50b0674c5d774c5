"""The external-trajectory store: precomputed responses of auxiliary models, keyed by example id.

On-disk format (format_version 2), one folder:

    meta.json                        {"format": "ekipl_aux_store", "format_version": 2, "created_at", "notes"}
    sources/<source>/shard-00000.jsonl   one JSON record per line (UTF-8), fields below; <source> is the source
                                     name percent-encoded (urllib.parse.quote, safe=""; a leading "." as %2E)
    sources/<source>/shard-00000.idx     the offset index of that shard, one line per record:
                                     "<id>\\t<source>\\t<sample>\\t<byte offset>\\t<byte length>\\n" (no tabs in names)
    sources/<source>/writer.lock     held (flock) by the one process writing that source; holds {pid, host, source,
                                     since} for the message a second writer gets
    shard-00000.jsonl / .idx         at the top: the version-1 layout (all sources in one series); still read, and
                                     resumed from, but never written again (a writer upgrades meta.json to 2)

Each source has its own shards and its own lock, so writers of different sources (e.g. GPT-4o and Gemini
precomputed in parallel) run side by side, while a second writer of the same source is refused at once with an
error naming the holder. The lock is an flock on writer.lock: the kernel drops it when the holder exits, however
it ends (kill -9 included), so a killed writer never leaves a stale lock behind (the file stays, unlocked). Do not
delete writer.lock while a writer runs: a new writer would lock the new file and two would write.

A record:

    {"id": str, "source": str (the external model's name), "sample": int (k-th response of that source for the id),
     "text": str (the completion only, no chat markup), "sampling": {temperature, top_p, ...} (free-form dict),
     "behaviour_logprobs": [float] | null (per-token log-probs of the behaviour model),
     "behaviour_tokenizer": str | null (the tokenizer those log-probs refer to: a name or HF path),
     "created_at": ISO-8601 str, "provenance": {...} (free-form: prompt version, API, request id, ...)}

Reading is lazy: opening a store reads the `.idx` files only (a few tens of bytes per record) into a dict
id -> [(source, sample, file, offset, length)]; `get(id)` seeks and reads just those byte ranges, so a lookup is
O(1) and a store of a million responses is never read whole (the writer's resume needs the index only). The writer
appends a record to the shard, flushes it, then appends its index line, so a crash leaves at worst an unindexed tail
that is ignored (a torn last index line is dropped, and cut by the next writer of that source). A data file whose
index file is missing is an error naming the missing file (never an empty store).
Resume: the writer skips (id, source, sample) keys already indexed.

Contamination guard: `refuse_ids` (a set/collection of ids, or a callable id -> bool that is True for a refused id,
e.g. the ids of an evaluation split) is checked on every append and on open (`check_refused`, also used by the
writers in aux_sources.py before any work); refused ids raise ContaminationError naming them.

Coverage: `check_coverage(store, train_ids, sources, min_coverage)` is run by the trainer before RL starts: every
configured source must be in the store and cover at least `min_coverage` of the training ids (config key
aux.min_coverage), otherwise EKIPL would quietly train as GRPO on the uncovered prompts.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import fcntl
import json
import os
import re
import socket
import urllib.parse
from typing import Any, Callable, Collection, Iterable, Iterator

FORMAT = "ekipl_aux_store"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: every source in the top-level shard series (read and resumed, not written)
META = "meta.json"
SOURCES_DIR = "sources"
LOCK = "writer.lock"
_SHARD_RE = re.compile(r"^shard-(\d{5,})\.(jsonl|idx)$")

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


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def source_dir(root: str, source: str) -> str:
  """The folder of one source's shards: root/sources/<percent-encoded name>."""
  name = urllib.parse.quote(source, safe="")
  return os.path.join(root, SOURCES_DIR, "%2E" + name[1:] if name.startswith(".") else name)


def _shard_paths(folder: str, shard: int) -> tuple[str, str]:
  return os.path.join(folder, f"shard-{shard:05d}.jsonl"), os.path.join(folder, f"shard-{shard:05d}.idx")


# ---------------------------------------------------------------------------------------------- refused ids
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


# ---------------------------------------------------------------------------------------------- index
Entry = tuple[str, int, int, int, int]  # (source, sample, data file number, offset, length)


def _read_meta(root: str) -> dict:
  meta_path = os.path.join(root, META)
  if not os.path.isdir(root):
    raise AuxStoreError(f"no aux store at {root} (the folder does not exist)")
  try:
    with open(meta_path) as f:
      meta = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise AuxStoreError(f"cannot read {meta_path}: {e}") from None
  if meta.get("format") != FORMAT or meta.get("format_version") not in READABLE_VERSIONS:
    raise AuxStoreError(
        f"{meta_path}: format {meta.get('format')!r} version {meta.get('format_version')!r}; "
        f"this reader knows {FORMAT!r} versions {', '.join(map(str, READABLE_VERSIONS))}"
    )
  return meta


def _shards(folder: str) -> list[tuple[int, str, str]]:
  """[(shard, data path, index path)] of one folder, checked: a non-empty data file needs its index file and a
  non-empty index needs its data file (a missing one is an error naming it, never an empty store)."""
  found: dict[int, set[str]] = {}
  for name in os.listdir(folder) if os.path.isdir(folder) else ():
    m = _SHARD_RE.match(name)
    if m:
      found.setdefault(int(m.group(1)), set()).add(m.group(2))
  out = []
  for shard in sorted(found):
    data_path, idx_path = _shard_paths(folder, shard)
    for have, missing, kind in ((data_path, idx_path, "index"), (idx_path, data_path, "data")):
      if not os.path.exists(missing) and os.path.getsize(have) > 0:
        raise AuxStoreError(
            f"aux store {kind} file missing: {missing} ({have} holds {os.path.getsize(have)} bytes); restore it "
            f"from where the store was copied from, or rewrite that source (experiments/precompute_aux.py)"
        )
    out.append((shard, data_path, idx_path))
  return out


def _read_idx(idx_path: str, file_no: int, index: dict[str, list[Entry]], keep: Callable[[str], bool]) -> int:
  """Add the entries of one .idx file (sources for which keep(source)) to `index`; returns the line count."""
  if not os.path.exists(idx_path):
    return 0
  with open(idx_path, "rb") as f:
    lines = f.read().split(b"\n")
  if lines and lines[-1] != b"":  # torn last line (crash mid-write): the record is not indexed
    lines = lines[:-1]
  n = 0
  for lineno, ln in enumerate(lines, 1):
    if not ln:
      continue
    parts = ln.decode("utf-8", "replace").split("\t")
    try:
      if len(parts) != 5:
        raise ValueError
      entry = (parts[1], int(parts[2]), file_no, int(parts[3]), int(parts[4]))
    except ValueError:
      raise AuxStoreError(f"malformed index line {lineno} in {idx_path}: {ln[:80]!r}") from None
    n += 1
    if keep(entry[0]):
      index.setdefault(parts[0], []).append(entry)
  return n


def _folders(root: str) -> list[str]:
  """The top level (version-1 shards) and every source folder."""
  sub = os.path.join(root, SOURCES_DIR)
  return [root] + ([os.path.join(sub, d) for d in sorted(os.listdir(sub))] if os.path.isdir(sub) else [])


def _read_index(root: str, keep: Callable[[str], bool] = lambda s: True) -> tuple[list[str], dict[str, list[Entry]]]:
  """(data file paths, id -> [entries]) from meta.json and every .idx file."""
  _read_meta(root)
  paths: list[str] = []
  index: dict[str, list[Entry]] = {}
  for folder in _folders(root):
    for _, data_path, idx_path in _shards(folder):
      paths.append(data_path)
      _read_idx(idx_path, len(paths) - 1, index, keep)
  return paths, index


# ---------------------------------------------------------------------------------------------- read side
class AuxStore:
  """Read side. `store[id]` / `store.get(id)` -> list[AuxResponse] (sources in folder order, each source's responses
  in write order; [] if none).

  Only the index is held in memory; `bytes_read` counts the record bytes read so far (for tests/metrics)."""

  def __init__(self, root: str, refuse_ids: RefuseIds = None):
    self.root = root
    self._paths, self._index = _read_index(root)
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


# ---------------------------------------------------------------------------------------------- write side
def _holder(path: str) -> str:
  """Who holds a lock, from what it wrote into the file."""
  try:
    with open(path) as f:
      h = json.load(f)
    who = f"pid {h['pid']} on host {h['host']} (source {h['source']!r}, since {h['since']})"
  except (OSError, ValueError, KeyError, TypeError):
    return "a process that has just started (no holder written yet)"
  if h["host"] == socket.gethostname() and not _running(h["pid"]):  # a process the writer forked keeps the lock
    who += f" -- that pid is no longer running; a process it started still holds the lock (`fuser -v {path}`)"
  return who


def _running(pid: Any) -> bool:
  """Whether a process of this host runs (a zombie, dead but not yet reaped, does not)."""
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return False
  except (PermissionError, ValueError, TypeError):
    return True
  try:
    with open(f"/proc/{int(pid)}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except (OSError, IndexError):
    return True


def lock_source(root: str, source: str) -> int:
  """Take the writer lock of one source (an fd to keep open while writing; closing it releases the lock)."""
  folder = source_dir(root, source)
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, LOCK)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    os.close(fd)
    if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
      raise AuxStoreLockedError(
          f"aux store {root}: source {source!r} is being written by {_holder(path)} (lock {path}). One writer per "
          f"source: wait for it, stop it, or write under another source name; writers of different sources may "
          f"run in parallel. The lock goes when that process exits (even if killed); do not delete the file."
      ) from None
    raise AuxStoreError(f"cannot lock {path} ({e}); the store needs a file system with flock (local disk, NFS)") from e
  os.ftruncate(fd, 0)
  holder = {"pid": os.getpid(), "host": socket.gethostname(), "source": source, "since": _now()}
  os.write(fd, json.dumps(holder).encode())
  return fd


def _write_meta(root: str, meta: dict) -> None:
  tmp = os.path.join(root, f".{META}.{os.getpid()}.tmp")
  with open(tmp, "w") as f:
    json.dump(meta, f, indent=1)
  os.replace(tmp, os.path.join(root, META))  # atomic: a concurrent reader sees the old or the new file


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
    if not os.path.exists(os.path.join(root, META)):
      _write_meta(root, {"format": FORMAT, "format_version": FORMAT_VERSION, "created_at": _now(), "notes": notes})
    meta = _read_meta(root)
    if meta["format_version"] != FORMAT_VERSION:  # version 1: its shards stay as they are; new ones go per source
      _write_meta(root, {**meta, "format_version": FORMAT_VERSION, "upgraded_at": _now()})
    _, index = _read_index(root)
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
    folder = source_dir(self.root, source)
    fresh: dict[str, list[Entry]] = {}
    for f in (self.root, folder):
      for _, _, idx_path in _shards(f):
        _read_idx(idx_path, 0, fresh, lambda s: s == source)
    self._keys = {k for k in self._keys if k[1] != source} | {(i, e[0], e[1]) for i, es in fresh.items() for e in es}
    shards = _shards(folder)
    shard = shards[-1][0] if shards else 0
    _, idx_path = _shard_paths(folder, shard)
    self._drop_torn_tail(idx_path)
    count = _read_idx(idx_path, 0, {}, lambda s: False)
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
      data_path, idx_path = _shard_paths(src.folder, src.shard)
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
      response = dataclasses.replace(response, created_at=_now())
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
