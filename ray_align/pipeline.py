"""Stages, manifests and resume: ``induce -> analyze -> build -> train -> evaluate``.

Each stage writes under ``RUN/<stage>/`` and finishes by writing ``manifest.json`` last. A rerun
skips a stage whose manifest is complete for the same config and the same inputs, resumes one
that was interrupted, and redoes one whose config or inputs changed.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from ray_align import console, prompts
from ray_align.config import Config, EngineConfig, RayConfig, identity_hash
from ray_align.engine_pool import SharedEngines
from ray_align.storage import RunDir

HARMFUL_CONTENT_NOTE = (
    "This run directory holds model outputs generated on purpose to be harmful (guided mistake "
    "induction) and prompts from red-team datasets. Columns and files holding such text are "
    "labelled 'contains_harmful_text' in their Parquet metadata. Handle and share accordingly.\n"
)


@dataclass
class StageOutput:
    """What a stage reports: its row count, the file or folder to fingerprint, and metrics."""

    rows: int
    output: str
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class Stage:
    name: str
    sections: tuple[str, ...]  # config sections whose output-defining part is the stage's identity
    inputs: tuple[str, ...]  # upstream stages whose output it reads
    compute: Callable[[Context], StageOutput]  # the step itself
    scratch: tuple[str, ...] = ()  # folders of work in progress (parts, checkpoints), not output


@dataclass
class Context:
    """What the stages of one driver run share: the config, the run directory, Ray, and the
    engine pools that outlive a stage (``engine.share_across_stages``). Use it in a ``with``
    block: the pools are shut down when it ends, on success, error or Ctrl-C."""

    config: Config
    run: RunDir
    _ray_ready: bool = False
    engines: SharedEngines | None = None

    def __post_init__(self) -> None:
        if self.engines is None and self.config.engine.shared_pools:
            self.engines = SharedEngines()

    def __enter__(self) -> Context:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def engines_for(self, engine: EngineConfig) -> SharedEngines | None:
        """The shared pools a generation on ``engine`` uses: none when that engine (a judge's or
        critic's override) does not share, after releasing the held pool, whose GPUs its own
        engines are about to need."""
        if self.engines is not None and not engine.shared_pools:
            self.engines.release()
            return None
        return self.engines

    def release_engines(self, for_training: bool = False) -> None:
        """Free the shared pools' CPUs and GPUs (kept during training when the config says so)."""
        if self.engines is not None and not (for_training and self.config.engine.keep_during_training):
            self.engines.release()

    def close(self) -> None:
        """Shut the shared pools down; the first error of the run matters more than this one's."""
        if self.engines is not None and self._ray_ready:
            try:
                self.engines.close()
            except Exception as exc:  # noqa: BLE001 - reported, never hides the run's own error
                print(f"[engines] could not shut the shared engine pools down: {exc}", flush=True)

    def ensure_ray(self) -> None:
        """Start or join Ray once, the first time a stage needs it."""
        if self._ray_ready:
            return
        import ray

        console.quiet()  # before ray.init's own lines
        init_ray(self.config.ray)
        console.quiet()  # Ray and Ray Data add their loggers' terminal handlers as they start
        check_shared_storage(self.run, self.config.ray.shared_run_dir, ray.nodes())
        self._ray_ready = True


def init_ray(settings: RayConfig) -> None:
    """Join the configured cluster (or a submitted job's), else start a local one; quiet Ray Data."""
    import ray
    from ray.data import DataContext

    # No address: join the cluster of a submitted Ray job (RAY_ADDRESS), else start a new
    # local one rather than attach to whatever Ray happens to run on this machine.
    address = settings.address or (None if os.environ.get("RAY_ADDRESS") else "local")
    ray.init(address=address, num_cpus=settings.num_cpus if address == "local" else None,
             include_dashboard=False, ignore_reinit_error=True, log_to_driver=settings.log_to_driver)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.issue_detectors_config.detectors = []  # memory hints flood the output on small machines


class StageError(RuntimeError):
    """A stage cannot run (missing upstream output) or failed; the message says what to do."""


def check_shared_storage(run: RunDir, shared: bool, nodes: list[dict]) -> None:
    """On a multi-node cluster every node writes to the run directory: a node-local path would
    scatter the outputs, so it is refused unless the config says the path is a shared mount."""
    alive = [n for n in nodes if n.get("Alive")]
    if run.is_local and not shared and len(alive) > 1:
        raise StageError(
            f"run_dir {run.uri} is a local path but the Ray cluster has {len(alive)} nodes: use "
            "s3://... or gs://... (or a shared mount and set ray.shared_run_dir: true)")


def manifest(run: RunDir, *stage: str) -> dict[str, Any] | None:
    return run.read_json(*stage, "manifest.json") if run.exists(*stage, "manifest.json") else None


def _expected_inputs(run: RunDir, stage: Stage) -> dict[str, str]:
    found = {}
    for upstream in stage.inputs:
        m = manifest(run, upstream)
        if not m or m.get("status") != "complete":
            raise StageError(f"stage {stage.name!r} needs stage {upstream!r} to be complete first "
                             f"(run `ray-align stage {upstream} ...` or `ray-align run`)")
        found[upstream] = m["fingerprint"]
    return found


def check_output_intact(run: RunDir, name: str, record: dict[str, Any]) -> None:
    """A finished stage's output is reused only as written: a file must still hash the same
    (a folder, such as a large model on cloud storage, must still exist)."""
    output = record.get("output", "")
    where = run.uri_of(name, output)
    if not run.exists(name, output):
        raise StageError(f"{where} is gone since stage {name!r} finished; delete "
                         f"{run.uri_of(name)} to redo the stage")
    if output.endswith(".parquet") and run.fingerprint(name, output) != record.get("fingerprint"):
        raise StageError(f"{where} changed or was corrupted since stage {name!r} finished; "
                         f"delete {run.uri_of(name)} to redo the stage")


PREVIOUS = ".previous"  # RUN/.previous/<stage>/<config hash>/: output set aside on a redo


def _matches(record: dict[str, Any] | None, hashes: tuple[str, str], inputs: dict[str, str]) -> bool:
    return bool(record) and record.get("config_hash") in hashes and record.get("inputs") == inputs


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else key))
    return out


