"""Experiment tracking: TensorBoard event files in every run directory, MLflow and Weights &
Biases when the config's ``tracking`` section names them.

One small interface serves the pipeline and training alike: ``TrackerSpec.open()`` gives a
``Tracker``; ``log(scalars, step)`` (rank 0 of training: every optimizer step),
``log_stage(metrics)`` (a stage's manifest metrics, once, when it completes), ``upload()`` and
``close()``. What a stage logs lands in one place per stage attempt:

* TensorBoard: ``RUN/tensorboard/<stage>/<attempt>/events.out.tfevents.*`` (``tensorboard
  --logdir RUN``). On a local run directory the files are written in place; on ``s3://`` or
  ``gs://`` they are written to a local folder and copied up file by file at ``upload()`` (training:
  at every checkpoint and validation, and at least every ``UPLOAD_EVERY_S``) and at ``close()``,
  so a crash loses at most what came after the last upload. A resumed training run marks its
  restart, so TensorBoard drops the steps the crashed attempt took after its checkpoint.
* MLflow: a run named ``RUN_NAME/STAGE`` in the configured experiment, tagged with the run
  directory, stage and attempt; the config as its parameters.
* W&B: a run of the same name in the group ``RUN_NAME``, the config as its config.

A stage's MLflow or W&B run is found again by a key of (run directory, stage, attempt): the
training workers' per-step scalars and the driver's stage metrics share one run, and a resumed
attempt continues it. A backend that cannot start stops training before its first step, but only
is reported at the end of a finished stage; one that fails while logging is reported and left
out. The manifests keep every stage's metrics regardless.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray_align.config import TRACKING_EXTRA, Config
from ray_align.storage import RunDir

FOLDER = "tensorboard"  # RUN/tensorboard/<stage>/<attempt>/
UPLOAD_EVERY_S = 300.0  # object stores: event files copied up at least this often while logging
MLFLOW_FLUSH_S = 10.0  # MLflow metrics are sent in batches, at least this often
MLFLOW_BATCH = 1000  # MLflow's most metrics per log_batch call
STEP = "global_step"  # W&B's x-axis for every scalar


class TrackingError(RuntimeError):
    """A configured tracker cannot start: not installed, unreachable, refused."""


@dataclass(frozen=True)
class TrackerSpec:
    """What any process needs to open a stage's tracker; plain data, so it travels to the Ray
    Train workers in the loop config."""

    settings: dict[str, Any]  # TrackingConfig, dumped
    run_dir: str
    stage: str
    attempt: str
    params: dict[str, Any] = field(default_factory=dict)  # the run's config

    @property
    def key(self) -> str:
        """The stage attempt's id in MLflow (a tag) and W&B (the run id)."""
        return hashlib.sha256(f"{self.run_dir}\0{self.stage}\0{self.attempt}".encode()).hexdigest()[:16]

    @property
    def group(self) -> str:
        return self.settings.get("run_name") or self.run_dir.rstrip("/").rsplit("/", 1)[-1]

    @property
    def name(self) -> str:
        return f"{self.group}/{self.stage}"

    def open(self, resume_step: int | None = None, strict: bool = True) -> Tracker:
        """Start every configured backend. ``strict``: one that cannot start is a TrackingError
        naming it (training: before any step is taken); else it is reported and left out (a
        stage that has finished). ``resume_step``: the first step this process logs after a
        restart (training), so TensorBoard forgets what the failed attempt logged from there on."""
        settings = self.settings  # validated where the spec was made; the extras may be absent here
        starts: list[tuple[str, Any]] = []
        if settings.get("tensorboard", True):
            starts.append(("tensorboard", lambda: _TensorBoard(
                RunDir(self.run_dir), (FOLDER, self.stage, self.attempt), resume_step)))
        if settings.get("mlflow"):
            starts.append(("mlflow", lambda: _Mlflow(settings["mlflow"], self)))
        if settings.get("wandb"):
            starts.append(("wandb", lambda: _Wandb(settings["wandb"], self)))
        tracker = Tracker(self.stage, [])
        for name, start in starts:
            try:
                tracker.backends.append(start())
            except Exception as exc:
                problem = f"tracking.{name} cannot start ({type(exc).__name__}: {exc})"
                if strict:
                    tracker.close(failed=True)
                    raise TrackingError(f"{self.stage}: {problem}") from exc
                print(f"[{self.stage}] {problem}: left out", flush=True)
            except BaseException:
                tracker.close(failed=True)
                raise
        return tracker


