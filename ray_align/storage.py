"""The run directory: a local path or an ``s3://`` / ``gs://`` URI, through pyarrow filesystems.

Every operation is one object stores support: files are written, read, listed, deleted and
moved one by one (a move is copy + delete there); folders are never renamed. Writes are atomic:
locally a temporary file is renamed into place; on an object store an object appears only once
its upload completes. A stage's manifest, written last, is what marks its output finished.
An S3-compatible endpoint comes from the environment (``AWS_ENDPOINT_URL``), as for the AWS CLI.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

GCS_RETRY_S = 60


class StorageError(RuntimeError):
    """A file in the run directory is missing, unreadable, corrupt or cannot be written."""


class RunDir:
    """A run directory on any pyarrow filesystem; paths inside are relative strings."""

    def __init__(self, uri: str) -> None:
        if "://" not in uri:
            uri = str(Path(uri).expanduser().resolve())
        self.uri = uri.rstrip("/")
        self.fs, self.root = pafs.FileSystem.from_uri(self.uri)
        if isinstance(self.fs, pafs.GcsFileSystem):
            # pyarrow's default retries a GCS call without usable credentials for many minutes
            self.fs = pafs.GcsFileSystem(retry_time_limit=timedelta(seconds=GCS_RETRY_S))
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)

    @classmethod
    def on(cls, fs: pafs.FileSystem, root: str) -> RunDir:
        """A folder given as a filesystem and a path in it (what Ray Train's checkpoints hold),
        for an object store whose URI would lose the filesystem's own settings."""
        run = cls.__new__(cls)
        run.fs, run.root = fs, root.rstrip("/")
        run.uri = f"{fs.type_name}://{run.root}" if fs.type_name != "local" else run.root
        run.is_local = isinstance(fs, pafs.LocalFileSystem)
        return run

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def uri_of(self, *parts: str) -> str:
        return "/".join([self.uri, *parts])

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def walk(self, *parts: str) -> list[str]:
        """Paths (relative to the folder) of every file under a folder, sorted; empty if none."""
        base = self.path(*parts)
        if self.fs.get_file_info(base).type != pafs.FileType.Directory:
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=True))
        return sorted(i.path[len(base) + 1:] for i in infos if i.type == pafs.FileType.File)

    def move_files(self, source: tuple[str, ...], target: tuple[str, ...]) -> int:
        """Move every file under ``source`` to the same place under ``target``, file by file
        (object stores cannot rename a folder); return how many moved."""
        names = self.walk(*source)
        for name in names:
            destination = self.path(*target, name)
            self.fs.create_dir(destination.rsplit("/", 1)[0], recursive=True)
            self.fs.move(self.path(*source, name), destination)
        self.delete(*source)
        return len(names)

    def list_files(self, *parts: str, suffix: str = "") -> list[str]:
        """Names of the files directly under a folder (sorted); empty when it does not exist."""
        if not self.exists(*parts):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(*parts)))
        return sorted(
            i.base_name
            for i in infos
            if i.type == pafs.FileType.File and i.base_name.endswith(suffix) and ".tmp-" not in i.base_name
        )

    def delete(self, *parts: str) -> None:
        info = self.fs.get_file_info(self.path(*parts))
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(info.path)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(info.path)

    def _atomic(self, parts: tuple[str, ...], write) -> None:
        target = self.path(*parts)
        # An object appears whole once its upload completes: no temporary copy needed there.
        tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}" if self.is_local else target
        try:
            self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            write(tmp)
            if tmp != target:
                self.fs.move(tmp, target)
        except OSError as exc:
            with contextlib.suppress(OSError):
                self.fs.delete_file(tmp)
            raise StorageError(f"cannot write {self.uri_of(*parts)}: {exc}") from exc

    def write_bytes(self, data: bytes, *parts: str) -> None:
        def write(tmp: str) -> None:
            with self.fs.open_output_stream(tmp) as out:
                out.write(data)

        self._atomic(parts, write)

    def read_bytes(self, *parts: str) -> bytes:
        try:
            with self.fs.open_input_stream(self.path(*parts)) as src:
                return src.read()
        except (OSError, FileNotFoundError) as exc:
            raise StorageError(f"cannot read {self.uri_of(*parts)}: {exc}") from exc

    def write_json(self, obj: Any, *parts: str) -> None:
        self.write_bytes(json.dumps(obj, indent=2, sort_keys=True, default=str).encode(), *parts)

    def read_json(self, *parts: str) -> Any:
        try:
            return json.loads(self.read_bytes(*parts))
        except json.JSONDecodeError as exc:
            raise StorageError(f"{self.uri_of(*parts)} is not valid JSON: {exc}") from exc

    def write_table(self, table: pa.Table, *parts: str) -> None:
        self._atomic(parts, lambda tmp: pq.write_table(table, tmp, filesystem=self.fs))

    def read_table(self, *parts: str, columns: list[str] | None = None) -> pa.Table:
        """Read one Parquet file (only ``columns`` when given); a truncated or corrupt file
        raises StorageError naming it."""
        try:
            return pq.read_table(self.path(*parts), filesystem=self.fs, columns=columns)
        except pa.ArrowInvalid as exc:
            raise StorageError(
                f"{self.uri_of(*parts)} is not a readable Parquet file ({exc}); "
                "delete it to regenerate it"
            ) from exc
        except OSError as exc:  # the storage itself: unreachable, access denied
            raise StorageError(f"cannot read {self.uri_of(*parts)}: {exc}") from exc

    def read_tables(self, *parts: str, columns: list[str] | None = None) -> pa.Table | None:
        """Concatenate every Parquet file of a folder (only ``columns`` when given), in name
        order; None if there is none."""
        tables = [self.read_table(*parts, name, columns=columns)
                  for name in self.list_files(*parts, suffix=".parquet")]
        return pa.concat_tables(tables, promote_options="default") if tables else None

    def count_rows(self, *parts: str) -> int:
        """Rows in the Parquet files of a folder, from their footers (no data is read)."""
        return sum(pq.read_metadata(self.path(*parts, name), filesystem=self.fs).num_rows
                   for name in self.list_files(*parts, suffix=".parquet"))

    def dataset(self, *parts: str, columns: list[str] | None = None):
        """A folder of Parquet files as a Ray Dataset, read by Ray Data's tasks (a stage's
        output at any size; files being written, ``*.parquet.tmp-*``, are not read)."""
        import ray.data

        return ray.data.read_parquet(self.path(*parts), filesystem=self.fs, columns=columns,
                                     file_extensions=["parquet"])

    def fingerprint(self, *parts: str, salt: str = "") -> str:
        """A content hash of a file; of a folder (a model of many GB on object storage), a hash
        of its file names and sizes with ``salt`` (the attempt that wrote it), so nothing is
        downloaded to tell one output from another."""
        base = self.path(*parts)
        info = self.fs.get_file_info(base)
        if info.type == pafs.FileType.File:
            digest = hashlib.sha256()
            with self.fs.open_input_stream(base) as src:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
            return digest.hexdigest()[:16]
        digest = hashlib.sha256(salt.encode())
        files = self.fs.get_file_info(pafs.FileSelector(base, recursive=True))
        for item in sorted((i for i in files if i.type == pafs.FileType.File), key=lambda i: i.path):
            digest.update(f"{item.path[len(base):]}\0{item.size}\0".encode())
        return digest.hexdigest()[:16]

    def upload_dir(self, local_dir: str | os.PathLike, *parts: str) -> None:
        """Copy a local folder (an exported model) into the run directory file by file, its
        ``*config.json`` last: a reader that finds the config finds every weight file too."""
        target = self.path(*parts)
        if self.is_local and os.path.abspath(local_dir) == target:
            return
        local = Path(local_dir)
        names = sorted((str(p.relative_to(local)) for p in local.rglob("*") if p.is_file()),
                       key=lambda name: (name.endswith("config.json"), name))
        try:
            self.delete(*parts)
            for name in names:
                destination = f"{target}/{name}"
                self.fs.create_dir(destination.rsplit("/", 1)[0], recursive=True)
                pafs.copy_files(str(local / name), destination,
                                source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)
        except OSError as exc:
            raise StorageError(f"cannot upload {local} to {self.uri_of(*parts)}: {exc}") from exc

    def download_dir(self, *parts: str, to: str | os.PathLike, only: Callable[[str], bool] = bool) -> None:
        """Copy the files of a folder for which ``only(name)`` holds to a local one (streamed:
        weight files of many GB never sit in memory whole)."""
        try:
            for name in filter(only, self.walk(*parts)):
                destination = Path(to) / name
                destination.parent.mkdir(parents=True, exist_ok=True)
                pafs.copy_files(self.path(*parts, name), str(destination), source_filesystem=self.fs,
                                destination_filesystem=pafs.LocalFileSystem())
        except OSError as exc:
            raise StorageError(f"cannot download {self.uri_of(*parts)} to {to}: {exc}") from exc


