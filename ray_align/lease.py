"""One driver per run directory: a lease file (``RUN/lease.json``) taken before the first stage.

Two drivers writing one run directory (a job submitted twice, a restarted driver while the old
one still lives) would interleave parts and manifests. The lease names its holder (host, pid,
command) and carries a heartbeat the holder renews every ``HEARTBEAT_S``; a lease whose heartbeat
is older than ``STALE_AFTER_S``, or whose holder was a process of this host that is gone, is
stale and may be taken. ``--force`` takes a live one over; the old holder notices at its next
heartbeat and stops.

Object stores have no exclusive create through pyarrow, so there the rule is write, wait
``SETTLE_S``, read back: of two drivers that start within that window, the one whose write
landed last holds the lease and the other stops (S3 and GCS read back what was last written).
"""

from __future__ import annotations

import _thread
import contextlib
import json
import os
import signal
import socket
import threading
import time
import uuid
from typing import Any

from ray_align.storage import RunDir, StorageError

LEASE_FILE = "lease.json"
HEARTBEAT_S = 20.0
STALE_AFTER_S = 120.0
SETTLE_S = 2.0


class LeaseError(RuntimeError):
    """Another driver holds the run directory; the message names it and how to take over."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale(lease: dict[str, Any], now: float, stale_after_s: float = STALE_AFTER_S) -> bool:
    """Stale: no heartbeat for ``stale_after_s``, or held by a process of this host that ended."""
    if now - float(lease.get("heartbeat_at", 0)) > stale_after_s:
        return True
    return lease.get("host") == socket.gethostname() and not _pid_alive(int(lease.get("pid", 0)))


def describe(lease: dict[str, Any], now: float) -> str:
    age = now - float(lease.get("heartbeat_at", 0))
    return (f"{lease.get('command', '?')} (pid {lease.get('pid')} on {lease.get('host')}, since "
            f"{lease.get('started', '?')}, last heartbeat {age:.0f} s ago)")


class RunLease:
    """Hold ``RUN/lease.json`` for the duration of a ``with`` block."""

    def __init__(self, run: RunDir, command: str, *, force: bool = False, wait_s: float = 0.0,
                 heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S,
                 settle_s: float = SETTLE_S) -> None:
        self.run, self.force, self.wait_s = run, force, wait_s
        self.heartbeat_s, self.stale_after_s, self.settle_s = heartbeat_s, stale_after_s, settle_s
        self.record = {"holder": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
                       "command": command, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None
        self._sigint: Any = None  # SIGINT's handler before ``acquire`` when it was not Python's

    def read(self) -> dict[str, Any] | None:
        try:
            return self.run.read_json(LEASE_FILE) if self.run.exists(LEASE_FILE) else None
        except StorageError:
            return None  # a torn local write: treated as no lease

    def _write(self, exclusive: bool) -> bool:
        """Write our lease; ``exclusive`` on a local disk fails if a lease file exists."""
        record = {**self.record, "heartbeat_at": time.time(), "stale_after_s": self.stale_after_s}
        if not (exclusive and self.run.is_local):
            self.run.write_json(record, LEASE_FILE)
            return True
        path = self.run.path(LEASE_FILE)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as out:
            json.dump(record, out)
        return True

    def acquire(self, wait_s: float = 0.0) -> None:
        """Take the lease; a live holder's is waited on for up to ``wait_s`` (a driver that a
        job restarts after its old one died, on another node, waits for the stale rule)."""
        now, deadline = time.time(), time.time() + wait_s
        held = self.read()
        while (held and not self.force and not is_stale(held, now, self.stale_after_s)
               and now < deadline):
            print(f"[lease] waiting for {describe(held, now)} to end", flush=True)
            time.sleep(min(self.heartbeat_s, max(deadline - now, 0.1)))
            now, held = time.time(), self.read()
        if held and not self.force and not is_stale(held, now, self.stale_after_s):
            raise LeaseError(
                f"{self.run.uri} is in use by {describe(held, now)}. Wait for it to end or stop it; "
                f"a lease without heartbeat for {self.stale_after_s:.0f} s is taken over by itself; "
                "or pass --force to take over now (the other driver stops at its next heartbeat)")
        if held and (self.force or is_stale(held, now, self.stale_after_s)):
            print(f"[lease] taking over the run directory from {describe(held, now)}", flush=True)
        if not self._write(exclusive=held is None):
            raise LeaseError(f"{self.run.uri}: another driver took the lease at the same moment "
                             f"({self.run.uri_of(LEASE_FILE)}); rerun to see who holds it")
        if not self.run.is_local:
            time.sleep(self.settle_s)
            if (self.read() or {}).get("holder") != self.record["holder"]:
                raise LeaseError(f"{self.run.uri}: another driver took the lease at the same moment; "
                                 f"{describe(self.read() or {}, time.time())} holds it")
        self._interruptible()
        self._thread = threading.Thread(target=self._beat, name="run-lease", daemon=True)
        self._thread.start()

    def _interruptible(self) -> None:
        """Make sure a takeover can stop this driver: ``interrupt_main`` does nothing while
        SIGINT is ignored, as it is in a background job of a non-interactive shell (``cmd &`` in
        a script, some schedulers). Python's own handler is put back for the lease's duration."""
        if threading.current_thread() is not threading.main_thread():
            return
        handler = signal.getsignal(signal.SIGINT)
        if not callable(handler):
            self._sigint = handler
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            current = self.read()
            if current is not None and current.get("holder") != self.record["holder"]:
                self.lost = describe(current, time.time())
                print(f"[lease] the run directory was taken over by {self.lost}: stopping",
                      flush=True)
                _thread.interrupt_main()
                return
            with contextlib.suppress(StorageError):  # a missed beat; the next one retries
                self._write(exclusive=False)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._sigint)
            self._sigint = None
        with contextlib.suppress(StorageError, OSError):
            if (self.read() or {}).get("holder") == self.record["holder"]:
                self.run.delete(LEASE_FILE)

    def __enter__(self) -> RunLease:
        self.acquire(self.wait_s)
        return self

    def __exit__(self, *exc) -> None:
        self.release()
