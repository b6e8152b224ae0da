import os

import pyarrow as pa
import pytest

from ray_align.storage import RunDir, StorageError


def test_atomic_table_roundtrip_and_listing(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    run.write_table(pa.table({"a": [1, 2]}), "stage", "part-1.parquet")
    run.write_table(pa.table({"a": [3]}), "stage", "part-2.parquet")
    assert run.list_files("stage", suffix=".parquet") == ["part-1.parquet", "part-2.parquet"]
    assert run.read_tables("stage").column("a").to_pylist() == [1, 2, 3]
    assert not [n for n in os.listdir(tmp_path / "run" / "stage") if ".tmp-" in n]


def test_corrupt_parquet_is_named(tmp_path):
    run = RunDir(str(tmp_path))
    run.write_table(pa.table({"a": list(range(1000))}), "s", "part.parquet")
    path = tmp_path / "s" / "part.parquet"
    path.write_bytes(path.read_bytes()[:100])  # truncate
    with pytest.raises(StorageError, match="part.parquet is not a readable Parquet file"):
        run.read_tables("s")


def test_fingerprint_changes_with_content(tmp_path):
    run = RunDir(str(tmp_path))
    run.write_json({"x": 1}, "f.json")
    first = run.fingerprint("f.json")
    run.write_json({"x": 2}, "f.json")
    assert run.fingerprint("f.json") != first


def test_unwritable_location_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    run = RunDir(str(blocker))
    with pytest.raises(StorageError, match="cannot write"):
        run.write_json({}, "manifest.json")


def test_uris_keep_their_scheme(tmp_path):
    run = RunDir(f"file://{tmp_path}")
    run.write_json({"ok": True}, "a", "b.json")
    assert run.read_json("a", "b.json") == {"ok": True}
    assert run.uri_of("a") == f"file://{tmp_path}/a"
