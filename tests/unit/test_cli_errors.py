"""A broken outside world (cluster, storage, credentials) gets one line on stderr naming what
failed and what to do, exit code 2, and the traceback only under ``--debug``.

Real servers on loopback where this machine can produce the failure: a closed port, a web server
that is not Ray, an S3 API (moto) without the bucket, a job server that wants a token or lacks the
job. The texts that need a real cloud (access denied, no credentials) are checked on
``errors.describe`` with the messages pyarrow and Ray produce for them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ray_align.cli import main
from ray_align.errors import describe
from tests.unit.test_config import QUICKSTART


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_error_line(capsys, *words: str) -> str:
    """The single stderr line of a failed command; it holds every one of ``words``."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("ray-align: error: "), err
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.fixture
def closed() -> str:
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture(autouse=True)
def no_ray_address(monkeypatch):
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE"):
        monkeypatch.delenv(name, raising=False)


# --- the cluster -----------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["status", "raysubmit_x"], ["logs", "raysubmit_x"],
                                  ["logs", "raysubmit_x", "--follow"],
                                  ["submit", str(QUICKSTART), "--no-wait"]])
def test_cluster_commands_on_a_closed_port(argv, closed, monkeypatch, capsys):
    monkeypatch.chdir(QUICKSTART.parents[1])  # submit uploads the checkout it runs in
    started = time.monotonic()
    assert main([*argv, "--address", closed]) == 2
    one_error_line(capsys, f"cannot reach the Ray job server at {closed}", "connection refused",
                   "--address", "RAY_ADDRESS")
    assert time.monotonic() - started < 10


def test_ray_address_is_named_when_it_is_the_one_used(closed, monkeypatch, capsys):
    monkeypatch.setenv("RAY_ADDRESS", closed.removeprefix("http://"))  # a bare HOST:PORT, too
    assert main(["status", "raysubmit_x"]) == 2
    one_error_line(capsys, closed.removeprefix("http://"), "connection refused")


def test_unknown_host(capsys):
    assert main(["status", "raysubmit_x", "--address", "http://no-such-host.invalid:8265"]) == 2
    one_error_line(capsys, "no-such-host.invalid:8265", "host not found", "--address")


@pytest.fixture(scope="module")
def web_server():
    """``python -m http.server`` on loopback, in its own process session: a web server, not Ray."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)


def test_a_web_server_that_is_not_ray(web_server, capsys):
    assert main(["logs", "raysubmit_x", "--address", web_server]) == 2
    one_error_line(capsys, f"{web_server} answers HTTP but is not a Ray job server", "--address",
                   "8265")


def test_explicit_address_wins_over_ray_address(web_server, closed, monkeypatch, capsys):
    """Ray's client replaces its address argument by $RAY_ADDRESS; --address must win."""
    monkeypatch.setenv("RAY_ADDRESS", closed)
    assert main(["status", "raysubmit_x", "--address", web_server]) == 2
    one_error_line(capsys, web_server, "not a Ray job server")


class FakeDashboard(BaseHTTPRequestHandler):
    """Ray's job server as its client sees it: /api/version, no jobs, and (``auth``) the answers
    of a cluster with token authentication (texts from ray/dashboard, Ray 2.60)."""

    auth: int | None = None

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.auth == 401:
            self._reply(401, "Unauthorized: Missing authentication token")
        elif self.auth == 403:
            self._reply(403, "Forbidden: Invalid authentication token")
        elif self.path == "/api/version":
            self._reply(200, json.dumps({"version": "4", "ray_version": "2.60.0",
                                         "ray_commit": "x", "session_name": "s"}))
        elif self.path.startswith("/api/jobs/"):
            job = self.path.split("/")[3]
            self._reply(404, f"Job {job} does not exist")
        else:
            self._reply(404, "Not Found")

    def _reply(self, code: int, body: str) -> None:
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def dashboard():
    """Start a fake job server; yields a function (auth) -> its address."""
    servers = []

    def start(auth: int | None = None) -> str:
        handler = type("Handler", (FakeDashboard,), {"auth": auth})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("argv", [["status"], ["logs"], ["logs", "--follow"]])
