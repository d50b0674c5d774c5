"""The writer lock of one source of the aux store: sources/<source>/writer.lock.

Each source has its own shards and its own lock, so writers of different sources (e.g. GPT-4o and Gemini
precomputed in parallel) run side by side, while a second writer of the same source is refused at once with an
error naming the holder (the lock file holds {pid, host, source, since}). The lock is an flock on writer.lock: the
kernel drops it when the holder exits, however it ends (kill -9 included), so a killed writer never leaves a stale
lock behind (the file stays, unlocked). Do not delete writer.lock while a writer runs: a new writer would lock the
new file and two would write.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
from typing import Any

from ekipl_jax.data.aux_store import layout
from ekipl_jax.data.aux_store.records import AuxStoreError, AuxStoreLockedError, now


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
  folder = layout.source_dir(root, source)
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, layout.LOCK)
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
  holder = {"pid": os.getpid(), "host": socket.gethostname(), "source": source, "since": now()}
  os.write(fd, json.dumps(holder).encode())
  return fd