def what_changed(record: dict[str, Any], identity: dict[str, Any], inputs: dict[str, str]) -> str:
    """Which settings or inputs differ from a finished attempt's, in a few words."""
    changed = [f"input {name!r}" for name in sorted(set(inputs) | set(record.get("inputs") or {}))
               if inputs.get(name) != (record.get("inputs") or {}).get(name)]
    if "identity" in record:
        old, new = _flat(record["identity"]), _flat(identity)
        changed += [f"{key} ({str(old.get(key))[:40]} -> {str(new.get(key))[:40]})"
                    for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]
    else:
        changed = changed or ["its settings"]
    return ", ".join(changed[:4]) + (" and more" if len(changed) > 4 else "")


def _set_aside(run: RunDir, stage: Stage, record: dict[str, Any]) -> None:
    """Move an attempt with other settings to ``RUN/.previous/<stage>/<hash>/`` file by file.
    A finished one leaves its scratch (generation parts, training checkpoints) behind; an
    unfinished one keeps it, so going back to its settings resumes it."""
    if record.get("status") == "complete":
        for folder in stage.scratch:
            run.delete(stage.name, folder)
    aside = (PREVIOUS, stage.name, record.get("config_hash") or "unknown")
    run.delete(*aside)
    run.move_files((stage.name,), aside)


def _restore_if_kept(run: RunDir, stage: Stage, hashes: tuple[str, str],
                     inputs: dict[str, str]) -> dict[str, Any] | None:
    """Bring back an attempt set aside earlier with exactly these settings and inputs."""
    for config_hash in dict.fromkeys(hashes):
        kept = manifest(run, PREVIOUS, stage.name, config_hash)
        if _matches(kept, hashes, inputs):
            run.move_files((PREVIOUS, stage.name, config_hash), (stage.name,))
            print(f"[{stage.name}] restored the {kept.get('status')} attempt of an earlier run with "
                  f"these settings from {run.uri_of(PREVIOUS, stage.name)}", flush=True)
            return kept
    return None


