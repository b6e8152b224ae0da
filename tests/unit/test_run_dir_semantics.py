"""The run directory's rules on a local disk and on a real S3 API server (moto, loopback): only
operations object stores support, stage identity without execution settings, a redo that keeps
the finished output until the new one is complete, and one driver per run directory."""

from __future__ import annotations

import os
import time

import pyarrow as pa
import pytest

from ray_align.config import load_config
from ray_align.lease import LeaseError, RunLease
from ray_align.pipeline import PREVIOUS, Context, Stage, StageOutput, manifest, run_stage
from ray_align.storage import RunDir, local_model_path
from tests.unit.test_config import QUICKSTART


@pytest.fixture(params=["local", "s3"])
def run_uri(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "run")
    return request.getfixturevalue("s3_bucket") + "/run"


def _ctx(uri: str, *overrides: str) -> Context:
    return Context(config=load_config(QUICKSTART, [f"run_dir={uri}", *overrides]), run=RunDir(uri))


def test_files_round_trip_and_folders_move_file_by_file(run_uri, tmp_path):
    run = RunDir(run_uri)
    run.write_json({"a": 1}, "stage", "manifest.json")
    run.write_table(pa.table({"x": [1, 2]}), "stage", "parts", "p1.parquet")
    assert run.walk("stage") == ["manifest.json", "parts/p1.parquet"]  # no temporary leftovers
    assert run.read_tables("stage", "parts").column("x").to_pylist() == [1, 2]
    assert run.move_files(("stage",), (PREVIOUS, "stage", "h")) == 2
    assert not run.exists("stage") and run.read_json(PREVIOUS, "stage", "h", "manifest.json") == {"a": 1}

    local = tmp_path / "model"
    (local / "sub").mkdir(parents=True)
    (local / "config.json").write_text("{}")
    (local / "model.safetensors").write_bytes(b"weights")
    (local / "sub" / "extra.txt").write_text("x")
    run.upload_dir(local, "train", "model")
    assert run.walk("train", "model") == ["config.json", "model.safetensors", "sub/extra.txt"]
    first = run.fingerprint("train", "model", salt="attempt-1")
    assert first != run.fingerprint("train", "model", salt="attempt-2")  # another export
    (local / "model.safetensors").write_bytes(b"other weights")
    run.upload_dir(local, "train", "model")
    assert run.read_bytes("train", "model", "model.safetensors") == b"other weights"
    assert run.fingerprint("train", "model", salt="attempt-1") != first


def _stage(calls: list[float]) -> Stage:
    def run(ctx: Context) -> StageOutput:
        temperature = ctx.config.induce.temperature
        kept = ctx.run.walk(PREVIOUS, "induce")
        calls.append(temperature)
        ctx.run.write_table(pa.table({"t": [temperature]}), "induce", "parts", "p.parquet")
        ctx.run.write_table(pa.table({"t": [temperature]}), "induce", "data.parquet")
        return StageOutput(1, "data.parquet", {"kept_while_running": kept})
    return Stage("induce", ("model", "engine", "induce"), (), run, ("parts",))


def test_execution_settings_skip_and_a_redo_keeps_the_old_output_until_done(run_uri, capsys):
    calls: list[float] = []
    stage = _stage(calls)
    run_stage(_ctx(run_uri), stage)
    for execution in ("engine.pool=[1,4]", "engine.batch_size=3", "engine.check_resources=false",
                      "engine.shard_rows=7", "engine.cpus_per_engine=2",
                      "engine.engine_kwargs={max_num_seqs: 8}"):
        run_stage(_ctx(run_uri, execution), stage)
    assert calls == [0.7], "an execution setting redid the stage"

    record = run_stage(_ctx(run_uri, "induce.temperature=0.9"), stage)
    out = capsys.readouterr().out
    assert "induce.temperature (0.7 -> 0.9) changed" in out and "kept in" in out
    assert calls == [0.7, 0.9]
    # while the new attempt ran, the finished one (output and manifest, no scratch) was kept
    kept = record["metrics"]["kept_while_running"]
    assert sorted(name.split("/", 1)[1] for name in kept) == ["data.parquet", "manifest.json"]
    run = RunDir(run_uri)
    assert not run.exists(PREVIOUS, "induce"), "the kept output outlived the new one"
    assert run.read_table("induce", "data.parquet").column("t").to_pylist() == [0.9]

    # an output-defining engine argument does redo it
    run_stage(_ctx(run_uri, "induce.temperature=0.9", "engine.engine_kwargs={quantization: fp8}"), stage)
    assert calls == [0.7, 0.9, 0.9]