def tracker_spec(config: Config, run: RunDir, stage: str, attempt: str) -> TrackerSpec:
    return TrackerSpec(config.tracking.model_dump(mode="json"), run.uri, stage, attempt,
                       config.model_dump(mode="json"))


class Tracker:
    """Scalars at a step, a stage's metrics, uploads and the end, fanned out to the backends."""

    def __init__(self, stage: str, backends: list[Any]) -> None:
        self.stage = stage
        self.backends = backends  # _TensorBoard, _Mlflow, _Wandb: log, upload, close

    def log(self, scalars: dict[str, Any], step: int) -> None:
        """Numbers only (None and text are left out), at an integer step."""
        values = {k: float(v) for k, v in scalars.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if values:
            self._each("log", values, int(step))

    def log_stage(self, metrics: dict[str, Any], step: int = 0) -> None:
        """A stage's metrics (nested ones flattened with dots) as ``stage/NAME`` scalars."""
        from ray_align.pipeline import _flat

        self.log({f"stage/{k}": v for k, v in _flat(metrics).items()}, step)

    def upload(self) -> None:
        """Make what was logged so far safe: event files copied to the run directory, MLflow's
        batch sent."""
        self._each("upload")

    def close(self, failed: bool = False) -> None:
        for backend in self.backends:
            self._call(backend, "close", failed)
        self.backends = []

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, kind: type | None, *rest: object) -> None:
        self.close(failed=kind is not None)

    def _each(self, method: str, *args: Any) -> None:
        for backend in list(self.backends):
            if not self._call(backend, method, *args):
                self.backends.remove(backend)
                with contextlib.suppress(Exception):
                    backend.close(failed=True)

    def _call(self, backend: Any, method: str, *args: Any) -> bool:
        try:
            getattr(backend, method)(*args)
            return True
        except Exception as exc:  # noqa: BLE001 - metrics must never stop training or a stage
            print(f"[{self.stage}] tracking: {backend.NAME} failed and is left out from here on "
                  f"({type(exc).__name__}: {exc})", flush=True)
            return False


TRAINING_SCALARS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
                    "step_tokens_per_s": "train/tokens_per_s", "val_loss": "val/loss"}


def training_scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    """The scalars a training step (or validation) logs, by their tracker names."""
    return {TRAINING_SCALARS[k]: v for k, v in metrics.items() if k in TRAINING_SCALARS}


def track_stage(config: Config, run: RunDir, record: dict[str, Any]) -> None:
    """Log a completed stage's manifest (rows, seconds, metrics) once to every tracker. The
    stage is finished by then: a tracker that fails is reported, never raised."""
    stage = record["stage"]
    try:
        with tracker_spec(config, run, stage, record["attempt"]).open(strict=False) as tracker:
            tracker.log_stage({"rows": record.get("rows"), "seconds": record.get("seconds"),
                               **(record.get("metrics") or {})})
    except Exception as exc:  # noqa: BLE001 - the stage's output and manifest are complete
        print(f"[{stage}] tracking: {type(exc).__name__}: {exc}", flush=True)