def run_stage(ctx: Context, stage: Stage) -> dict[str, Any]:
    """Run one stage with skip / resume / redo semantics; return its manifest.

    A stage is what it computes: its identity is the part of its config sections that defines
    the output (execution settings left out) and its inputs' fingerprints. A redo never deletes
    the previous attempt first: it is set aside until the new one is complete.
    """
    run = ctx.run
    identity = ctx.config.stage_identity(*stage.sections)
    hashes = (identity_hash(identity), ctx.config.legacy_section_hash(*stage.sections))
    inputs = _expected_inputs(run, stage)
    previous = manifest(run, stage.name)
    if previous and not _matches(previous, hashes, inputs):
        where = run.uri_of(PREVIOUS, stage.name)
        if previous.get("status") == "complete":
            print(f"[{stage.name}] {what_changed(previous, identity, inputs)} changed since the last "
                  f"run: redoing it; the finished output is kept in {where} until the new one is "
                  "complete", flush=True)
        else:
            print(f"[{stage.name}] the unfinished attempt had other settings: set aside in {where}",
                  flush=True)
        _set_aside(run, stage, previous)
        previous = None
    if previous is None:
        previous = _restore_if_kept(run, stage, hashes, inputs)
    if previous and previous.get("status") == "complete":
        check_output_intact(run, stage.name, previous)
        print(f"[{stage.name}] complete in an earlier run: skipped", flush=True)
        return previous
    if previous:
        print(f"[{stage.name}] resuming an interrupted run", flush=True)
    if not run.exists("README.txt"):
        run.write_bytes(HARMFUL_CONTENT_NOTE.encode(), "README.txt")
    spent = float(previous.get("seconds", 0)) if previous else 0.0  # the interrupted attempts
    attempt = (previous or {}).get("attempt") or uuid.uuid4().hex[:12]
    record = {"stage": stage.name, "status": "running", "config_hash": hashes[0],
              "identity": identity, "inputs": inputs, "templates": prompts.TEMPLATES,
              "seconds": spent, "attempt": attempt,
              "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    run.write_json(record, stage.name, "manifest.json")
    started = time.perf_counter()
    try:
        result = stage.compute(ctx)
    except BaseException as exc:
        record.update(status="failed", error=f"{type(exc).__name__}: {exc}"[:2000],
                      seconds=spent + time.perf_counter() - started)
        with contextlib.suppress(Exception):  # the original error matters more (a full disk)
            run.write_json(record, stage.name, "manifest.json")
        raise
    record.update(status="complete", rows=result.rows, output=result.output,
                  fingerprint=run.fingerprint(stage.name, result.output, salt=attempt),
                  metrics=result.metrics, seconds=round(spent + time.perf_counter() - started, 2),
                  finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    run.write_json(record, stage.name, "manifest.json")  # the marker: the output is now finished
    run.delete(PREVIOUS, stage.name)  # attempts with other settings are no longer needed
    from ray_align.tracking import track_stage  # imports this module

    track_stage(ctx.config, run, record)  # once: TensorBoard, MLflow, W&B
    print(f"[{stage.name}] done: {result.rows} rows in {record['seconds']:.1f} s", flush=True)
    return record


def with_harm_label(table: pa.Table, harmful: bool) -> pa.Table:
    """Mark a table's Parquet metadata as holding (or not) harmful text."""
    meta = dict(table.schema.metadata or {})
    meta[b"contains_harmful_text"] = b"true" if harmful else b"false"
    return table.replace_schema_metadata(meta)


def write_quarantine(run: RunDir, stage: str, rows: list[dict[str, Any]]) -> int:
    """Set bad rows aside, with their reasons, next to the stage's output."""
    from ray_align.sources import QUARANTINE_SCHEMA

    if rows:
        run.write_table(pa.Table.from_pylist(rows, schema=QUARANTINE_SCHEMA), stage, "quarantine.parquet")
        print(f"[{stage}] {len(rows)} bad rows quarantined in {run.uri_of(stage, 'quarantine.parquet')}")
    return len(rows)


def write_run_summary(run: RunDir, stage_names: list[str]) -> dict[str, Any]:
    """``RUN/summary.json``: status, rows and seconds per stage, the model and the metrics."""
    summary: dict[str, Any] = {"run_dir": run.uri, "stages": {}}
    for name in stage_names:
        m = manifest(run, name) or {"status": "not started"}
        summary["stages"][name] = {k: m.get(k) for k in ("status", "rows", "seconds")}
        for key, value in (m.get("metrics") or {}).items():
            summary.setdefault("metrics", {})[f"{name}.{key}"] = value
    pools = [v for k, v in summary.get("metrics", {}).items() if k.endswith(".engine_pools")]
    if pools:  # what each engine start costs: see docs/performance.md
        summary["metrics"]["engine_pools"] = sum(pools)
    # the aligned model: the last round's (``rounds``), not a compared baseline's
    final = [name for name in stage_names if re.fullmatch(r"(round\d+/)?train", name)]
    if final and (manifest(run, final[-1]) or {}).get("status") == "complete":
        summary["model_dir"] = run.uri_of(final[-1], "model")
    if run.exists("evaluate", "report.md"):
        summary["report"] = run.uri_of("evaluate", "report.md")
    run.write_json(summary, "summary.json")
    return summary


HIGHLIGHTS = [
    ("generation tokens/s (induce)", "induce.tokens_per_s"),
    ("generation tokens/s (analyze)", "analyze.tokens_per_s"),
    ("generation tokens/s (evaluate)", "evaluate.tokens_per_s"),
    ("training tokens/s", "train.tokens_per_s"),
    ("training loss / validation loss", ("train.loss", "train.val_loss")),
    ("harmless rate (judge): base / aligned / aligned + reminder",
     ("evaluate.base.harmless_rate", "evaluate.aligned.harmless_rate",
      "evaluate.aligned+reminder.harmless_rate")),
    ("refusal rate (keyword): base / aligned / aligned + reminder",
     ("evaluate.base.refusal_rate", "evaluate.aligned.refusal_rate",
      "evaluate.aligned+reminder.refusal_rate")),
    ("over-refusal rate (safe prompts declined): base / aligned / aligned + reminder",
     ("evaluate.base.over_refusal_rate", "evaluate.aligned.over_refusal_rate",
      "evaluate.aligned+reminder.over_refusal_rate")),
    ("helpful answer rate: base -> aligned",
     ("evaluate.base.helpful_answer_rate", "evaluate.aligned.helpful_answer_rate")),
    ("judge", "evaluate.judge"),
    ("refusal detector accuracy (labelled refusals)", "evaluate.refusal_detector_accuracy"),
    ("engine pools started (this run's stages)", "engine_pools"),
]


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def format_summary(summary: dict[str, Any]) -> str:
    """The human-readable end-of-run table: stages, throughput, the before/after metrics."""
    width = max([10, *(len(name) + 2 for name in summary["stages"])])
    lines = ["", "ray_align run summary", f"  run dir: {summary['run_dir']}",
             f"  {'stage':<{width}}{'status':<14}{'rows':>8}{'seconds':>10}"]
    for name, s in summary["stages"].items():
        seconds = "" if s.get("seconds") is None else f"{s['seconds']:.1f}"
        rows = "" if s.get("rows") is None else s["rows"]
        lines.append(f"  {name:<{width}}{s.get('status') or '':<14}{rows:>8}{seconds:>10}")
    metrics = summary.get("metrics", {})
    for label, keys in HIGHLIGHTS:
        keys = keys if isinstance(keys, tuple) else (keys,)
        if all(metrics.get(k) is not None for k in keys):
            lines.append(f"  {label}: {' / '.join(_fmt(metrics[k]) for k in keys)}")
    rounds = sorted((k.split(".")[1] for k in metrics
                     if re.fullmatch(r"evaluate\.round\d+\.harmless_rate", k)),
                    key=lambda name: int(name.removeprefix("round")))  # round2 before round10
    if rounds:  # rounds > 1: what each round's model does, the last one being "aligned"
        rows = ["base", *rounds, "aligned"]
        lines.append("  by round, harmless rate (judge) / helpful answer rate: " + ", ".join(
            f"{row} {_fmt(metrics.get(f'evaluate.{row}.harmless_rate'))}/"
            f"{_fmt(metrics.get(f'evaluate.{row}.helpful_answer_rate'))}" for row in rows))
    for key in ("model_dir", "report"):
        if key in summary:
            lines.append(f"  {key}: {summary[key]}")
    return "\n".join(lines)
