"""Prompt sources: JSONL, CSV or Parquet files (local, s3://, gs://), hub datasets, embedded sets.

Every row gets a stable id (its id column, or a hash of its text) that it keeps through every
stage. Bad rows are named by file and row, then stop the run or go to quarantine, as the config
says: nothing is dropped silently.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ray_align.assets import resolve
from ray_align.config import SourceConfig

PROMPT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("response", pa.string()),
        pa.field("category", pa.string()),
        pa.field("source", pa.string(), nullable=False),
    ]
)
QUARANTINE_SCHEMA = pa.schema(
    [("source", pa.string()), ("row", pa.int64()), ("id", pa.string()), ("reason", pa.string())]
)


class DataError(ValueError):
    """A dataset problem; the message names the file, and the row where there is one."""


@dataclass
class Loaded:
    """Valid rows plus the rows set aside, each with its reason."""

    table: pa.Table
    quarantined: list[dict[str, Any]] = field(default_factory=list)


def _open_text(path: str) -> str:
    fs, inner = pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), path)
    try:
        with fs.open_input_stream(inner) as src:
            data = src.read()
    except (OSError, FileNotFoundError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"{path} row {line}: invalid UTF-8 at byte {exc.start}") from exc


def _read_records(path: str, split: str) -> list[dict[str, Any]]:
    """Raw records of a source, in file order."""
    if path.startswith("hf:"):
        import datasets  # only users with hub access reach this

        return list(datasets.load_dataset(path.removeprefix("hf:"), split=split))
    lower = path.lower()
    if not lower.endswith((".parquet", "/", ".csv", ".jsonl", ".json")):
        raise DataError(f"{path}: unknown format; use .jsonl, .csv, .parquet or hf:NAME")
    if lower.endswith(".parquet") or lower.endswith("/"):
        fs, inner = pafs.FileSystem.from_uri(path) if "://" in path else (None, path)
        try:
            return pq.read_table(inner, filesystem=fs).to_pylist()
        except (OSError, pa.ArrowInvalid) as exc:
            raise DataError(f"{path}: not a readable Parquet file ({exc})") from exc
    text = _open_text(path)
    if lower.endswith(".csv"):
        return list(csv.DictReader(io.StringIO(text)))
    # JSON Lines; not splitlines: U+2028 is text
    return list(_json_records(path, enumerate(text.split("\n"), start=1)))


def _text_problem(value: Any, max_chars: int | None) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "missing"
    if not isinstance(value, str):
        return f"not a string ({type(value).__name__})"
    if not value.strip():
        return "empty"
    if max_chars is not None and len(value) > max_chars:
        return f"{len(value)} characters, over the limit of {max_chars}"
    return None


@dataclass
class ContextLimit:
    """Prompts whose chat-formatted token count leaves no room for the answer are bad rows."""

    count_tokens: Callable[[str], int]  # a prompt's tokens as the engine will see it
    limit: int
    why: str  # which settings make the limit, for the error message

    def count_batch(self, prompts: list[str]) -> list[int]:
        """Token counts of many prompts (one batched call when the counter has one)."""
        batch = getattr(self.count_tokens, "batch", None)
        return batch(prompts) if batch else [self.count_tokens(p) for p in prompts]

    def problem(self, source: SourceConfig, tokens: int) -> str:
        return f"{source.prompt_column}: {tokens} tokens, over the {self.limit} ({self.why})"


def source_rows(source: SourceConfig) -> int:
    """Rows in a source before its offset and limit (how far later rounds can move on)."""
    return len(_read_records(resolve(source.path), source.split))


def load_source(
    source: SourceConfig, max_prompt_chars: int, on_bad_row: str, name: str | None = None,
    context: ContextLimit | None = None,
) -> Loaded:
    """Load, map and validate one source into PROMPT_SCHEMA rows."""
    path = resolve(source.path)
    label = name or source.path
    records = _read_records(path, source.split)
    if not records:
        raise DataError(f"{source.path}: the dataset is empty")
    wanted = [source.prompt_column, source.id_column, source.response_column, source.category_column]
    for column in filter(None, wanted):
        if column not in records[0]:
            raise DataError(
                f"{source.path}: missing column {column!r} (found: {', '.join(map(str, records[0]))})"
            )
    window = records[source.offset :]
    if source.limit is not None:
        window = window[: source.limit]
    rows, quarantined, seen = [], [], set()
    for index, record in enumerate(window, start=source.offset + 1):
        row, problem, raw_id = check_record(record, source, label, max_prompt_chars)
        if not problem and context is not None and (n := context.count_tokens(row["prompt"])) > context.limit:
            problem = context.problem(source, n)
        if not problem and row["id"] in seen:
            problem = duplicate_problem(source, row["id"])
        if problem:
            if on_bad_row == "error":
                raise DataError(f"{source.path} row {index}: {problem}")
            quarantined.append({"source": source.path, "row": index, "id": str(raw_id), "reason": problem})
            continue
        seen.add(row["id"])
        rows.append(row)
    if not rows:
        raise DataError(f"{source.path}: no valid rows left ({len(quarantined)} quarantined)")
    return Loaded(pa.Table.from_pylist(rows, schema=PROMPT_SCHEMA), quarantined)


def check_record(record: dict[str, Any], source: SourceConfig, label: str, max_prompt_chars: int,
                 ) -> tuple[dict[str, Any], str | None, Any]:
    """One raw record as a PROMPT_SCHEMA row, what is wrong with it (None if nothing), and its
    raw id (for the quarantine). The context limit and duplicates are checked by the caller."""
    prompt = record.get(source.prompt_column)
    problem = _text_problem(prompt, max_prompt_chars)
    problem = problem and f"{source.prompt_column}: {problem}"
    response = record.get(source.response_column) if source.response_column else None
    if not problem and source.response_column:
        bad = _text_problem(response, None)
        problem = bad and f"{source.response_column}: {bad}"
    raw_id = _id_text(record.get(source.id_column)) if source.id_column else None
    if source.id_column and not problem:
        bad = _text_problem(raw_id, None)
        problem = bad and f"{source.id_column}: {bad}"
    row_id = str(raw_id) if raw_id is not None else _text_id(label, prompt)
    category = record.get(source.category_column) if source.category_column else None
    return ({"id": row_id, "prompt": prompt, "response": response,
             "category": None if category is None else str(category), "source": label},
            problem, raw_id)


def duplicate_problem(source: SourceConfig, row_id: str) -> str:
    return f"duplicate id {row_id!r}" if source.id_column else "duplicate prompt"


def _id_text(value: Any) -> Any:
    """Numeric ids as text (a float column of whole numbers, as Parquet stores ids with gaps);
    NaN and anything else pass through for the validity check to name."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return str(int(value))
    return value


