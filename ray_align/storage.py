"""The run directory: a local path or an ``s3://`` / ``gs://`` URI, through pyarrow filesystems.

All writes are atomic (write a temporary file, then move it into place), so a reader never
sees half a file and an interrupted write leaves nothing that looks finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


class StorageError(RuntimeError):
    """A file in the run directory is missing, unreadable, corrupt or cannot be written."""


class RunDir:
    """A run directory on any pyarrow filesystem; paths inside are relative strings."""

    def __init__(self, uri: str) -> None:
        if "://" not in uri:
            uri = str(Path(uri).expanduser().resolve())
        self.uri = uri.rstrip("/")
        self.fs, self.root = pafs.FileSystem.from_uri(self.uri if "://" in self.uri else self.uri)
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def uri_of(self, *parts: str) -> str:
        return "/".join([self.uri, *parts])

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def makedirs(self, *parts: str) -> None:
        self.fs.create_dir(self.path(*parts), recursive=True)

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
        tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            write(tmp)
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

    def read_table(self, *parts: str) -> pa.Table:
        """Read one Parquet file; a truncated or corrupt file raises StorageError naming it."""
        try:
            return pq.read_table(self.path(*parts), filesystem=self.fs)
        except (OSError, pa.ArrowInvalid) as exc:
            raise StorageError(
                f"{self.uri_of(*parts)} is not a readable Parquet file ({exc}); "
                "delete it to regenerate it"
            ) from exc

    def read_tables(self, *parts: str) -> pa.Table | None:
        """Concatenate every Parquet file of a folder, in name order; None if there is none."""
        tables = [self.read_table(*parts, name) for name in self.list_files(*parts, suffix=".parquet")]
        return pa.concat_tables(tables, promote_options="default") if tables else None

    def fingerprint(self, *parts: str) -> str:
        """A content hash of a file or of every file under a folder."""
        digest = hashlib.sha256()
        base = self.path(*parts)
        info = self.fs.get_file_info(base)
        if info.type == pafs.FileType.File:
            files = [info]
        else:
            files = self.fs.get_file_info(pafs.FileSelector(base, recursive=True))
            files = sorted((i for i in files if i.type == pafs.FileType.File), key=lambda i: i.path)
        for item in files:
            digest.update(item.path[len(base):].encode())
            with self.fs.open_input_stream(item.path) as src:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
        return digest.hexdigest()[:16]

    def upload_dir(self, local_dir: str | os.PathLike, *parts: str) -> None:
        """Copy a local folder into the run directory (used for exported models)."""
        target = self.path(*parts)
        if self.is_local and os.path.abspath(local_dir) == target:
            return
        self.delete(*parts)
        self.fs.create_dir(target, recursive=True)
        pafs.copy_files(str(local_dir), target, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.fs)
