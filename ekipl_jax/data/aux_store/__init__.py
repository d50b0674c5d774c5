"""The external-trajectory store: precomputed responses of auxiliary models, keyed by example id.

One folder (format_version 2): meta.json, then per source sources/<source>/ with JSONL shards, their offset index
files and the source's writer lock. Version-1 stores (every source in one top-level shard series) are still read and
resumed from, never written. One idea per file:

    records.py    a record (AuxResponse), its validation, the errors, the contamination guard (check_refused)
    layout.py     the files on disk: paths, meta.json, shards and their index files
    reader.py     AuxStore / open_store: a lazy O(1) lookup id -> responses that reads only the index when opened
    coverage.py   check_coverage: every configured source covers enough training ids (run before RL)
    lock.py       one flock writer lock per source: writers of different sources run in parallel, a second writer
                  of a source is refused naming the holder, a killed writer leaves no stale lock
    writer.py     AuxStoreWriter: append-only, crash-safe (record, then its index line), resumable

    with AuxStoreWriter(root, sources=["gpt-4o"], refuse_ids=eval_ids) as w:
      w.append(AuxResponse(id="clevr_17", source="gpt-4o", text="<think>...</think><answer>3</answer>"))
    with open_store(root, refuse_ids=eval_ids) as store:
      responses = store.get("clevr_17")            # [AuxResponse], [] if none

The writers that fill it are in data/aux_sources.py (and sampling/checkpoint_source.py); the RL step reads it in
sampling/groups.py.
"""

from ekipl_jax.data.aux_store.records import (
    AuxCoverageError,
    AuxResponse,
    AuxStoreError,
    AuxStoreLockedError,
    ContaminationError,
    RefuseIds,
    check_refused,
    parse_record,
)
from ekipl_jax.data.aux_store.layout import FORMAT, FORMAT_VERSION, LOCK, META, READABLE_VERSIONS, source_dir
from ekipl_jax.data.aux_store.reader import AuxStore, open_store
from ekipl_jax.data.aux_store.coverage import check_coverage
from ekipl_jax.data.aux_store.lock import lock_source
from ekipl_jax.data.aux_store.writer import AuxStoreWriter

__all__ = [
    "AuxCoverageError",
    "AuxResponse",
    "AuxStore",
    "AuxStoreError",
    "AuxStoreLockedError",
    "AuxStoreWriter",
    "ContaminationError",
    "FORMAT",
    "FORMAT_VERSION",
    "LOCK",
    "META",
    "READABLE_VERSIONS",
    "RefuseIds",
    "check_coverage",
    "check_refused",
    "lock_source",
    "open_store",
    "parse_record",
    "source_dir",
]