def test_a_job_that_does_not_exist(argv, dashboard, capsys):
    address = dashboard()
    assert main([argv[0], "raysubmit_nope", *argv[1:], "--address", address]) == 2
    one_error_line(capsys, f"no job raysubmit_nope on {address}", "ray job list")


def test_token_required(dashboard, capsys):
    address = dashboard(auth=401)
    assert main(["status", "raysubmit_x", "--address", address]) == 2
    one_error_line(capsys, address, "requires token authentication", "RAY_AUTH_TOKEN",
                   "RAY_AUTH_MODE=token")


def test_token_refused(dashboard, monkeypatch, capsys):
    address = dashboard(auth=403)
    assert main(["status", "raysubmit_x", "--address", address]) == 2
    one_error_line(capsys, address, "refused the authentication token", "RAY_AUTH_TOKEN")


def test_run_with_an_unreachable_cluster_fails_at_once(fake_model, monkeypatch, tmp_path, capsys):
    """ray.init retries an absent GCS for minutes; the command says so in seconds."""
    gcs = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("RAY_ADDRESS", gcs)
    assert main(["run", str(QUICKSTART), "--run-dir", str(tmp_path / "run"),
                 f"model.path={fake_model}"]) == 2
    one_error_line(capsys, f"cannot reach the Ray cluster at {gcs}", "connection refused",
                   "ray.address", "RAY_ADDRESS")


def test_submit_names_an_unset_env_var(closed, capsys):
    assert main(["submit", str(QUICKSTART), "--env", "RAY_ALIGN_NOT_SET", "--address", closed]) == 2
    one_error_line(capsys, "--env RAY_ALIGN_NOT_SET", "not set")


# --- storage ---------------------------------------------------------------------------------


