"""Stage data as Ray Datasets: outputs written as Parquet parts by Ray Data's workers, many files
per folder, with only counts coming back to the driver; sources staged the same way.

Why: a stage of millions of rows must not hold its inputs or outputs in one process. The
driver plans the Dataset and sums what each written block reports.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ray_align.config import SourceConfig
from ray_align.sources import (
    CHECKED_SCHEMA,
    PROMPT_SCHEMA,
    QUARANTINE_SCHEMA,
    ContextLimit,
    DataError,
    check_block,
    duplicate_problem,
    raw_dataset,
    read_raw,
    source_bytes,
    source_file_table,
)
from ray_align.storage import RunDir, part_name

LIGHT_CPU = 0.25  # CPU share of a writing or checking task
# Up to this many rows (a source up to IN_DRIVER_BYTES), a stage's data is handled with pyarrow
# in the driver (tens of MB at most): every Ray Data execution costs a second or more on a small
# machine, a shuffle about 10 s, whatever the size. RAY_ALIGN_IN_DRIVER_ROWS=0 sends all to Ray Data.
IN_DRIVER_ROWS = int(os.environ.get("RAY_ALIGN_IN_DRIVER_ROWS", "20000"))
IN_DRIVER_BYTES = 200 * IN_DRIVER_ROWS
# A block's tables, by output name, and what it counts ("rows" and any other tally).
Transform = Callable[..., tuple[dict[str, pa.Table], dict[str, int]]]


def _write_block(batch: pa.Table, transform: Transform, run: RunDir,
                 folders: dict[str, tuple[str, ...]], harmful: bool, kwargs: dict) -> pa.Table:
    from ray_align.pipeline import with_harm_label

    tables, counts = transform(batch, **kwargs)
    for name, table in tables.items():
        if table.num_rows:
            run.write_table(with_harm_label(table, harmful), *folders[name], part_name())
    return pa.table({"counts": [json.dumps(counts)]})


def in_driver(rows: int) -> bool:
    """Whether data of ``rows`` rows is small enough to handle with pyarrow in the driver."""
    return rows <= IN_DRIVER_ROWS


def stage_data(run: RunDir, *folder: str, rows: int):
    """A folder of Parquet parts as a table (``in_driver(rows)``) or a Ray Dataset."""
    if in_driver(rows):
        return run.read_tables(*folder)
    return run.dataset(*folder)


def map_data(data, fn: Callable[..., pa.Table], **kwargs: Any):
    """``fn`` on a table, or on every block of a Ray Dataset (in Ray Data tasks)."""
    if isinstance(data, pa.Table):
        return fn(data, **kwargs)
    return data.map_batches(fn, fn_kwargs=kwargs, batch_format="pyarrow", num_cpus=LIGHT_CPU)


def joined(left, right, on: str, rows: int):
    """``left`` inner-joined with ``right`` on ``on``: tables with pyarrow, Ray Datasets by a
    Ray Data hash join."""
    from ray_align.generate import join_partitions

    if isinstance(left, pa.Table):
        return left.join(right, on, join_type="inner")
    return left.join(right, join_type="inner", num_partitions=join_partitions(rows), on=(on,))


def write_dataset(dataset, run: RunDir, folders: dict[str, tuple[str, ...]], transform: Transform,
                  harmful: bool = True, fresh: bool = True, **kwargs: Any) -> Counter:
    """Run ``transform`` on every block of ``dataset`` in Ray Data tasks, write the tables it
    returns under ``folders`` (by output name) as one part each, and sum its counts. ``fresh``:
    first delete what an unfinished attempt left in those folders (a finished output never
    reaches here: a stage redone with other settings was set aside before). A table is
    transformed and written here, as one block."""
    if fresh:
        for folder in folders.values():
            run.delete(*folder)
    if isinstance(dataset, pa.Table):
        return Counter(json.loads(_write_block(dataset, transform, run, folders, harmful, kwargs)
                                  .column("counts")[0].as_py()))
    written = dataset.map_batches(
        _write_block, fn_kwargs={"transform": transform, "run": run, "folders": folders,
                                 "harmful": harmful, "kwargs": kwargs},
        batch_format="pyarrow", batch_size=None, num_cpus=LIGHT_CPU)
    total: Counter = Counter()
    for batch in written.iter_batches(batch_size=None, batch_format="pyarrow"):
        for counts in batch.column("counts").to_pylist():
            total.update(json.loads(counts))
    return total


def _split_checked(batch: pa.Table, source_path: str) -> tuple[dict[str, pa.Table], dict[str, int]]:
    bad = pc.is_valid(batch.column("problem"))
    good = batch.filter(pc.invert(bad))
    quarantined = batch.filter(bad)
    return ({"prompts": good.select([*PROMPT_SCHEMA.names, "row"]),
             "quarantine": pa.table({
                 "source": pa.repeat(pa.scalar(source_path), quarantined.num_rows),
                 "row": quarantined.column("row"),
                 "id": pc.fill_null(quarantined.column("raw_id"), "None"),
                 "reason": quarantined.column("problem")}, schema=QUARANTINE_SCHEMA)},
            {"read": batch.num_rows, "rows": good.num_rows, "quarantined": quarantined.num_rows})


def _later_rows(group: pa.Table) -> pa.Table:
    """Of the rows sharing one id, every one after the first (by row): the duplicates."""
    return group.sort_by("row").slice(1)


def _duplicates_as_quarantine(batch: pa.Table, source: SourceConfig) -> tuple[dict, dict]:
    reasons = [duplicate_problem(source, i) for i in batch.column("id").to_pylist()]
    table = pa.table({"source": pa.repeat(pa.scalar(source.path), batch.num_rows),
                      "row": batch.column("row"), "id": batch.column("id"),
                      "reason": pa.array(reasons, pa.string())}, schema=QUARANTINE_SCHEMA)
    return {"quarantine": table}, {"quarantined": batch.num_rows}


@dataclass
class StagedSource:
    """A source checked and written under ``STAGE/prompts/`` (valid rows, PROMPT_SCHEMA and
    their ``row``) and ``STAGE/quarantine/`` (the rows set aside, with their reasons)."""

    run: RunDir
    stage: str
    rows: int
    quarantined: int
    duplicates: Any = None  # (id, row) to leave out: a Dataset, a small table, or None

    def dataset(self):
        """The valid rows, each id once (its first row): a table when small, else a Dataset."""
        from ray_align.generate import join_partitions

        prompts = stage_data(self.run, self.stage, "prompts", rows=self.rows)
        if self.duplicates is None:
            return prompts
        if isinstance(self.duplicates, pa.Table):
            return map_data(prompts, _without, rows=self.duplicates.column("row"))
        return prompts.join(self.duplicates, join_type="left_anti",
                            num_partitions=join_partitions(self.rows), on=("id", "row"))


def _without(batch: pa.Table, rows: pa.Array) -> pa.Table:
    return batch.filter(pc.invert(pc.is_in(batch.column("row"), value_set=rows)))


def later_rows_of(table: pa.Table) -> pa.Table:
    """The rows (id, row) whose id an earlier row already has: pyarrow, for a small source."""
    ordered = table.sort_by([("id", "ascending"), ("row", "ascending")])
    ids = ordered.column("id").combine_chunks()
    if len(ids) < 2:
        return ordered.slice(0, 0)
    repeat = pc.equal(ids.slice(1), ids.slice(0, len(ids) - 1))
    return ordered.slice(1).filter(repeat)


def find_duplicates(run: RunDir, stage: str, rows: int):
    """The later rows of every repeated id under ``STAGE/prompts/``: with pyarrow in the driver
    for a small source, else by a Ray Data groupby (materialized: usually none or few)."""
    if in_driver(rows):
        return later_rows_of(run.read_tables(stage, "prompts", columns=["id", "row"]))
    return (run.dataset(stage, "prompts", columns=["id", "row"]).groupby("id")
            .map_groups(_later_rows, batch_format="pyarrow").materialize())


def stage_source(run: RunDir, stage: str, source: SourceConfig, max_prompt_chars: int,
                 on_bad_row: str, name: str, context: ContextLimit | None = None) -> StagedSource:
    """``load_source`` at any size: read by Ray Data tasks, checked in parallel (the context
    limit included), duplicates found by a groupby on the ids; a bad row stops the stage
    (naming the file and row) or is quarantined, as ``on_bad_row`` says."""
    checking = {"source": source, "label": name, "max_prompt_chars": max_prompt_chars,
                "on_bad_row": on_bad_row, "context": context}
    if source_bytes(source) <= IN_DRIVER_BYTES:  # a small file: read and checked right here
        checked = pa.concat_tables([check_block(raw, **checking) for raw in
                                    read_raw(source_file_table(source), source)]
                                   or [CHECKED_SCHEMA.empty_table()])
    else:
        checked = raw_dataset(source).map_batches(check_block, fn_kwargs=checking,
                                                  batch_format="pyarrow", batch_size=None,
                                                  num_cpus=LIGHT_CPU)
    folders = {"prompts": (stage, "prompts"), "quarantine": (stage, "quarantine")}
    with data_errors():
        counts = write_dataset(checked, run, folders, _split_checked, harmful=True,
                               source_path=source.path)
    if not counts["read"]:
        raise DataError(f"{source.path}: the dataset is empty")
    staged = StagedSource(run, stage, counts["rows"], counts["quarantined"])
    if staged.rows:
        duplicates = find_duplicates(run, stage, staged.rows)
        small = isinstance(duplicates, pa.Table)
        extra = duplicates.num_rows if small else duplicates.count()
        if extra and on_bad_row == "error":
            first = (duplicates.sort_by("row").slice(0, 1).to_pylist() if small
                     else duplicates.sort("row").take(1))[0]
            raise DataError(f"{source.path} row {first['row']}: "
                            f"{duplicate_problem(source, first['id'])}")
        if extra:
            write_dataset(duplicates, run,
                          {"quarantine": folders["quarantine"]},
                          _duplicates_as_quarantine, fresh=False, source=source)
            staged.rows -= extra
            staged.quarantined += extra
            staged.duplicates = duplicates
    if staged.quarantined:
        print(f"[{stage}] {staged.quarantined} bad rows quarantined in "
              f"{run.uri_of(stage, 'quarantine')}", flush=True)
    if not staged.rows:
        raise DataError(f"{source.path}: no valid rows left ({staged.quarantined} quarantined)")
    return staged


class data_errors:  # noqa: N801 - used as a ``with`` block
    """Re-raise a DataError raised in a Ray task as itself: the message names the file and row,
    without the task's traceback wrapped around it."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        seen, todo = [], [exc]
        while todo:  # Ray wraps a task's error: its ``cause``, then the chained ones
            item = todo.pop()
            if item is None or any(item is s for s in seen):
                continue
            seen.append(item)
            if type(item) is DataError and item is not exc:  # not Ray's RayTaskError(DataError)
                raise DataError(str(item)) from None
            todo += [getattr(item, "cause", None), item.__cause__, item.__context__]
        found = re.search(r"DataError: ([^\n]+)", str(exc)) if exc is not None else None
        if found and type(exc) is not DataError:
            raise DataError(found.group(1)) from None
        return False
