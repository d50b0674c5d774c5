"""What a training run owns in its workdir: an exclusive lock (one run per workdir) and config.json (the config the
checkpoints were made with).

  with workdir.lock(path):                 # process 0 only: a second run in the same workdir is refused
    workdir.check_config(path, cfg)        # a resume with a different config is refused unless cfg.resume_changed
    workdir.write_config(path, cfg)

The lock is `fcntl.flock` on `workdir/.lock` (Linux emulates it with POSIX locks on NFS): the kernel drops it when
its process dies, however it dies (kill -9 included), so a dead run's lock is taken over; the file keeps the holder's
pid, host and start time for the message, and is emptied (not removed: removing would let two runs lock two
different files) when the run ends normally.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from typing import Iterator

LOCK = ".lock"
CONFIG = "config.json"
# Keys that may differ between a run and its resume: where and how the run is launched, not what it computes.
LAUNCH_KEYS = (
    "workdir",
    "fail_at_step",
    "resume_changed",
    "mesh.distributed",
    "mesh.coordinator_address",
    "mesh.num_processes",
    "mesh.process_id",
)

# Config sections a stage never reads: a resume (or a rerun that reuses a finished stage, as experiments/demo.py
# reuses its SFT checkpoint) may differ there. The SFT stage reads no rl.* / aux.* key, the RL stage no sft.* key.
STAGE_FREE_PREFIXES = {"sft": ("rl.", "aux."), "rl": ("sft.",)}


class WorkdirBusy(RuntimeError):
  """Another live process holds the workdir's lock."""


class ConfigChanged(ValueError):
  """The config differs from the one the workdir's run was started with."""


def _holder() -> dict:
  return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _describe(h: dict) -> str:
  return f"pid {h.get('pid', '?')} on {h.get('host', '?')}, started {h.get('started', '?')}"


@contextlib.contextmanager
def lock(workdir: str) -> Iterator[None]:
  """Holds workdir/.lock for the block; raises WorkdirBusy naming the holder when another live process has it."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read_holder(fd)
      raise WorkdirBusy(
          f"{workdir} is in use by another run ({_describe(holder)}; lock file {path}): two runs in one workdir "
          "would interleave metrics.jsonl and checkpoints. Wait for it, stop it, or give another config.workdir."
      ) from None
    stale = _read_holder(fd)
    if stale:  # written by a run that never reached its normal end (killed, crashed hard, machine lost)
      print(f"[workdir] taking over the lock of {workdir}: its holder ({_describe(stale)}) is no longer running")
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(_holder()).encode(), 0)
    os.fsync(fd)
    try:
      yield
    finally:
      os.ftruncate(fd, 0)
      fcntl.flock(fd, fcntl.LOCK_UN)
  finally:
    os.close(fd)


def _read_holder(fd: int) -> dict:
  raw = os.pread(fd, 4096, 0)
  if not raw.strip():
    return {}
  try:
    return json.loads(raw)
  except ValueError:
    return {"pid": "?", "host": f"(unreadable lock file: {raw[:80]!r})"}


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict) and v:
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_diff(old: dict, new: dict) -> dict[str, tuple]:
  """{key: (old value, new value)} over the flattened configs, launch keys left out, and, when both configs run the
  same stage, the sections that stage never reads (STAGE_FREE_PREFIXES); '<absent>' for a missing key."""
  a, b = _flatten(old), _flatten(new)
  absent = "<absent>"
  free = STAGE_FREE_PREFIXES.get(b.get("stage"), ()) if a.get("stage") == b.get("stage") else ()
  return {
      k: (a.get(k, absent), b.get(k, absent))
      for k in sorted(set(a) | set(b))
      if k not in LAUNCH_KEYS and not k.startswith(free) and a.get(k, absent) != b.get(k, absent)
  }


def check_config(workdir: str, cfg) -> dict[str, tuple]:
  """Compares cfg with workdir/config.json (if any); returns the differences. Raises ConfigChanged when they are not
  empty and cfg.resume_changed is false. Every process may call it (it only reads)."""
  path = os.path.join(workdir, CONFIG)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    try:
      old = json.load(f)
    except ValueError as e:
      raise ConfigChanged(f"{path} is not valid JSON ({e}): remove it or the workdir to start afresh") from None
  diff = config_diff(old, json.loads(cfg.to_json()))
  if not diff:
    return diff
  lines = "\n".join(f"  {k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
  if not cfg.get("resume_changed", False):
    raise ConfigChanged(
        f"{workdir} holds a run started with another config ({path}); {len(diff)} keys differ:\n{lines}\n"
        "Rerun with the same config, give another config.workdir, or pass --config.resume_changed=True to continue "
        "it with the new config (its checkpoint and metrics stay)."
    )
  print(
      f"[workdir] config.resume_changed: continuing {workdir} with {len(diff)} changed keys:\n{lines}", file=sys.stderr
  )
  return diff


def write_config(workdir: str, cfg, keep_old: bool) -> None:
  """Writes workdir/config.json atomically; keep_old: the previous one is kept as config.<time>.json."""
  path = os.path.join(workdir, CONFIG)
  if keep_old and os.path.exists(path):
    os.replace(path, os.path.join(workdir, f"config.{time.strftime('%Y%m%dT%H%M%S')}.json"))
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    f.write(cfg.to_json(indent=1))
  os.replace(tmp, path)
