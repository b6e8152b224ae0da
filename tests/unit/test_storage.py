import os
from pathlib import Path

import pyarrow as pa
import pytest

from ray_align.storage import COMPLETE_MARKER, RunDir, StorageError, local_model_path


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


def _uploaded_model(s3_bucket: str, tmp_path) -> str:
    """A small model folder (config and one weight file) on the loopback S3 server."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(os.urandom(4096))
    uri = f"{s3_bucket}/models/m"
    RunDir(uri).upload_dir(folder)
    return uri


def test_the_workers_of_a_node_download_a_model_once(s3_bucket, tmp_path, monkeypatch):
    """Every training worker of a node asks for the same s3:// model at once: one downloads,
    the others wait for its copy (a slow download makes them overlap)."""
    import threading
    import time

    monkeypatch.setenv("RAY_ALIGN_CACHE", str(tmp_path / "cache"))
    uri = _uploaded_model(s3_bucket, tmp_path)
    downloads, real = [], RunDir.download_dir

    def slow_download(self, *parts, to, only=bool):
        downloads.append(to)
        time.sleep(0.5)
        real(self, *parts, to=to, only=only)

    monkeypatch.setattr(RunDir, "download_dir", slow_download)
    paths: list[str] = []
    workers = [threading.Thread(target=lambda: paths.append(local_model_path(uri))) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert len(downloads) == 1
    assert len(set(paths)) == 1 and len(paths) == 4
    assert (Path(paths[0]) / "model.safetensors").stat().st_size == 4096


def test_a_download_killed_half_way_is_downloaded_again(s3_bucket, tmp_path, monkeypatch):
    """A copy without its completion marker (the process died while writing it) is never used."""
    monkeypatch.setenv("RAY_ALIGN_CACHE", str(tmp_path / "cache"))
    uri = _uploaded_model(s3_bucket, tmp_path)
    real = RunDir.download_dir

    def killed(self, *parts, to, only=bool):
        (Path(to) / "config.json").write_text("{}")  # a part of the files, then death
        raise KeyboardInterrupt

    monkeypatch.setattr(RunDir, "download_dir", killed)
    with pytest.raises(KeyboardInterrupt):
        local_model_path(uri)
    monkeypatch.setattr(RunDir, "download_dir", real)
    path = Path(local_model_path(uri))
    assert (path / "model.safetensors").stat().st_size == 4096
    assert (path / COMPLETE_MARKER).exists()