def _text_id(label: str, text: Any) -> str:
    return f"{label.rsplit('/', 1)[-1].split('.')[0]}-{hashlib.sha1(str(text).encode()).hexdigest()[:12]}"


# ----------------------------------------------------------------------------- as a Ray Dataset
#
# A source of any size: files read by Ray Data tasks (one per file, streaming blocks of
# records), rows checked in parallel tasks, duplicates found by a groupby on the ids, valid
# rows and quarantined ones written as Parquet parts from the workers. The driver holds counts.

RECORD_BLOCK = 8192  # raw records per block a reading task yields
RAW_SCHEMA = pa.schema([("row", pa.int64()), ("record", pa.string())])  # 1-based index, JSON
CHECKED_SCHEMA = PROMPT_SCHEMA.append(pa.field("row", pa.int64())).append(
    pa.field("raw_id", pa.string())).append(pa.field("problem", pa.string()))


@dataclass(frozen=True)
class SourceFile:
    """One file of a source and the index its first record has among all the source's."""

    path: str
    first_index: int


def _source_files(path: str) -> list[SourceFile]:
    """The files of a source, each with its first record's index (a Parquet folder's files in
    name order, counted from their footers)."""
    if not path.endswith("/"):
        return [SourceFile(path, 0)]
    fs, inner = pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), path)
    try:
        infos = fs.get_file_info(pafs.FileSelector(inner.rstrip("/"), recursive=True))
    except OSError as exc:
        raise DataError(f"{path}: cannot list ({exc})") from exc
    names = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))
    files, index = [], 0
    for name in names:
        files.append(SourceFile(f"{path.split('://')[0]}://{name}" if "://" in path else name, index))
        index += pq.read_metadata(name, filesystem=fs).num_rows
    return files


def _record_batches(path: str, split: str):
    """The records of one file (or hub split), in order, in lists of up to RECORD_BLOCK."""
    lower = path.lower()
    if path.startswith("hf:"):
        records = _read_records(path, split)
        for start in range(0, len(records), RECORD_BLOCK):
            yield records[start:start + RECORD_BLOCK]
        return
    if lower.endswith(".parquet"):
        fs, inner = pafs.FileSystem.from_uri(path) if "://" in path else (None, path)
        try:
            for batch in pq.ParquetFile(inner, filesystem=fs).iter_batches(batch_size=RECORD_BLOCK):
                yield batch.to_pylist()
        except (OSError, pa.ArrowInvalid) as exc:
            raise DataError(f"{path}: not a readable Parquet file ({exc})") from exc
        return
    fs, inner = pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), path)
    try:
        stream = fs.open_input_stream(inner)
    except (OSError, FileNotFoundError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc
    with stream, io.TextIOWrapper(stream, encoding="utf-8", newline="") as text:
        lines = _numbered_lines(path, text)
        if lower.endswith(".csv"):
            reader = csv.DictReader(line for _, line in lines)
            yield from _chunks(reader)
            return
        yield from _chunks(_json_records(path, lines))


def _numbered_lines(path: str, text: io.TextIOBase):
    number = 0
    try:
        for number, line in enumerate(text, start=1):
            yield number, line
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} row {number + 1}: invalid UTF-8 ({exc.reason})") from exc