@pytest.fixture
def fake_model(tmp_path):
    """A directory that passes the CLI's model check; nothing here gets as far as loading it."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "tokenizer.json").write_text("{}")
    return model


@pytest.fixture(scope="module")
def s3_endpoint():
    """A real S3 API (moto) on loopback, with no buckets."""
    from moto.server import ThreadedMotoServer  # a dev dependency: missing is a failure

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return s3_endpoint


@pytest.mark.parametrize("argv", [["run"], ["stage", "induce"], ["compare"]])
def test_run_dir_in_a_missing_bucket(argv, s3_env, fake_model, capsys):
    code = main([*argv, str(QUICKSTART), "--run-dir", "s3://no-such-bucket/run",
                 f"model.path={fake_model}"])
    assert code == 2
    one_error_line(capsys, "bucket 'no-such-bucket' does not exist", s3_env,
                   "aws s3 mb s3://no-such-bucket", "run_dir")


def test_gs_without_usable_credentials(fake_model, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing-key.json"))
    assert main(["run", str(QUICKSTART), "--run-dir", "gs://some-bucket/run",
                 f"model.path={fake_model}"]) == 2
    one_error_line(capsys, "gs://", "GOOGLE_APPLICATION_CREDENTIALS", "missing-key.json",
                   "gcloud auth application-default login")


def pyarrow_error(endpoint: str) -> OSError:
    """The error pyarrow raises for one request to ``endpoint`` (one attempt: its default retries
    take ~6 s)."""
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(endpoint_override=endpoint, access_key="x", secret_key="x",
                           region="us-east-1",
                           retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1))
    with pytest.raises(OSError) as info:
        fs.get_file_info("bucket-b/run/x")
    return info.value


def test_s3_endpoint_closed_port():
    port = free_port()
    line = describe(pyarrow_error(f"http://127.0.0.1:{port}"))
    assert line.startswith(f"cannot reach the S3 endpoint 127.0.0.1:{port} (connection refused) "
                           "for s3://bucket-b/run/x")
    assert "AWS_ENDPOINT_URL" in line


def test_s3_endpoint_unknown_host():
    line = describe(pyarrow_error("http://no-such-host.invalid:9000"))
    assert "no-such-host.invalid" in line and "host not found" in line and "AWS_ENDPOINT_URL" in line


@pytest.mark.parametrize("code", ["ACCESS_DENIED", "InvalidAccessKeyId", "SignatureDoesNotMatch"])
def test_s3_access_denied(code, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA...")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://s3.example.org")
    exc = OSError(f"When getting information for key 'run/x' in bucket 'b1': AWS Error {code} during "
                  "HeadObject operation: No response body.")
    line = describe(exc)
    assert line.startswith(f"https://s3.example.org denied access to s3://b1/run/x ({code})")
    for word in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        assert word in line


def test_s3_no_credentials_found(monkeypatch, tmp_path):
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))
    exc = OSError("When reading information for key 'p.jsonl' in bucket 'b1': AWS Error "
                  "ACCESS_DENIED during HeadObject operation: No response body.")
    line = describe(exc)
    assert "no AWS credentials are set here" in line and "AWS_ACCESS_KEY_ID" in line
    line = describe(OSError("Unable to locate credentials"))
    assert line.startswith("no AWS credentials found") and "AWS_PROFILE" in line


def test_storage_error_wrapping_keeps_the_file(tmp_path, capsys, monkeypatch):
    """A project error caused by the outside world: the explanation, prefixed by its file."""
    from ray_align import cli
    from ray_align.storage import StorageError

    def fail(config, args, **_):
        cause = OSError("When initiating multiple part upload for key 'run/a/x' in bucket 'b1': AWS "
                        "Error NO_SUCH_BUCKET during CreateMultipartUpload operation: The specified "
                        "bucket does not exist")
        raise StorageError(f"cannot write s3://b1/run/a/x: {cause}") from cause

    monkeypatch.setattr(cli, "run_pipeline", fail)
    monkeypatch.setattr(cli, "_resolve_paths", lambda config: None)
    assert main(["run", str(QUICKSTART), "--run-dir", "s3://b1/run"]) == 2
    one_error_line(capsys, "s3://b1/run/a/x: bucket 'b1' does not exist")


# --- any other error, --debug, Ctrl-C --------------------------------------------------------


def test_debug_shows_the_traceback(closed, capsys):
    for argv in (["--debug", "status", "raysubmit_x", "--address", closed],
                 ["status", "raysubmit_x", "--address", closed, "--debug"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err
        assert err.strip().splitlines()[-1].startswith("ray-align: error: cannot reach")


def test_an_unknown_error_gets_one_line(monkeypatch, tmp_path, capsys):
    from ray_align import cli

    def fail(config, args, **_):
        raise RuntimeError("something odd\nsecond line")

    monkeypatch.setattr(cli, "run_pipeline", fail)
    monkeypatch.setattr(cli, "_resolve_paths", lambda config: None)
    assert main(["run", str(QUICKSTART), "--run-dir", str(tmp_path)]) == 2
    line = one_error_line(capsys)
    assert line == ("ray-align: error: RuntimeError: something odd "
                    "(rerun with --debug for the traceback)")
    assert main(["run", str(QUICKSTART), "--run-dir", str(tmp_path), "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_ctrl_c_exits_130_with_one_line(monkeypatch, tmp_path, capsys):
    from ray_align import cli

    def interrupted(config, args, **_):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_pipeline", interrupted)
    monkeypatch.setattr(cli, "_resolve_paths", lambda config: None)
    assert main(["run", str(QUICKSTART), "--run-dir", str(tmp_path)]) == 130
    assert capsys.readouterr().err.strip().splitlines() == ["ray-align: interrupted"]


@pytest.mark.parametrize("text, words", [
    ("Timed out while waiting for GCS to become available.", ["cannot reach the Ray cluster"]),
    ("Invalid Ray address: 'http://h:8265'. It looks like you set RAY_ADDRESS to an HTTP address "
     "(e.g. the API server address). To fix this, either:\n  1. Unset RAY_ADDRESS",
     ["job server (HTTP) address", "HEAD:6379"]),
    ("google::cloud::Status(UNAVAILABLE: Retry policy exhausted, with a last message of Could not "
     "create a OAuth2 access token to authenticate the request. The request was not sent",
     ["GOOGLE_APPLICATION_CREDENTIALS"]),
])
def test_describe_other_texts(text, words):
    line = describe(RuntimeError(text), address="h:8265")
    assert line and "\n" not in line
    for word in words:
        assert word in line


def test_describe_leaves_unknown_errors_alone():
    assert describe(ValueError("a bug")) is None
    assert describe(FileNotFoundError("Path does not exist 'b/x'")) is None
