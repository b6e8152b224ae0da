"""Submit the pipeline to a Ray cluster as a Ray job, follow it, and mirror its final status.

Secrets never travel in the config or the job's metadata: ``--env NAME`` copies the value of
``NAME`` from this machine's environment into the job's runtime environment.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import socket
import sys
import time
from pathlib import Path

EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 3}
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
EXCLUDES = [".git", ".venv", "runs", "**/__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache"]


def resolve_address(address: str | None) -> str:
    """The job server this command talks to: ``--address``, else $RAY_API_SERVER_ADDRESS or
    $RAY_ADDRESS (Ray's own variables), else the local default."""
    return (address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
            or DEFAULT_ADDRESS)


def check_reachable(address: str, timeout_s: float = 5.0, *, gcs: bool = False) -> None:
    """Fail in seconds, with ConnectionError naming ``address``, when nothing listens there
    (``gcs``: the address is a cluster's GCS, as ``ray.init`` takes, not its job server).

    Without it an address that refuses or drops connections costs minutes: Ray's job client
    sends its HTTP requests without a timeout, and a bare ``HOST:PORT`` (taken for a GCS address)
    or ``ray.init`` retries the GCS for 40 s to minutes while printing warnings."""
    scheme, _, rest = address.rpartition("://")
    hostport = rest.split("/", 1)[0].rsplit("@", 1)[-1]
    host, colon, port = hostport.rpartition(":")
    if not colon or not port.isdigit():
        host, port = hostport, {"https": "443", "http": "80"}.get(scheme, "")
    if not host or not port:
        return  # not a HOST:PORT form ("auto", a module address): leave it to Ray
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        what = "No Ray cluster (GCS) answers at" if gcs else "Failed to connect to Ray at address:"
        raise ConnectionError(f"{what} {address}.") from exc


def client(address: str | None):
    """A job client for ``address`` (see resolve_address). An explicit ``--address`` wins:
    Ray's client would otherwise replace it with $RAY_ADDRESS whenever that is set."""
    from ray.job_submission import JobSubmissionClient

    target = resolve_address(address)
    check_reachable(target)
    hidden = {name: os.environ.pop(name) for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
              if name in os.environ}
    try:
        return JobSubmissionClient(target)
    finally:
        os.environ.update(hidden)


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
    job_id = submit_when_ready(jobs, entrypoint=entrypoint,
                               runtime_env=runtime_env(env_names, pip, working_dir))
    print(f"submitted job {job_id}: {entrypoint}", flush=True)
    if not wait:
        print(f"follow it with: ray-align logs {job_id} --follow", flush=True)
        return 0
    return follow(jobs, job_id)


NO_AGENT_YET = "No available agent to submit job"  # a cluster whose node agents are still starting


def submit_when_ready(jobs, *, wait_s: float = 120, retry_every_s: float = 2, **job) -> str:
    """``jobs.submit_job(**job)``, retried while the cluster has just started and no node agent
    takes jobs yet (Ray answers HTTP 500 and creates no job); any other error is raised at once."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return jobs.submit_job(**job)
        except RuntimeError as exc:
            if NO_AGENT_YET not in str(exc) or time.monotonic() > deadline:
                raise
            print(f"the cluster takes no jobs yet ({NO_AGENT_YET.lower()}): retrying",
                  file=sys.stderr, flush=True)
            time.sleep(retry_every_s)


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
