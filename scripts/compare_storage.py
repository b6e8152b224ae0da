"""The same tiny ``ray-align run`` with its run directory on local disk and on S3, side by side.

S3 is a real S3 API server (moto's, from the dev dependencies) on loopback, or any endpoint the
environment names (``--s3-uri s3://BUCKET/prefix`` with AWS_ENDPOINT_URL and credentials set).
Each run is a fresh process on a fresh run directory; the medians of ``--repeats`` runs print.

    .venv/bin/python scripts/compare_storage.py [--rows 24] [--repeats 1] [--s3-uri URI]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import S3_ENV, build_tiny_model, ray_align_env, tiny_config  # noqa: E402


def timed_run(config: Path, run_dir: str) -> float:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "ray_align.cli", "run", str(config), "--run-dir",
                           run_dir], cwd=REPO, env=ray_align_env(), capture_output=True, text=True,
                          start_new_session=True)
    if done.returncode:
        raise SystemExit(f"run on {run_dir} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=24, help="harmful prompts (and helpful samples)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--s3-uri", help="an existing bucket/prefix; default: a loopback moto server")
    args = parser.parse_args()
    server = None
    if args.s3_uri is None:
        import boto3
        from moto.server import ThreadedMotoServer

        from ray_align.bench.common import free_port

        port = free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        os.environ.update({**S3_ENV, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"})
        bucket = f"ray-align-{uuid.uuid4().hex[:8]}"
        boto3.client("s3").create_bucket(Bucket=bucket)
        args.s3_uri = f"s3://{bucket}"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model = build_tiny_model(Path(tmp) / "tiny")
            config = tiny_config(Path(tmp), model, harmful=args.rows)
            seconds: dict[str, list[float]] = {"local": [], "s3": []}
            for index in range(args.repeats):
                seconds["local"].append(timed_run(config, f"{tmp}/run-{index}"))
                seconds["s3"].append(timed_run(config, f"{args.s3_uri}/run-{index}"))
                print(f"repeat {index}: local {seconds['local'][-1]:.1f} s, "
                      f"s3 {seconds['s3'][-1]:.1f} s", flush=True)
    finally:
        if server is not None:
            server.stop()
    local, s3 = (statistics.median(v) for v in seconds.values())
    print(f"median whole run: local {local:.1f} s, s3 {s3:.1f} s, s3/local {s3 / local:.2f}x")


if __name__ == "__main__":
    main()
