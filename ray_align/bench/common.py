"""What every benchmark shares: contenders in fresh processes, peak memory, the printed table."""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

RESULT_PREFIX = "BENCH_RESULT "


class BenchError(RuntimeError):
    """A contender failed; the message carries the end of its output."""


@contextmanager
def peak_memory() -> Any:
    """Peak rise of the machine's used memory while the block runs, in GB (yields a dict).

    Machine-wide on purpose: Ray puts engines and training workers in other processes.
    """
    import psutil

    base = psutil.virtual_memory().used
    result = {"peak_gb": 0.0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            result["peak_gb"] = max(result["peak_gb"], (psutil.virtual_memory().used - base) / 1e9)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()


def free_port() -> int:
    """A free local TCP port for a process group's rendezvous (MASTER_PORT)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def with_request_stats(engine_kwargs: dict[str, Any]) -> dict[str, Any]:
    """vLLM engine arguments with request stats on: they time each engine's busy window (the
    benchmarks' steady state); ray.data.llm's engines keep them on, raw ``LLM`` does not."""
    return {**engine_kwargs, "disable_log_stats": False}


def report(result: dict[str, Any]) -> None:
    """Called in a contender's process: hand its numbers to the parent."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_contender(module: str, name: str, spec: dict[str, Any], timeout_s: float = 3600) -> dict:
    """Run ``python -m MODULE NAME SPEC_FILE`` in a fresh process and return what it reports
    (the spec goes through a file: a training spec's token ids outgrow a command line)."""
    print(f"[bench] {name}: running in a fresh process", flush=True)
    started = time.perf_counter()
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="bench-spec-") as spec_file:
        json.dump(spec, spec_file)
        spec_file.flush()
        proc = subprocess.run([sys.executable, "-m", module, name, spec_file.name],
                              capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise BenchError(f"contender {name!r} exited {proc.returncode}:\n{tail}")
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    result["process_s"] = round(time.perf_counter() - started, 1)
    # each contender's numbers are in the log as soon as it ends, should a later one fail
    print(f"[bench] {name}: done in {result['process_s']} s: {json.dumps(result)}", flush=True)
    return result


def contender_main(contenders: dict[str, Callable[[dict], dict]]) -> None:
    """The ``__main__`` of a benchmark module: run one contender, report its numbers."""
    name, spec = sys.argv[1], json.loads(Path(sys.argv[2]).read_text())
    with peak_memory() as memory:
        result = contenders[name](spec)
    report({"contender": name, **result, "peak_gb": round(memory["peak_gb"], 2)})


def side_by_side(module: str, contenders: tuple[str, ...], spec: dict[str, Any], repeats: int,
                 speed: str, targets: dict[str, float], mine: str = "ray_align",
                 ) -> tuple[list[dict], dict, dict]:
    """Run every contender ``repeats`` times, interleaved (drift hits all alike); return the
    median row per contender with the contender ``mine``'s ``speed`` over each (``ray_align_x``),
    the raw runs, and the targets (that ratio over a baseline, at least) with whether they are met."""
    runs: dict[str, list[dict]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name in contenders:
            runs[name].append(run_contender(module, name, spec))
    rows = [median_runs(r) for r in runs.values()]
    ours = next((r for r in rows if r["contender"] == mine), None)
    verdicts = {}
    for row in rows if ours else []:
        row["ray_align_x"] = ours[speed] / row[speed]
        if row["contender"] in targets:
            goal = targets[row["contender"]]
            verdicts[row["contender"]] = {"target": goal, "measured": row["ray_align_x"],
                                          "met": row["ray_align_x"] >= goal}
    return rows, runs, verdicts


def median_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-key median of repeated runs of one contender (numbers only)."""
    out = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = statistics.median(r[key] for r in runs)
    out["repeats"] = len(runs)
    return out


def print_table(title: str, rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """A fixed-width table; returns the text it printed."""
    widths = [max(len(label), 12) for _, label in columns]
    lines = [title, "  ".join(label.rjust(w) for (_, label), w in zip(columns, widths, strict=True))]
    for row in rows:
        cells = []
        for (key, _), width in zip(columns, widths, strict=True):
            value = row.get(key, "")
            cells.append((f"{value:.3g}" if isinstance(value, float) else str(value)).rjust(width))
        lines.append("  ".join(cells))
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def machine() -> dict[str, Any]:
    """The machine the numbers come from."""
    import platform

    import psutil

    return {"cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
            "processor": platform.processor() or platform.machine(), "python": platform.python_version()}


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2))
        print(f"wrote {path}", flush=True)
