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
    records = []  # JSON Lines
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines: U+2028 is text
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} row {number}: not valid JSON ({exc.msg})") from exc
        if not isinstance(record, dict):
            raise DataError(f"{path} row {number}: expected a JSON object")
        records.append(record)
    return records


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
        if not problem and context is not None and (n := context.count_tokens(prompt)) > context.limit:
            problem = f"{source.prompt_column}: {n} tokens, over the {context.limit} ({context.why})"
        if not problem and row_id in seen:
            problem = f"duplicate id {row_id!r}" if source.id_column else "duplicate prompt"
        if problem:
            if on_bad_row == "error":
                raise DataError(f"{source.path} row {index}: {problem}")
            quarantined.append({"source": source.path, "row": index, "id": str(raw_id), "reason": problem})
            continue
        seen.add(row_id)
        category = record.get(source.category_column) if source.category_column else None
        rows.append({"id": row_id, "prompt": prompt, "response": response,
                     "category": None if category is None else str(category), "source": label})
    if not rows:
        raise DataError(f"{source.path}: no valid rows left ({len(quarantined)} quarantined)")
    return Loaded(pa.Table.from_pylist(rows, schema=PROMPT_SCHEMA), quarantined)


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
