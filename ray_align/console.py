"""What a run prints: ray_align's own lines on the terminal, the libraries' chatter in a log file.

Why: a run's terminal should show its stages, progress, summary and the warnings a user must act
on. Ray, Ray Data, Serve, vLLM and DeepSpeed log their internals (executor start lines, Serve
deployments, accelerator notices) on the same terminal; here those records keep going to the
driver's log file in full, and reach the terminal only at WARNING or above (all of them with
``--verbose``). Engine and worker processes log to Ray's own files (``ray.log_to_driver``).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from ray_align.storage import RunDir

LIBRARIES = ("ray", "vllm", "deepspeed", "transformers", "torch", "datasets", "httpx", "mlflow",
             "wandb", "filelock")
# Set before the libraries are imported: their own switches for import-time and C++ chatter.
QUIET_ENV = {
    # the driver's core worker (C++): Ray Data's actor pools make it log an error-level notice
    # per engine stage (constructor arguments in the object store) that needs nothing done
    "RAY_BACKEND_LOG_LEVEL": "fatal",
    "VLLM_LOGGING_LEVEL": "WARNING",  # vLLM's import-time notices (Triton, platform)
    "TRANSFORMERS_VERBOSITY": "error",
}
# Library warnings about settings ray_align makes on purpose: nothing for the user to do.
EXPECTED = ("Progress bars disabled", "Token authentication is enabled")


class Console:
    """The driver's log routing: ``quiet()`` once at start and again after each library starts
    (Ray and Serve add their handlers on first use), ``log_file`` the full record."""

    def __init__(self, verbose: bool = False) -> None:
        self.verbose = verbose
        self.started = time.strftime("%Y%m%d-%H%M%S")
        handle, name = tempfile.mkstemp(prefix="ray_align-driver-", suffix=".log")
        os.close(handle)
        self.log_file = Path(name)
        self._file = logging.FileHandler(self.log_file, encoding="utf-8")
        self._file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        if not verbose:
            for key, value in QUIET_ENV.items():
                os.environ.setdefault(key, value)
            logging.captureWarnings(True)  # libraries' deprecation notices: to the log file

    def quiet(self) -> None:
        """Route every library logger known now: its records to the log file, and to the
        terminal from WARNING up unless verbose."""
        llm = logging.getLogger("ray.llm")  # ray.llm gives each module a terminal handler of its
        if not llm.handlers:  # own unless this parent has one: then they propagate to it
            llm.addHandler(logging.StreamHandler())
            llm.setLevel(logging.INFO)
            llm.propagate = False
        loggers = [logging.getLogger()] + [
            logger for name, logger in logging.Logger.manager.loggerDict.items()
            if isinstance(logger, logging.Logger) and name.split(".")[0] in LIBRARIES]
        for logger in loggers:
            if self._file not in logger.handlers and (logger.handlers or logger is logging.root):
                logger.addHandler(self._file)
            for handler in logger.handlers:
                if _is_terminal(handler) and not self.verbose:
                    handler.setLevel(max(handler.level, logging.WARNING))
                    if _drop_expected not in handler.filters:
                        handler.addFilter(_drop_expected)

    def save(self, run: RunDir) -> None:
        """Copy the driver's log into ``RUN/logs/`` (one file per driver run)."""
        self._file.flush()
        run.write_bytes(self.log_file.read_bytes(), "logs", f"driver-{self.started}.log")


_current: Console | None = None


def start(verbose: bool = False) -> Console:
    """Route the driver's logging for this process; call before Ray or vLLM is imported."""
    global _current
    _current = Console(verbose)
    _current.quiet()
    return _current


def quiet() -> None:
    """Route the loggers a library added since (after ``ray.init``, a Serve start)."""
    if _current is not None:
        _current.quiet()


def save_log(run: RunDir) -> None:
    """Keep the driver's log in the run directory; a failure here never hides the run's own."""
    if _current is not None:
        try:
            _current.save(run)
        except Exception as exc:  # noqa: BLE001 - the run's result matters more than its log
            print(f"[logs] could not save the driver log to {run.uri_of('logs')}: {exc}", flush=True)


def _drop_expected(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(EXPECTED)


def _is_terminal(handler: logging.Handler) -> bool:
    return (isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
            and getattr(handler, "stream", None) in (sys.stdout, sys.stderr))


def restart_clock(bar: tqdm) -> None:
    """Count a bar's rate and ETA from now, its first progress: the seconds spent starting
    engines or workers are not work, and would make the ETA of a long run far too pessimistic."""
    done = bar.n
    bar.reset(total=bar.total)
    bar.n = bar.last_print_n = done  # not an update: the rate counts only what comes after
