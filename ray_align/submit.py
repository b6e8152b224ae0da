"""Submit the pipeline to a Ray cluster as a Ray job, follow it, and mirror its final status.

Secrets never travel in the config or the job's metadata: ``--env NAME`` copies the value of
``NAME`` from this machine's environment into the job's runtime environment.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from pathlib import Path

EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 3}
EXCLUDES = [".git", ".venv", "runs", "**/__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache"]


def client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265")


def runtime_env(env_names: list[str], pip: list[str], working_dir: Path) -> dict:
    """The job's runtime environment: this checkout as working dir, named env vars, extra pip."""
    missing = [name for name in env_names if name not in os.environ]
    if missing:
        raise ValueError(f"--env {', '.join(missing)}: not set in this environment")
    env = {"runtime_env": {"working_dir": str(working_dir), "excludes": EXCLUDES,
                           "env_vars": {name: os.environ[name] for name in env_names}}}
    if pip:
        env["runtime_env"]["pip"] = pip
    return env["runtime_env"]


def submit(config: str, overrides: list[str], *, address: str | None, run_dir: str | None,
           env_names: list[str], pip: list[str], wait: bool, working_dir: Path,
           script: str = "jobs/run_pipeline.py", options: tuple[str, ...] = ()) -> int:
    """Submit ``script`` (the pipeline, or ``jobs/run_compare.py``); print the job id; follow
    logs unless ``wait`` is False."""
    entrypoint = job_entrypoint(script, job_path(config, working_dir), overrides,
                                [*([f"--run-dir={run_dir}"] if run_dir else []), *options])
    jobs = client(address)
    job_id = jobs.submit_job(entrypoint=entrypoint,
                             runtime_env=runtime_env(env_names, pip, working_dir))
    print(f"submitted job {job_id}: {entrypoint}", flush=True)
    if not wait:
        print(f"follow it with: ray-align logs {job_id} --follow", flush=True)
        return 0
    return follow(jobs, job_id)


def job_entrypoint(script: str, config: str, overrides: list[str], options: list[str]) -> str:
    """The job's command line: the config and its overrides together, options after them (an
    override after an option would be refused by the job's argument parser)."""
    return f"python {script} " + " ".join(shlex.quote(a) for a in [config, *overrides, *options])


def job_path(config: str, working_dir: Path) -> str:
    """The config's path as the job sees it: relative to the uploaded working dir when inside it;
    a path outside it must exist at the same place on the cluster (a shared mount)."""
    path = Path(config).resolve()
    if path.is_relative_to(working_dir.resolve()):
        return str(path.relative_to(working_dir.resolve()))
    print(f"note: {config} is outside the uploaded directory {working_dir}; the job reads it at "
          f"{path}, which must exist on the cluster", file=sys.stderr)
    return str(path)


def follow(jobs, job_id: str) -> int:
    """Stream a job's logs until it ends; return an exit code mirroring its final status."""

    async def tail() -> None:
        async for lines in jobs.tail_job_logs(job_id):
            sys.stdout.write(lines)
            sys.stdout.flush()

    asyncio.run(tail())
    status = wait_for_end(jobs, job_id)
    print(f"job {job_id}: {status}", flush=True)
    return EXIT_CODES.get(status, 1)


def job_status(jobs, job_id: str) -> str:
    status = jobs.get_job_status(job_id)
    return str(getattr(status, "value", status))


def wait_for_end(jobs, job_id: str, timeout_s: float = 60.0) -> str:
    deadline = time.monotonic() + timeout_s
    status = job_status(jobs, job_id)
    while status not in EXIT_CODES and time.monotonic() < deadline:
        time.sleep(1)
        status = job_status(jobs, job_id)
    return status