def _require(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise TrackingError(f"{module} is not installed in this process: {TRACKING_EXTRA}") from exc


class _TensorBoard:
    NAME = "tensorboard"

    def __init__(self, run: RunDir, folder: tuple[str, ...], resume_step: int | None) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._event, self._summary = event_pb2.Event, summary_pb2.Summary
        self._run, self._folder = run, folder
        self._local = run.path(*folder) if run.is_local else tempfile.mkdtemp(prefix="ray_align-tb-")
        self._writer = EventFileWriter(self._local)
        self._uploaded = time.monotonic()
        if resume_step is not None:  # TensorBoard drops what this folder holds from that step on
            self._writer.add_event(event_pb2.Event(
                wall_time=time.time(), step=resume_step,
                session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
        self.upload()

    def log(self, values: dict[str, float], step: int) -> None:
        summary = self._summary(value=[self._summary.Value(tag=k, simple_value=v)
                                       for k, v in values.items()])
        self._writer.add_event(self._event(wall_time=time.time(), step=step, summary=summary))
        self._writer.flush()  # on disk now: a local run directory shows it at once
        if time.monotonic() - self._uploaded > UPLOAD_EVERY_S:
            self.upload()

    def upload(self) -> None:
        self._writer.flush()
        self._copy()

    def close(self, failed: bool = False) -> None:
        self._writer.close()
        self._copy()
        if not self._run.is_local:
            shutil.rmtree(self._local, ignore_errors=True)

    def _copy(self) -> None:
        """Object stores: each event file copied whole (it only grows; no folder renames)."""
        self._uploaded = time.monotonic()
        if self._run.is_local:
            return
        for name in sorted(os.listdir(self._local)):
            self._run.write_bytes(Path(self._local, name).read_bytes(), *self._folder, name)


_MLFLOW_NAME = re.compile(r"[^\w\-. /]")  # what MLflow accepts in metric and parameter names


class _Mlflow:
    NAME = "mlflow"

    def __init__(self, settings: dict[str, Any], spec: TrackerSpec) -> None:
        _require("mlflow")
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self._client = client = MlflowClient(tracking_uri=settings["tracking_uri"])
        experiment = client.get_experiment_by_name(settings["experiment"])
        experiment_id = (experiment.experiment_id if experiment is not None
                         else client.create_experiment(settings["experiment"]))
        found = client.search_runs([experiment_id], f"tags.ray_align_key = '{spec.key}'", max_results=1)
        if found:  # the training workers' run, or an interrupted attempt's: continue it
            self._id = found[0].info.run_id
            client.update_run(self._id, status="RUNNING")
        else:
            self._id = client.create_run(experiment_id, run_name=spec.name, tags={
                "ray_align_key": spec.key, "ray_align.run_dir": spec.run_dir,
                "ray_align.stage": spec.stage, "ray_align.attempt": spec.attempt}).info.run_id
            from ray_align.pipeline import _flat

            params = [Param(_MLFLOW_NAME.sub("_", k), _text(v)[:6000])
                      for k, v in _flat(spec.params).items()]
            for start in range(0, len(params), 100):  # MLflow's most parameters per call
                client.log_batch(self._id, params=params[start : start + 100])
        self._pending: list[Any] = []
        self._sent = time.monotonic()

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self._pending += [Metric(_MLFLOW_NAME.sub("_", k), v, stamp, step) for k, v in values.items()]
        if len(self._pending) >= MLFLOW_BATCH or time.monotonic() - self._sent > MLFLOW_FLUSH_S:
            self.upload()

    def upload(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[:MLFLOW_BATCH], self._pending[MLFLOW_BATCH:]
            self._client.log_batch(self._id, metrics=batch)
        self._sent = time.monotonic()

    def close(self, failed: bool = False) -> None:
        self.upload()
        self._client.set_terminated(self._id, status="FAILED" if failed else "FINISHED")


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


class _Wandb:
    NAME = "wandb"

    def __init__(self, settings: dict[str, Any], spec: TrackerSpec) -> None:
        wandb = _require("wandb")
        self._run = wandb.init(
            project=settings["project"], entity=settings["entity"], dir=settings["dir"],
            mode=settings["mode"], id=spec.key, resume="allow", name=spec.name, group=spec.group,
            job_type=spec.stage, config=spec.params, allow_val_change=True, reinit="create_new",
            # W&B leaves this process's output alone (it would wrap stdout) and says little
            settings=wandb.Settings(console="off", quiet=True))
        self._run.define_metric(STEP)
        self._run.define_metric("*", step_metric=STEP)  # resumed steps may repeat: not W&B's _step

    def log(self, values: dict[str, float], step: int) -> None:
        self._run.log({**values, STEP: step})

    def upload(self) -> None:
        """W&B sends in the background."""

    def close(self, failed: bool = False) -> None:
        self._run.finish(exit_code=1 if failed else 0)
