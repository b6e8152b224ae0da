"""Manifest logic with stand-in stages (no Ray): skip, resume, redo, failure recording."""

import pyarrow as pa
import pytest

from ray_align.config import load_config
from ray_align.pipeline import (
    Context,
    Stage,
    StageError,
    StageOutput,
    manifest,
    run_stage,
    write_run_summary,
)
from ray_align.storage import RunDir
from tests.unit.test_config import QUICKSTART


def _ctx(tmp_path, *overrides):
    return Context(config=load_config(QUICKSTART, [f"run_dir={tmp_path}", *overrides]),
                   run=RunDir(str(tmp_path)))


def _writer(calls):
    def run(ctx):
        calls.append(1)
        tokens = ctx.config.induce.max_tokens  # the output depends on the stage's config
        ctx.run.write_table(pa.table({"id": ["a", "b"], "n": [tokens, tokens]}), "first", "data.parquet")
        return StageOutput(2, "data.parquet", {"m": 1})
    return run


def test_complete_stage_is_skipped_and_redone_when_its_config_changes(tmp_path):
    calls = []
    stage = Stage("first", ("induce",), (), _writer(calls))
    run_stage(_ctx(tmp_path), stage)
    run_stage(_ctx(tmp_path), stage)
    assert len(calls) == 1
    run_stage(_ctx(tmp_path, "train.epochs=9"), stage)  # not one of its sections
    assert len(calls) == 1
    run_stage(_ctx(tmp_path, "induce.max_tokens=9"), stage)
    assert len(calls) == 2
    record = manifest(RunDir(str(tmp_path)), "first")
    assert record["status"] == "complete" and record["rows"] == 2 and record["templates"]


def test_downstream_needs_upstream_and_follows_its_fingerprint(tmp_path):
    calls, seen = [], []
    first = Stage("first", ("induce",), (), _writer(calls))
    def second_run(ctx):
        seen.append(1)
        ctx.run.write_bytes(b"x", "second", "data.parquet")
        return StageOutput(0, "data.parquet")

    second = Stage("second", ("build",), ("first",), second_run)
    with pytest.raises(StageError, match="needs stage 'first'"):
        run_stage(_ctx(tmp_path), second)
    run_stage(_ctx(tmp_path), first)
    run_stage(_ctx(tmp_path), second)
    run_stage(_ctx(tmp_path), second)
    assert len(seen) == 1
    run_stage(_ctx(tmp_path, "induce.max_tokens=7"), first)  # new upstream output
    run_stage(_ctx(tmp_path), second)
    assert len(seen) == 2


def test_failure_is_recorded_and_never_marked_complete(tmp_path):
    def boom(ctx):
        raise OSError("No space left on device")

    with pytest.raises(OSError):
        run_stage(_ctx(tmp_path), Stage("first", ("induce",), (), boom))
    record = manifest(RunDir(str(tmp_path)), "first")
    assert record["status"] == "failed" and "No space left" in record["error"]
    summary = write_run_summary(RunDir(str(tmp_path)), ["first"])
    assert summary["stages"]["first"]["status"] == "failed"
    note = (tmp_path / "README.txt").read_text()
    assert note.startswith("This run directory holds")
    assert "labelled 'contains_harmful_text' in their Parquet metadata" in note


def test_the_summary_counts_every_stages_engine_pools(tmp_path):
    from ray_align.pipeline import format_summary

    pools = {"first": 1, "second": 2, "third": 0}
    for name, count in pools.items():
        run_stage(_ctx(tmp_path), Stage(name, ("induce",), (), lambda ctx, n=count: StageOutput(
            1, "", {"engine_pools": n})))
    summary = write_run_summary(RunDir(str(tmp_path)), list(pools))
    assert summary["metrics"]["engine_pools"] == 3
    assert "engine pools started (this run's stages): 3" in format_summary(summary)


def test_the_summary_lists_rounds_in_their_order_past_nine():
    from ray_align.pipeline import format_summary

    metrics = {f"evaluate.{row}.harmless_rate": 0.5 for row in
               ("base", "round1", "round10", "round2", "aligned")}  # a manifest's sorted keys
    line = next(line for line in format_summary({"run_dir": "r", "stages": {}, "metrics": metrics})
                .splitlines() if "by round" in line)
    assert [part.split()[0] for part in line.split(": ", 1)[1].split(", ")] == [
        "base", "round1", "round2", "round10", "aligned"]


def test_node_local_run_dir_is_refused_on_a_multi_node_cluster(tmp_path):
    from ray_align.pipeline import check_shared_storage

    local, nodes = RunDir(str(tmp_path)), [{"Alive": True}, {"Alive": True}]
    with pytest.raises(StageError, match="local path but the Ray cluster has 2 nodes"):
        check_shared_storage(local, False, nodes)
    check_shared_storage(local, True, nodes)  # the user says it is a shared mount
    check_shared_storage(local, False, nodes[:1])
    check_shared_storage(RunDir(f"file://{tmp_path}"), False, nodes[:1])


def test_finished_output_that_changed_or_vanished_is_never_reused(tmp_path):
    calls = []
    stage = Stage("first", ("induce",), (), _writer(calls))
    run_stage(_ctx(tmp_path), stage)
    data = tmp_path / "first" / "data.parquet"
    data.write_bytes(data.read_bytes()[:-20])  # truncated after the stage finished
    with pytest.raises(StageError, match=r"first/data.parquet changed or was corrupted"):
        run_stage(_ctx(tmp_path), stage)
    data.unlink()
    with pytest.raises(StageError, match=r"first/data.parquet is gone"):
        run_stage(_ctx(tmp_path), stage)
    assert len(calls) == 1


FULL_DISK = """
import resource, signal, sys
import pyarrow as pa
from ray_align.config import load_config
from ray_align.pipeline import Context, Stage, StageOutput, run_stage
from ray_align.storage import RunDir, StorageError

def big(ctx):
    ctx.run.write_table(pa.table({"text": [str(i) * 50 for i in range(200_000)]}), "first", "data.parquet")
    return StageOutput(200_000, "data.parquet")

run_dir, quickstart = sys.argv[1], sys.argv[2]
ctx = Context(config=load_config(quickstart, [f"run_dir={run_dir}"]), run=RunDir(run_dir))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, like ENOSPC
resource.setrlimit(resource.RLIMIT_FSIZE, (256_000, 256_000))
try:
    run_stage(ctx, Stage("first", ("induce",), (), big))
except StorageError as exc:
    print("ERROR", exc)
"""


def test_a_full_disk_fails_the_stage_with_the_path_and_leaves_no_output(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path), str(QUICKSTART)],
                            capture_output=True, text=True, timeout=120)
    assert f"ERROR cannot write {tmp_path}/first/data.parquet" in result.stdout, result.stderr[-2000:]
    assert "File too large" in result.stdout
    record = manifest(RunDir(str(tmp_path)), "first")
    assert record["status"] == "failed" and "data.parquet" in record["error"]
    assert [p.name for p in (tmp_path / "first").iterdir()] == ["manifest.json"]  # no partial file