def part_name() -> str:
    """A new Parquet part's file name: unique across workers, attempts and machines."""
    return f"part-{time.time_ns()}-{uuid.uuid4().hex[:6]}.parquet"


REMOTE_SCHEMES = ("s3://", "gs://", "gcs://")
TOKENIZER_FILES = ("tokenizer", "config.json", "chat_template", "special_tokens_map.json",
                   "vocab", "merges.txt", ".model")  # names holding any of these


def is_remote(path: str) -> bool:
    return path.startswith(REMOTE_SCHEMES)


def local_model_path(path: str, *, tokenizer_only: bool = False) -> str:
    """A local folder holding a model kept on object storage (``s3://``, ``gs://``): transformers
    reads only local folders and hub names. Downloaded once per machine into
    ``~/.cache/ray_align/models/`` (``$RAY_ALIGN_CACHE``), keyed by the URI and the files' names,
    sizes and times, so a model exported again to the same URI is downloaded again. Every worker
    of a node asks at once (the DPO reference, rounds after the first): one downloads behind a
    file lock, the others wait for it and read its copy. Local paths and hub names pass through."""
    if not is_remote(path):
        return path
    remote = RunDir(path)
    try:
        infos = remote.fs.get_file_info(pafs.FileSelector(remote.root, recursive=True))
    except OSError as exc:
        raise StorageError(f"cannot list the model at {path}: {exc}") from exc
    files = sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)
    wanted = [i for i in files
              if not tokenizer_only or any(s in i.base_name for s in TOKENIZER_FILES)]
    if not any(i.base_name == "config.json" for i in wanted):
        raise StorageError(f"{path} is not a model folder (no config.json)")
    key = hashlib.sha256(path.encode())
    for item in wanted:
        key.update(f"{item.path}\0{item.size}\0{item.mtime_ns}\0".encode())
    cache = Path(os.environ.get("RAY_ALIGN_CACHE", "~/.cache/ray_align")).expanduser() / "models"
    target = cache / f"{key.hexdigest()[:20]}{'-tokenizer' if tokenizer_only else ''}"
    names = {i.path[len(remote.root) + 1:] for i in wanted}
    download_once(target, lambda staging: remote.download_dir(to=staging, only=names.__contains__))
    return str(target)


COMPLETE_MARKER = ".complete"


def download_once(target: Path, download: Callable[[Path], None]) -> None:
    """Fill the local folder ``target`` with ``download(staging)`` unless a finished copy is
    there, once per machine: processes (and threads) asking at the same time wait on a file
    lock for the one downloading. The files land in a staging folder renamed into place, then
    a marker says the copy is complete; a folder without it (a download killed half way) is
    removed and downloaded again, never used."""
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    if (target / COMPLETE_MARKER).exists():
        return
    with FileLock(str(target.parent / f".{target.name}.lock")):
        if (target / COMPLETE_MARKER).exists():  # done while this one waited
            return
        staging = target.parent / f".{target.name}.partial"
        for leftover in (staging, target):  # of a killed download: the lock says nobody uses it
            shutil.rmtree(leftover, ignore_errors=True)
        staging.mkdir()
        download(staging)
        os.rename(staging, target)  # a local cache folder, not the run directory
        (target / COMPLETE_MARKER).touch()