def test_an_interrupted_redo_leaves_the_old_output_and_going_back_restores_it(run_uri, capsys):
    calls: list[float] = []
    stage = _stage(calls)
    run_stage(_ctx(run_uri), stage)

    def dies(ctx: Context) -> StageOutput:
        ctx.run.write_table(pa.table({"t": [0.0]}), "induce", "parts", "half.parquet")
        raise KeyboardInterrupt  # the driver is stopped in the middle of the redo

    with pytest.raises(KeyboardInterrupt):
        run_stage(_ctx(run_uri, "induce.temperature=0.2"), Stage("induce", stage.sections, (), dies,
                                                                  ("parts",)))
    run = RunDir(run_uri)
    assert manifest(run, "induce")["status"] == "failed"
    assert any(name.endswith("data.parquet") for name in run.walk(PREVIOUS, "induce"))

    record = run_stage(_ctx(run_uri), stage)  # back to the first settings: nothing is redone
    assert calls == [0.7] and record["status"] == "complete"
    assert "restored the complete attempt" in capsys.readouterr().out
    assert run.read_table("induce", "data.parquet").column("t").to_pylist() == [0.7]
    # the unfinished attempt with temperature 0.2 is kept (with its parts) to be resumed
    assert any(name.endswith("parts/half.parquet") for name in run.walk(PREVIOUS, "induce"))


def test_a_second_driver_is_refused_naming_the_holder(run_uri):
    run = RunDir(run_uri)
    busy = r"in use by ray-align run first.yaml \(pid \d+ on .*--force"
    with RunLease(run, "ray-align run first.yaml", settle_s=0.1), pytest.raises(LeaseError, match=busy):
        RunLease(run, "ray-align run second.yaml", settle_s=0.1).acquire()
    with RunLease(run, "ray-align run third.yaml", settle_s=0.1):  # released: free again
        assert run.read_json("lease.json")["command"] == "ray-align run third.yaml"
    assert not run.exists("lease.json")


def test_a_stale_lease_is_taken_and_force_takes_a_live_one(run_uri, capsys):
    run = RunDir(run_uri)
    run.write_json({"holder": "gone", "host": "elsewhere", "pid": 1, "command": "old",
                    "heartbeat_at": time.time() - 3600}, "lease.json")
    with RunLease(run, "new", settle_s=0.1):
        assert run.read_json("lease.json")["command"] == "new"
    assert "taking over the run directory from old" in capsys.readouterr().out

    first = RunLease(run, "first", heartbeat_s=0.2, settle_s=0.1)
    first.acquire()
    try:
        # the first holder stops at its next heartbeat
        with pytest.raises(KeyboardInterrupt), RunLease(run, "second", force=True, settle_s=0.1):
            time.sleep(5)
        assert first.lost and "second" in first.lost
    finally:
        first.release()


def test_a_lease_of_a_process_of_this_host_that_ended_is_stale(tmp_path):
    import socket
    import subprocess
    import sys

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    run = RunDir(str(tmp_path))
    run.write_json({"holder": "x", "host": socket.gethostname(), "pid": int(ended.stdout),
                    "command": "killed", "heartbeat_at": time.time()}, "lease.json")
    with RunLease(run, "restarted driver"):
        assert run.read_json("lease.json")["pid"] == os.getpid()


def test_a_model_on_object_storage_is_downloaded_once_for_transformers(tiny_model, s3_bucket,
                                                                      tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("RAY_ALIGN_CACHE", str(tmp_path / "cache"))
    uri = f"{s3_bucket}/models/tiny"
    RunDir(uri).upload_dir(tiny_model)
    tokenizer_dir = local_model_path(uri, tokenizer_only=True)
    assert not any(name.endswith(".safetensors") for name in os.listdir(tokenizer_dir))
    assert AutoTokenizer.from_pretrained(tokenizer_dir)("hello")["input_ids"]
    full = local_model_path(uri)
    assert any(name.endswith(".safetensors") for name in os.listdir(full))
    assert local_model_path(uri) == full  # cached
    RunDir(uri).write_bytes(b"{}", "extra_config.json")  # the model changed at the same URI
    assert local_model_path(uri) != full


def test_run_on_a_busy_run_directory_is_refused_in_one_line(run_uri, capsys):
    from ray_align.cli import main

    holder = RunLease(RunDir(run_uri), "ray-align run other.yaml", settle_s=0.1)
    holder.acquire()  # a live driver of this machine (this test's process)
    try:
        for command in (["run", str(QUICKSTART)], ["compare", str(QUICKSTART)],
                        ["stage", "induce", str(QUICKSTART)]):
            assert main([*command, "--run-dir", run_uri]) == 2
            lines = capsys.readouterr().err.strip().splitlines()
            assert len(lines) == 1 and "Traceback" not in lines[0]
            assert f"{run_uri} is in use by ray-align run other.yaml (pid {os.getpid()}" in lines[0]
            assert "--force" in lines[0]
    finally:
        holder.release()
    assert not RunDir(run_uri).exists("induce")  # nothing ran


def test_a_driver_started_with_sigint_ignored_still_stops_when_its_lease_is_taken(tmp_path):
    """A background job of a non-interactive shell starts with SIGINT ignored, where
    ``interrupt_main`` does nothing: the lease puts Python's handler back while it is held."""
    import signal

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        run = RunDir(str(tmp_path))
        first = RunLease(run, "first", heartbeat_s=0.2, settle_s=0.1)
        first.acquire()
        try:
            with pytest.raises(KeyboardInterrupt), RunLease(run, "second", force=True, settle_s=0.1):
                time.sleep(5)
        finally:
            first.release()
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN  # as it was
    finally:
        signal.signal(signal.SIGINT, before)
