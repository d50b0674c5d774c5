"""The aux store's files on disk: meta.json, the source folders, and each shard's data and index files.

    meta.json                              {"format": "ekipl_aux_store", "format_version": 2, "created_at", "notes"}
    sources/<source>/shard-00000.jsonl     one JSON record per line (UTF-8; records.py); <source> is the source name
                                           percent-encoded (urllib.parse.quote, safe=""; a leading "." as %2E)
    sources/<source>/shard-00000.idx       the offset index of that shard, one line per record:
                                           "<id>\\t<source>\\t<sample>\\t<byte offset>\\t<byte length>\\n"
                                           (no tabs in ids or source names)
    sources/<source>/writer.lock           the source's writer lock (lock.py)
    shard-00000.jsonl / .idx               at the top: the version-1 layout (all sources in one series); still read,
                                           and resumed from, but never written again

A torn last index line (a crash mid-write) is not read. A non-empty data file whose index file is missing (or the
reverse) is an error naming the missing file, never an empty store.
"""

from __future__ import annotations

import json
import os
import re
import urllib.parse
from typing import Callable

from ekipl_jax.data.aux_store.records import AuxStoreError

FORMAT = "ekipl_aux_store"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: every source in the top-level shard series (read and resumed, not written)
META = "meta.json"
SOURCES_DIR = "sources"
LOCK = "writer.lock"
_SHARD_RE = re.compile(r"^shard-(\d{5,})\.(jsonl|idx)$")

Entry = tuple[str, int, int, int, int]  # (source, sample, data file number, offset, length)


def source_dir(root: str, source: str) -> str:
  """The folder of one source's shards: root/sources/<percent-encoded name>."""
  name = urllib.parse.quote(source, safe="")
  return os.path.join(root, SOURCES_DIR, "%2E" + name[1:] if name.startswith(".") else name)


def shard_paths(folder: str, shard: int) -> tuple[str, str]:
  """(data file, index file) of one shard."""
  return os.path.join(folder, f"shard-{shard:05d}.jsonl"), os.path.join(folder, f"shard-{shard:05d}.idx")


def read_meta(root: str) -> dict:
  """meta.json, checked: the folder exists and holds a store of a version this reader knows."""
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


def write_meta(root: str, meta: dict) -> None:
  tmp = os.path.join(root, f".{META}.{os.getpid()}.tmp")
  with open(tmp, "w") as f:
    json.dump(meta, f, indent=1)
  os.replace(tmp, os.path.join(root, META))  # atomic: a concurrent reader sees the old or the new file


def shards(folder: str) -> list[tuple[int, str, str]]:
  """[(shard, data path, index path)] of one folder, checked: a non-empty data file needs its index file and a
  non-empty index needs its data file (a missing one is an error naming it, never an empty store)."""
  found: dict[int, set[str]] = {}
  for name in os.listdir(folder) if os.path.isdir(folder) else ():
    m = _SHARD_RE.match(name)
    if m:
      found.setdefault(int(m.group(1)), set()).add(m.group(2))
  out = []
  for shard in sorted(found):
    data_path, idx_path = shard_paths(folder, shard)
    for have, missing, kind in ((data_path, idx_path, "index"), (idx_path, data_path, "data")):
      if not os.path.exists(missing) and os.path.getsize(have) > 0:
        raise AuxStoreError(
            f"aux store {kind} file missing: {missing} ({have} holds {os.path.getsize(have)} bytes); restore it "
            f"from where the store was copied from, or rewrite that source (experiments/precompute_aux.py)"
        )
    out.append((shard, data_path, idx_path))
  return out


def read_idx(idx_path: str, file_no: int, index: dict[str, list[Entry]], keep: Callable[[str], bool]) -> int:
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


def folders(root: str) -> list[str]:
  """The top level (version-1 shards) and every source folder."""
  sub = os.path.join(root, SOURCES_DIR)
  return [root] + ([os.path.join(sub, d) for d in sorted(os.listdir(sub))] if os.path.isdir(sub) else [])


def read_index(root: str, keep: Callable[[str], bool] = lambda s: True) -> tuple[list[str], dict[str, list[Entry]]]:
  """(data file paths, id -> [entries]) from meta.json and every .idx file."""
  read_meta(root)
  paths: list[str] = []
  index: dict[str, list[Entry]] = {}
  for folder in folders(root):
    for _, data_path, idx_path in shards(folder):
      paths.append(data_path)
      read_idx(idx_path, len(paths) - 1, index, keep)
  return paths, index
