"""One-line explanations for failures of the outside world: object storage, the Ray cluster, and
the credentials for either.

The libraries underneath (pyarrow's S3 and GCS filesystems, Ray's job client, ``ray.init``) report
these with their own exception types and long, multi-line texts; the user needs to know which
endpoint, bucket or address failed and which setting to change. ``describe`` recognises them by
the texts those libraries produce (found by running them against real servers on loopback; see
tests/unit/test_cli_errors.py) and returns ``None`` for anything else, so that the caller can fall
back to a generic line.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

DASHBOARD_HINT = "pass --address http://HEAD:8265 (or set RAY_ADDRESS)"
AWS_KEYS = "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"


def chain(exc: BaseException, limit: int = 12) -> Iterator[BaseException]:
    """``exc`` and what it wraps: ``__cause__``, ``__context__`` and a Ray task error's ``cause``
    (a failure inside a Ray task arrives wrapped in ``RayTaskError``)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo and len(seen) < limit:
        item = todo.pop(0)
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        inner = getattr(item, "cause", None)
        todo += [inner if isinstance(inner, BaseException) else None, item.__cause__, item.__context__]


def one_line(text: str, limit: int = 300) -> str:
    """The first non-empty line of ``text``, cut at ``limit`` characters."""
    line = next((part.strip() for part in str(text).splitlines() if part.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def describe(exc: BaseException, *, address: str | None = None) -> str | None:
    """A one-line explanation of ``exc`` with the fix, if it is a storage, cluster or credentials
    failure this module knows; else None. ``address`` is the Ray address the command used (the
    exception texts do not always carry it)."""
    excs = list(chain(exc))
    text = " | ".join(f"{type(e).__name__}: {e}" for e in excs)
    types = {type(e).__name__ for e in excs}
    return _storage(text) or _cluster(text, types, address)


# --- object storage (pyarrow S3 / GCS) -------------------------------------------------------


def _storage_uri(text: str) -> str | None:
    """``s3://bucket/key`` from pyarrow's "... key 'K' in bucket 'B' ..."."""
    found = re.search(r"key '([^']*)' in bucket '([^']+)'", text)
    if found:
        return f"s3://{found.group(2)}/{found.group(1)}".rstrip("/")
    found = re.search(r"[Bb]ucket '([^']+)'", text)
    return f"s3://{found.group(1)}" if found else None


def _endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"


def _has_aws_credentials() -> bool:
    """Whether any of the credential sources the AWS SDK reads is configured here (an instance
    role cannot be seen from here, so its absence is not proof)."""
    names = ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
             "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI")
    files = (os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or os.path.expanduser("~/.aws/credentials"),
             os.environ.get("AWS_CONFIG_FILE") or os.path.expanduser("~/.aws/config"))
    return any(os.environ.get(n) for n in names) or any(os.path.isfile(f) for f in files)


def _storage(text: str) -> str | None:
    if "OAuth2 access token" in text:  # google-cloud-cpp: no usable credentials
        detail = re.search(r"The underlying error message was: (.+?)(?: error_info=|\}|'\)|$)", text)
        why = f" ({detail.group(1).strip()})" if detail else ""
        return ("gs:// needs Google Cloud credentials and none could be used" + why + ": set "
                "GOOGLE_APPLICATION_CREDENTIALS to a service-account JSON key file, or run "
                "`gcloud auth application-default login`")
    if "google::cloud::Status(PERMISSION_DENIED" in text or "google::cloud::Status(UNAUTHENTICATED" in text:
        return ("Google Cloud Storage refused the request: give the account in "
                "GOOGLE_APPLICATION_CREDENTIALS (or `gcloud auth application-default login`) access "
                "to the bucket, or fix the gs:// URI")
    uri = _storage_uri(text)
    where = uri or "the S3 URI"
    if "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text or re.search(r"Bucket '[^']+' not found", text):
        bucket = uri.split("/")[2] if uri else "?"
        return (f"bucket '{bucket}' does not exist at {_endpoint()}: create it (`aws s3 mb "
                f"s3://{bucket}`) or fix the s3:// URI (run_dir / --run-dir or the data source)")
    if re.search(r"no (aws )?credentials|unable to locate credentials|MISSING_AUTHENTICATION_TOKEN",
                 text, re.IGNORECASE):
        return f"no AWS credentials found for {where}: set {AWS_KEYS}"
    denied = re.search(r"ACCESS_DENIED|AccessDenied|INVALID_ACCESS_KEY_ID|InvalidAccessKeyId|"
                       r"SIGNATURE_DOES_NOT_MATCH|SignatureDoesNotMatch|EXPIRED_TOKEN|ExpiredToken|"
                       r"InvalidToken|HTTP status 403", text)
    if denied:
        if not _has_aws_credentials():
            return (f"{_endpoint()} denied access to {where} ({denied.group(0)}) and no AWS "
                    f"credentials are set here: set {AWS_KEYS}")
        return (f"{_endpoint()} denied access to {where} ({denied.group(0)}): check {AWS_KEYS} "
                "and that these credentials may use the bucket")
    if "HTTP status 301" in text or "PermanentRedirect" in text:
        return (f"{where} is in another region than the one used: set AWS_DEFAULT_REGION to the "
                "bucket's region")
    if "NETWORK_CONNECTION" in text or "curlCode: " in text:
        host = re.search(r"(?:Failed to connect to|Could not resolve host:) ([^\s;,')]+)", text)
        endpoint = host.group(1) if host else _endpoint()
        if "resolve" in text.lower():
            why = "host not found"
        elif "curlCode: 28" in text or "timed out" in text.lower():
            why = "no answer in time"
        else:
            why = "connection refused"
        if endpoint.endswith("amazonaws.com") and "AWS_ENDPOINT_URL" not in os.environ:
            fix = "check the network, or set AWS_ENDPOINT_URL for an S3-compatible store"
        else:
            fix = "start the object store or set AWS_ENDPOINT_URL to its address (unset it for AWS S3)"
        return f"cannot reach the S3 endpoint {endpoint} ({why}) for {where}: {fix}"
    return None