def _json_records(path: str, lines):
    for number, line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} row {number}: not valid JSON ({exc.msg})") from exc
        if not isinstance(record, dict):
            raise DataError(f"{path} row {number}: expected a JSON object")
        yield record


def _chunks(records):
    chunk = []
    for record in records:
        chunk.append(record)
        if len(chunk) == RECORD_BLOCK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def read_raw(files: pa.Table, source: SourceConfig):
    """A Ray Data task: the records of its files in the source's offset/limit window, as JSON
    text beside their 1-based index (the row a message names). The first file's first record
    must hold every configured column."""
    end = None if source.limit is None else source.offset + source.limit
    wanted = [c for c in (source.prompt_column, source.id_column, source.response_column,
                          source.category_column) if c]
    for path, first in zip(files.column("path").to_pylist(), files.column("first_index").to_pylist(),
                           strict=True):
        index = first
        for records in _record_batches(path, source.split):
            if index == 0:
                missing = [c for c in wanted if c not in records[0]]
                if missing:
                    raise DataError(f"{source.path}: missing column {missing[0]!r} (found: "
                                    f"{', '.join(map(str, records[0]))})")
            rows, texts = [], []
            for record in records:
                if index >= source.offset and (end is None or index < end):
                    rows.append(index + 1)
                    texts.append(json.dumps(record, ensure_ascii=False, default=str))
                index += 1
            if rows:
                yield pa.table({"row": pa.array(rows, pa.int64()), "record": pa.array(texts)})
            if end is not None and index >= end:
                return


def check_block(raw: pa.Table, source: SourceConfig, label: str, max_prompt_chars: int,
                on_bad_row: str, context: ContextLimit | None) -> pa.Table:
    """A Ray Data task: each raw record checked (``check_record``; the context limit on the
    block's prompts at once), in CHECKED_SCHEMA with the problem, or null when it is fine."""
    out = []
    for index, text in zip(raw.column("row").to_pylist(), raw.column("record").to_pylist(),
                           strict=True):
        row, problem, raw_id = check_record(json.loads(text), source, label, max_prompt_chars)
        out.append({**row, "row": index, "raw_id": None if raw_id is None else str(raw_id),
                    "problem": problem})
    if context is not None:
        fine = [r for r in out if not r["problem"]]
        for row, tokens in zip(fine, context.count_batch([r["prompt"] for r in fine]), strict=True):
            if tokens > context.limit:
                row["problem"] = context.problem(source, tokens)
    if on_bad_row == "error":
        bad = next((r for r in out if r["problem"]), None)
        if bad:
            raise DataError(f"{source.path} row {bad['row']}: {bad['problem']}")
    return pa.Table.from_pylist(out, schema=CHECKED_SCHEMA)


def source_file_table(source: SourceConfig) -> pa.Table:
    """The source's files (``path``, ``first_index``), checked for a known format."""
    path = resolve(source.path)
    lower = path.lower()
    if not (path.startswith("hf:") or lower.endswith((".parquet", "/", ".csv", ".jsonl", ".json"))):
        raise DataError(f"{path}: unknown format; use .jsonl, .csv, .parquet or hf:NAME")
    files = _source_files(path)
    if not files:
        raise DataError(f"{source.path}: the dataset is empty (no .parquet files)")
    return pa.table({"path": [f.path for f in files], "first_index": [f.first_index for f in files]})


def source_bytes(source: SourceConfig) -> int:
    """The size of a source's files (0 for a hub dataset, which is read where it is asked)."""
    path = resolve(source.path)
    if path.startswith("hf:"):
        return 0
    fs, inner = pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), path)
    try:
        info = fs.get_file_info(inner.rstrip("/"))
        if info.type == pafs.FileType.Directory:
            return sum(i.size or 0 for i in fs.get_file_info(pafs.FileSelector(info.path, recursive=True)))
    except OSError as exc:
        raise DataError(f"{source.path}: cannot read ({exc})") from exc
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"{source.path}: cannot read (no such file)")
    return info.size or 0


def raw_dataset(source: SourceConfig):
    """The source's records as a Ray Dataset (RAW_SCHEMA), one reading task per file."""
    import ray

    table = source_file_table(source)
    return ray.data.from_arrow(table).repartition(table.num_rows).map_batches(
        read_raw, fn_kwargs={"source": source}, batch_size=1, batch_format="pyarrow", num_cpus=0.25)
