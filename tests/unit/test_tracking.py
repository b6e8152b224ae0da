"""Experiment tracking with the real libraries: a tiny DeepSpeed loop (no Ray) logs every optimizer
step, read back with TensorBoard's own reader, from a local MLflow file store and as W&B offline
run files; a completed stage logs its manifest once; event files reach an object store (a real S3
API on loopback) at upload points; a resumed training replaces the steps after its checkpoint;
every optimizer step reaches Ray Train; and the ``tracking`` section names its bad values."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from ray_align.config import ConfigError, TrainConfig, load_config
from ray_align.pipeline import Context, Stage, StageOutput, manifest, run_stage
from ray_align.storage import RunDir
from ray_align.tracking import FOLDER, TrackerSpec, TrackingError, track_stage, tracker_spec, training_scalars
from tests.unit.test_config import QUICKSTART


def scalars(run: RunDir, *folder: str, scratch: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard reads from a folder of the run directory, by tag: (step, value)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    local = run.path(*folder)
    if not run.is_local:  # read what the object store holds, not what the writer kept locally
        local = str(scratch / "downloaded" / "/".join(folder))
        run.download_dir(*folder, to=local)
    events = EventAccumulator(local)
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch) -> Path:
    """W&B in offline mode, its files under tmp_path; its service process stopped afterwards."""
    folder = tmp_path / "wandb"
    folder.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(folder))
    yield folder
    import wandb

    wandb.teardown()


def test_a_tiny_training_loop_logs_every_step_to_tensorboard_mlflow_and_wandb(
        tiny_model, tmp_path, single_process_group, monkeypatch, wandb_offline):
    from mlflow import MlflowClient
    from transformers import AutoTokenizer

    from ray_align.tokenization import encode_sample, pad_token_id
    from ray_align.training.core import (
        StepMeter,
        collate,
        deepspeed_engine,
        eval_loss,
        load_model,
        real_tokens,
        train_step,
    )

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks a file store to opt in
    config = load_config(QUICKSTART, [
        f"run_dir={tmp_path / 'run'}", f"model.path={tiny_model}", "tracking.run_name=tiny",
        f"tracking.mlflow={{tracking_uri: {tmp_path / 'mlruns'}}}", "tracking.wandb={mode: offline}"])
    run = RunDir(config.run_dir)
    spec = tracker_spec(config, run, "train", "attempt1")

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    samples = [encode_sample(tokenizer, [{"role": "user", "content": q}], a)
               for q, a in [("Capital of France?", "Paris."), ("Two plus two?", "Four.")]]
    batch = collate(samples, pad_token_id(tokenizer))
    train = TrainConfig(zero_stage=2, precision="fp32", micro_batch_size=2, grad_accum=2, lr=1e-2)
    engine = deepspeed_engine(load_model(str(tiny_model)), train, world_size=1)
    meter, losses = StepMeter(), []
    with spec.open(resume_step=1) as tracker:  # what rank 0 of the Ray Train workers does
        for micro in range(4 * train.grad_accum):
            meter.add(train_step(engine, batch), real_tokens(batch))
            if (micro + 1) % train.grad_accum == 0:
                step = meter.finish(engine)
                losses.append(step["loss"])
                tracker.log(training_scalars(step), engine.global_steps)
        val_loss, _ = eval_loss(engine, [batch], engine.device)
        tracker.log(training_scalars({"val_loss": val_loss}), engine.global_steps)
    # then the driver, once the stage is complete: the same stage attempt, the same runs
    track_stage(config, run, {"stage": "train", "attempt": "attempt1", "rows": 2, "seconds": 1.5,
                              "metrics": {"loss": losses[-1], "global_step": 4, "note": "text"}})

    tb = scalars(run, FOLDER, "train", "attempt1", scratch=tmp_path)
    assert [step for step, _ in tb["train/loss"]] == [1, 2, 3, 4]
    assert [value for _, value in tb["train/loss"]] == pytest.approx(losses, rel=1e-6)
    assert losses[-1] < losses[0]  # the repeated batch is learned
    assert [value for _, value in tb["train/lr"]] == pytest.approx([1e-2] * 4)
    assert all(value > 0 for _, value in tb["train/grad_norm"] + tb["train/tokens_per_s"])
    assert tb["val/loss"] == [(4, pytest.approx(val_loss, rel=1e-6))]
    assert tb["stage/rows"] == [(0, 2.0)] and tb["stage/global_step"] == [(0, 4.0)]
    assert "stage/note" not in tb  # text is no scalar

    client = MlflowClient(config.tracking.mlflow.tracking_uri)
    experiment = client.get_experiment_by_name("ray_align")
    [found] = client.search_runs([experiment.experiment_id])  # the driver joined the workers' run
    assert found.info.run_name == "tiny/train" and found.info.status == "FINISHED"
    history = client.get_metric_history(found.info.run_id, "train/loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert [m.value for m in history] == pytest.approx(losses)
    assert found.data.metrics["stage/rows"] == 2 and found.data.metrics["val/loss"] == pytest.approx(val_loss)
    assert found.data.params["model.path"] == str(tiny_model)  # the run's config as parameters
    assert json.loads(found.data.params["train.lr"]) == config.train.lr
    assert found.data.tags["ray_align.stage"] == "train" and found.data.tags["ray_align.run_dir"] == run.uri

    offline = sorted((wandb_offline / "wandb").glob(f"offline-run-*-{spec.key}"))
    assert len(offline) == 2  # the training process's and the driver's, under one W&B run id
    assert all((folder / f"run-{spec.key}.wandb").stat().st_size > 0 for folder in offline)


def test_a_resumed_training_replaces_the_steps_logged_after_its_checkpoint(tmp_path):
    spec = TrackerSpec({"tensorboard": True}, str(tmp_path / "run"), "train", "a1")
    with spec.open(resume_step=1) as tracker:  # checkpoint at step 3, then a crash after step 5
        for step in range(1, 6):
            tracker.log({"train/loss": 10.0 + step}, step)
    time.sleep(1.1)  # event files are named (and read) by the second they were opened in
    with spec.open(resume_step=4) as tracker:  # the restarted worker, from the checkpoint
        for step in range(4, 7):
            tracker.log({"train/loss": 20.0 + step}, step)
    run = RunDir(spec.run_dir)
    assert scalars(run, FOLDER, "train", "a1", scratch=tmp_path)["train/loss"] == [
        (1, 11.0), (2, 12.0), (3, 13.0), (4, 24.0), (5, 25.0), (6, 26.0)]


def test_on_an_object_store_a_crash_loses_only_what_came_after_the_last_upload(s3_bucket, tmp_path):
    run = RunDir(s3_bucket + "/run")
    tracker = TrackerSpec({"tensorboard": True}, run.uri, "train", "a1").open()
    tracker.log({"train/loss": 1.0}, 1)
    tracker.upload()  # a checkpoint or validation
    tracker.log({"train/loss": 2.0}, 2)  # the process dies here
    assert scalars(run, FOLDER, "train", "a1", scratch=tmp_path / "crash")["train/loss"] == [(1, 1.0)]
    tracker.log({"train/loss": 3.0}, 3)
    tracker.close()
    assert scalars(run, FOLDER, "train", "a1", scratch=tmp_path / "end")["train/loss"] == [
        (1, 1.0), (2, 2.0), (3, 3.0)]
    assert all(name.startswith("events.out.tfevents.") for name in run.walk(FOLDER, "train", "a1"))


@pytest.fixture(params=["local", "s3"])
def run_uri(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "run")
    return request.getfixturevalue("s3_bucket") + "/run"


def test_a_completed_stage_logs_its_manifest_metrics_once(run_uri, tmp_path):
    def induce(ctx: Context) -> StageOutput:
        ctx.run.write_table(pa.table({"x": [1, 2, 3]}), "induce", "data.parquet")
        return StageOutput(3, "data.parquet", {"tokens_per_s": 12.5, "engine_s": 2.0,
                                               "engine_pools": 1, "steady_tokens_per_s": None})

    stage = Stage("induce", ("model", "engine", "induce"), (), induce)
    ctx = Context(config=load_config(QUICKSTART, [f"run_dir={run_uri}"]), run=RunDir(run_uri))
    attempt = run_stage(ctx, stage)["attempt"]
    tb = scalars(ctx.run, FOLDER, "induce", attempt, scratch=tmp_path)
    assert tb["stage/rows"] == [(0, 3.0)] and tb["stage/tokens_per_s"] == [(0, 12.5)]
    assert tb["stage/engine_s"] == [(0, 2.0)] and tb["stage/engine_pools"] == [(0, 1.0)]
    assert tb["stage/seconds"][0][1] >= 0 and "stage/steady_tokens_per_s" not in tb
    files = ctx.run.walk(FOLDER)
    run_stage(ctx, stage)  # complete: skipped, nothing logged again
    assert ctx.run.walk(FOLDER) == files
    assert manifest(ctx.run, "induce")["metrics"]["tokens_per_s"] == 12.5


def test_a_tracker_that_cannot_start_stops_training_but_never_a_finished_stage(tmp_path, monkeypatch,
                                                                                 capsys):
    from ray_align.bench.common import free_port

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    config = load_config(QUICKSTART, [
        f"run_dir={tmp_path / 'run'}", f"tracking.mlflow={{tracking_uri: 'http://127.0.0.1:{free_port()}'}}"])
    run = RunDir(config.run_dir)
    with pytest.raises(TrackingError, match=r"train: tracking\.mlflow cannot start"):
        tracker_spec(config, run, "train", "a1").open()  # rank 0, before the first step

    track_stage(config, run, {"stage": "induce", "attempt": "a2", "rows": 4, "seconds": 1.0,
                              "metrics": {}})
    assert "[induce] tracking.mlflow cannot start" in capsys.readouterr().out
    assert scalars(run, FOLDER, "induce", "a2", scratch=tmp_path)["stage/rows"] == [(0, 4.0)]

    monkeypatch.setitem(sys.modules, "wandb", None)  # a worker without the tracking extra
    spec = TrackerSpec({"tensorboard": False, "wandb": {"project": "p", "entity": None,
                                                        "mode": "offline", "dir": None}},
                       str(tmp_path / "run"), "train", "a3")
    with pytest.raises(TrackingError, match=re.escape("pip install 'ray_align[tracking]'")):
        spec.open()


def test_every_optimizer_step_reaches_ray_train_with_a_checkpoint_only_when_due(monkeypatch):
    from tests.unit.test_training_loop import TRAIN, run_loop

    train = TRAIN.model_copy(update={"checkpoint_every_steps": 2})
    events, engine = run_loop(monkeypatch, train, rows=10)
    steps = [(e[0], e[1] if e[0] == "report" else e[2]) for e in events
             if e[0] in ("report", "save") and "step_tokens_per_s" in (e[1] if e[0] == "report" else e[2])]
    assert [metrics["global_step"] for _, metrics in steps] == list(range(1, engine.global_steps + 1))
    assert {metrics["global_step"] for kind, metrics in steps if kind == "save"} >= {2, 4, 6}
    assert all({"loss", "lr", "grad_norm", "epoch"} <= set(metrics) for _, metrics in steps)


def test_ray_train_takes_reports_every_tenth_of_a_second_during_fit_unless_set(monkeypatch):
    """A report waits until Ray Train's controller has taken the one before it: polled every
    2 s by default, that would hold training to a step per 2 s."""
    from ray.train.v2._internal.constants import get_env_vars_to_propagate

    from ray_align.stages.train import POLL_ENV, REPORT_POLL_S, reports_taken_every

    monkeypatch.delenv(POLL_ENV, raising=False)
    with reports_taken_every(REPORT_POLL_S):
        assert get_env_vars_to_propagate()[POLL_ENV] == "0.1"  # what the controller is started with
    assert POLL_ENV not in os.environ
    monkeypatch.setenv(POLL_ENV, "1.5")
    with reports_taken_every(REPORT_POLL_S):
        assert get_env_vars_to_propagate()[POLL_ENV] == "1.5"
    assert os.environ[POLL_ENV] == "1.5"


def test_the_tracking_section_is_strict_and_names_bad_values(tmp_path, monkeypatch, capsys):
    from ray_align.cli import main
    from ray_align.stages import STAGES

    plain = load_config(QUICKSTART)
    assert plain.tracking.tensorboard and plain.tracking.mlflow is None and plain.tracking.wandb is None
    bad = [("tracking.wandb={mode: sometimes}", "tracking.wandb.mode: Input should be 'online' or 'offline'"),
           ("tracking.mlflow={experiment: x}", "tracking.mlflow.tracking_uri: Field required"),
           ("tracking.wandb={api_key: abc}", "tracking.wandb.api_key: unknown key"),
           ("tracking.tensorboard=maybe", "tracking.tensorboard: Input should be a valid boolean"),
           ("tracking.run_name=''", "tracking.run_name: String should have at least 1 character")]
    for override, named in bad:
        with pytest.raises(ConfigError, match=re.escape(named)):
            load_config(QUICKSTART, [override])
    with pytest.raises(ConfigError) as info:  # credentials belong in the environment
        load_config(QUICKSTART, ["tracking.mlflow={tracking_uri: 'https://me:s3cret@mlflow.example'}"])
    assert "tracking.mlflow.tracking_uri" in str(info.value) and "MLFLOW_TRACKING_PASSWORD" in str(info.value)
    assert "s3cret" not in str(info.value)

    monkeypatch.chdir(tmp_path)
    config = load_config(QUICKSTART, ["tracking.mlflow={tracking_uri: mlruns}",
                                      "tracking.wandb={dir: wb, mode: offline}"])
    assert config.tracking.mlflow.tracking_uri == (tmp_path / "mlruns").resolve().as_uri()
    assert config.tracking.wandb.dir == str((tmp_path / "wb").resolve())  # workers log there too
    assert all(config.section_hash(*stage.sections) == plain.section_hash(*stage.sections)
               for stage in STAGES.values())  # tracking redoes no stage

    import ray_align.config as config_module

    real = config_module.find_spec
    monkeypatch.setattr(config_module, "find_spec", lambda name: None if name == "wandb" else real(name))
    with pytest.raises(ConfigError, match=re.escape(
            "tracking.wandb: Value error, the wandb package is not installed: "
            "pip install 'ray_align[tracking]'")):
        load_config(QUICKSTART, ["tracking.wandb={mode: offline}"])
    monkeypatch.undo()

    assert main(["check", str(QUICKSTART), "tracking.run_name=first"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["tracking"] == {"tensorboard": True, "run_name": "first", "mlflow": None, "wandb": None}