# --- the Ray cluster -------------------------------------------------------------------------


def _reason(text: str) -> str:
    lower = text.lower()
    if "refused" in lower:
        return "connection refused"
    if "resolve" in lower or "name or service not known" in lower or "gaierror" in lower:
        return "host not found"
    if "timed out" in lower or "timeout" in lower:
        return "no answer in time"
    return "unreachable"


def _cluster(text: str, types: set[str], address: str | None) -> str | None:
    said = re.search(r"Failed to connect to Ray at address: (\S+?)\.?(?: \||$)", text)
    addr = address or (said.group(1) if said else None) or "the cluster"
    if "AuthenticationError" in types or "Token authentication is enabled" in text:
        if "Authentication failed" in text or "invalid or incorrect" in text:
            return (f"the Ray cluster at {addr} refused the authentication token: set RAY_AUTH_TOKEN "
                    "to the cluster's token (`ray get-auth-token` on the head node prints it)")
        return (f"the Ray cluster at {addr} requires token authentication: set RAY_AUTH_MODE=token "
                "and RAY_AUTH_TOKEN=<the cluster's token> (or put the token in ~/.ray/auth_token)")
    job = (re.search(r"status code 404: Job (\S+?) does not exist", text)
           or re.search(r"404, message=.*?/api/jobs/([^/\s']+)/", text))
    if job:
        return (f"no job {job.group(1)} on {addr}: check the job id (`ray job list --address "
                f"{addr}` lists the jobs there), or pass --address of the cluster that ran it")
    if said:
        return (f"cannot reach the Ray job server at {addr} ({_reason(text)}): start the cluster, "
                f"or {DASHBOARD_HINT}")
    if "Version check returned 404" in text or "Jobs API is not supported" in text or (
            address and "JSONDecodeError" in types):
        return (f"{addr} answers HTTP but is not a Ray job server: {DASHBOARD_HINT} pointing at "
                "the Ray dashboard's port")
    status = re.search(r"Request failed with status code (\d+): (.*)", text)
    if status:
        return (f"the Ray job server at {addr} answered HTTP {status.group(1)}: "
                f"{one_line(status.group(2), 160)}")
    if "Invalid Ray address" in text and "HTTP address" in text:
        return (f"{addr} is a job server (HTTP) address, which `ray-align submit/status/logs` use; "
                "to run here and join a cluster, set ray.address (or RAY_ADDRESS) to its GCS "
                "address HEAD:6379, or unset RAY_ADDRESS to start a local Ray")
    gcs = re.search(r"No Ray cluster \(GCS\) answers at (\S+?)\.?(?: \||$)", text)
    if gcs or any(words in text for words in (
            "waiting for GCS to become available", "Could not find any running Ray instance",
            "ray client connection timeout")):
        addr = address or (gcs.group(1) if gcs else "the configured address")
        why = f" ({_reason(text)})" if gcs else ""
        return (f"cannot reach the Ray cluster at {addr}{why}: start it (`ray start --head`), fix "
                "ray.address in the config or RAY_ADDRESS (HEAD:6379), or unset both to start a "
                "local Ray")
    return None


# --- the line the CLI prints ------------------------------------------------------------------


def _innermost(exc: BaseException) -> BaseException:
    """The original exception inside Ray's task-error wrappers (whose own text is a traceback)."""
    while isinstance(getattr(exc, "cause", None), BaseException) and exc.cause is not exc:
        exc = exc.cause
    return exc


def error_line(exc: BaseException, own: bool, address: str | None, debug: bool) -> str:
    """The one line an error gets: the outside world's failure explained (errors.describe), a
    project error's own message (``own``), or the type and first line of anything else."""
    line = describe(exc, address=address)
    if line and own:
        uri = re.search(r"\b(?:s3|gs)://[^\s:;,()']+", str(exc))  # which file, when it says
        if uri and uri.group(0) not in line:
            line = f"{uri.group(0)}: {line}"
    if line:
        return line
    if own:
        return str(exc)
    inner = _innermost(exc)
    text = one_line(str(inner))
    where = "" if debug else " (rerun with --debug for the traceback)"
    return f"{type(inner).__name__}: {text}{where}" if text else f"{type(inner).__name__}{where}"
