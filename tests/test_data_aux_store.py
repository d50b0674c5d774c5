"""The external-trajectory store: lazy O(1) lookup, resume, refuse guard, malformed records."""

import json
import os

import pytest

from ekipl_jax.data import aux_store
from ekipl_jax.data.aux_store import AuxResponse, AuxStore, AuxStoreError, AuxStoreWriter, ContaminationError


def _resp(i: int, source: str = "gpt-4o", sample: int = 0, **kw) -> AuxResponse:
  return AuxResponse(
      id=f"ex{i}",
      source=source,
      sample=sample,
      text=f"<think>t{i}</think><answer>{i}</answer>",
      sampling={"temperature": 0.7},
      provenance={"prompt": "v1"},
      **kw,
  )


def test_roundtrip_and_format(tmp_path):
  root = str(tmp_path / "store")
  with AuxStoreWriter(root, records_per_shard=3) as w:
    for i in range(5):
      assert w.append(_resp(i))
    assert w.append(_resp(1, source="gemini", behaviour_logprobs=[-0.1, -0.2], behaviour_tokenizer="qwen2"))
  meta = json.load(open(os.path.join(root, "meta.json")))
  assert meta["format_version"] == aux_store.FORMAT_VERSION
  assert sorted(os.listdir(root)) == ["meta.json", "sources"]
  assert sorted(os.listdir(os.path.join(root, "sources"))) == ["gemini", "gpt-4o"]  # one folder per source
  assert sorted(os.listdir(aux_store.source_dir(root, "gpt-4o"))) == [
      "shard-00000.idx",
      "shard-00000.jsonl",
      "shard-00001.idx",
      "shard-00001.jsonl",
      "writer.lock",
  ]
  store = AuxStore(root)
  assert len(store) == 5 and store.num_records() == 6 and store.sources() == ["gemini", "gpt-4o"]
  got = store.get("ex1")
  assert [r.source for r in got] == ["gemini", "gpt-4o"]  # by source folder, each source in write order
  assert got[0].behaviour_logprobs == [-0.1, -0.2] and got[0].behaviour_tokenizer == "qwen2"
  assert got[1].text == "<think>t1</think><answer>1</answer>" and got[1].sampling == {"temperature": 0.7}
  assert got[1].created_at  # filled on write
  assert store.get("ex1", source="gemini") == [got[0]]
  assert store.get("nope") == [] and "nope" not in store and "ex3" in store


def test_lookup_reads_only_the_index_and_the_record(tmp_path):
  root = str(tmp_path / "store")
  with AuxStoreWriter(root) as w:
    for i in range(200):
      w.append(_resp(i))
  data = os.path.join(aux_store.source_dir(root, "gpt-4o"), "shard-00000.jsonl")
  # Corrupt every record but ex7 in place (same lengths): a lookup that parsed the whole file would fail.
  lines = open(data, "rb").read().split(b"\n")
  lines = [ln if b'"ex7"' in ln else b"#" * len(ln) for ln in lines]
  open(data, "wb").write(b"\n".join(lines))
  store = AuxStore(root)
  assert store.bytes_read == 0
  rec = store.get("ex7")[0]
  assert rec.text.endswith("<answer>7</answer>")
  assert store.bytes_read == len([ln for ln in lines if ln][7])
  with pytest.raises(AuxStoreError, match=r"'ex8'.*shard-00000\.jsonl"):
    store.get("ex8")


def test_malformed_record_names_id_and_file(tmp_path):
  root = str(tmp_path / "store")
  with AuxStoreWriter(root) as w:
    w.append(_resp(0))
    w.append(_resp(1))
  data = os.path.join(aux_store.source_dir(root, "gpt-4o"), "shard-00000.jsonl")
  lines = open(data).read().splitlines()
  lines[1] = lines[1].replace('"text": "', '"texx": "')  # a missing field; same byte length as indexed
  open(data, "w").write("\n".join(lines) + "\n")
  store = AuxStore(root)
  store.get("ex0")
  with pytest.raises(AuxStoreError) as e:
    store.get("ex1")
  assert "'ex1'" in str(e.value) and "shard-00000.jsonl" in str(e.value)


def test_resume_skips_present_keys(tmp_path):
  root = str(tmp_path / "store")
  with AuxStoreWriter(root) as w:
    for i in range(3):
      w.append(_resp(i))
  with AuxStoreWriter(root) as w:  # a second run (e.g. after a crash) over the same work list
    added = [w.append(_resp(i)) for i in range(5)]
    assert w.append(_resp(0, sample=1))  # a new sample of an id that is present is not skipped
    assert ("ex4", "gpt-4o", 0) in w
  assert added == [False, False, False, True, True]
  store = AuxStore(root)
  assert store.num_records() == 6 and [r.sample for r in store.get("ex0")] == [0, 1]


def test_torn_index_line_is_ignored(tmp_path):
  root = str(tmp_path / "store")
  with AuxStoreWriter(root) as w:
    w.append(_resp(0))
    w.append(_resp(1))
  idx = os.path.join(aux_store.source_dir(root, "gpt-4o"), "shard-00000.idx")
  raw = open(idx, "rb").read()
  open(idx, "wb").write(raw[:-3])  # crash mid index write
  store = AuxStore(root)
  assert list(store.ids()) == ["ex0"]
  with AuxStoreWriter(root) as w:  # resume re-writes the unindexed record
    assert w.append(_resp(1))
  assert AuxStore(root).get("ex1")[0].id == "ex1"


def test_refuse_guard_on_write_and_load(tmp_path):
  root = str(tmp_path / "store")
  eval_ids = {"ex3", "ex4"}
  with AuxStoreWriter(root, refuse_ids=eval_ids) as w:
    w.append(_resp(1))
    with pytest.raises(ContaminationError, match="'ex3'"):
      w.append(_resp(3))
  with AuxStoreWriter(root) as w:  # a writer without the guard lets it through ...
    w.append(_resp(4))
  with pytest.raises(ContaminationError, match="'ex4'"):  # ... but loading with the guard refuses it
    AuxStore(root, refuse_ids=eval_ids)
  with pytest.raises(ContaminationError, match="'ex4'"):  # a callable guard works the same
    AuxStore(root, refuse_ids=lambda i: i.startswith("ex4"))
  assert len(AuxStore(root)) == 2


def test_version_is_checked(tmp_path):
  root = str(tmp_path / "store")
  AuxStoreWriter(root).close()
  meta = os.path.join(root, "meta.json")
  d = json.load(open(meta))
  d["format_version"] = 99
  json.dump(d, open(meta, "w"))
  with pytest.raises(AuxStoreError, match="version 99"):
    AuxStore(root)
