"""Orchestration ceiling: how many rows per second ``generate()`` moves when the engines cost
nothing.

Everything outside the engines runs as in a stage (building requests, tokenizing prompts with
the chat template, the resume check, blocks into Ray Data, collecting results, writing Parquet
parts); only ``build_engine_processor`` is replaced by an instant stub (a Ray Data map that
answers every row at once). A pool of many GPUs produces on the order of thousands of rows per
second: the driver must not be what limits it. Each size runs in a fresh process; the driver's
peak resident memory tells whether rows stream or pile up.
"""

from __future__ import annotations

import tempfile
import threading
import time
from typing import Any

from ray_align.bench.common import contender_main, print_table, run_contender

TARGET_ROWS_PER_S = 5000  # the floor: a 64-GPU 8B pool makes about 2,000 rows/s
STUB_TOKENS = 8  # output tokens the stub claims per row
REQUEST_CHUNK = 65536  # requests built per make_requests call: the table, not Python lists, grows


def stub_processor(model, engine, sampling, lora=None, carry=(), text="ok"):
    """Stands in for ``build_engine_processor``: same input blocks, same output columns (an
    answered row's with the ``carry`` columns, and ray.data.llm's empty ``__inference_error__``),
    no engine (answers in microseconds)."""
    import pyarrow as pa

    def answer(batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        from ray_align.generate import CARRY_PREFIX

        return pa.table({**{name: batch.column(CARRY_PREFIX + name) for name in carry},
                         "key": batch.column("key"), "generated_text": pa.array([text] * n),
                         "num_input_tokens": pa.compute.list_value_length(batch.column("prompt_ids")),
                         "num_generated_tokens": pa.array([STUB_TOKENS] * n, pa.int64()),
                         "error": pa.array([""] * n), "__inference_error__": pa.array([""] * n),
                         "engine_window": pa.array([[0.0, 0.0]] * n, pa.list_(pa.float64()))})

    def processor(dataset):
        return dataset.map_batches(answer, batch_format="pyarrow", batch_size=None, num_cpus=0.5)

    return processor


class PeakRss:
    """This process's peak resident memory while the block runs, in MB (sampled every 50 ms):
    all of it, and without shared pages (the Ray object store's, which the driver maps when it
    puts the request blocks there)."""

    def __enter__(self) -> PeakRss:
        import psutil

        self.process, self.peak_mb, self.peak_private_mb = psutil.Process(), 0.0, 0.0
        self.base_mb = self.process.memory_info().rss / 1e6
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            info = self.process.memory_info()
            self.peak_mb = max(self.peak_mb, info.rss / 1e6)
            self.peak_private_mb = max(self.peak_private_mb, (info.rss - info.shared) / 1e6)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_generate(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec["rows"]`` chat requests through ``generate()`` with the stub engine."""
    import pyarrow as pa
    import ray

    from ray_align import generate as generation
    from ray_align.config import Config
    from ray_align.pipeline import init_ray
    from ray_align.storage import RunDir

    config = Config.model_validate(spec["config"])
    generation.build_engine_processor = stub_processor
    init_ray(config.ray)
    rows = spec["rows"]
    try:
        with tempfile.TemporaryDirectory() as folder, PeakRss() as memory:
            started = time.perf_counter()
            requests = pa.concat_tables([generation.make_requests(
                [f"r{i}" for i in range(start, min(rows, start + REQUEST_CHUNK))],
                [[{"role": "user", "content": f"Question number {i}: how do plants grow?"}]
                 for i in range(start, min(rows, start + REQUEST_CHUNK))])
                for start in range(0, rows, REQUEST_CHUNK)])
            built = time.perf_counter()
            stats = generation.generate(RunDir(folder), ("out",), requests, config.model,
                                        config.engine, config.induce, desc=f"stub {rows}")
            wall = time.perf_counter() - started
            parts = len(RunDir(folder).list_files("out", suffix=".parquet"))
    finally:
        ray.shutdown()
    if stats.generated_now != rows:
        raise RuntimeError(f"the stub answered {stats.generated_now} of {rows} rows")
    first = stats.first_result_s or 0.0  # from the engines' launch: tokenizer, Ray Data start-up
    return {"rows": rows, "wall_s": round(wall, 2), "requests_s": round(built - started, 2),
            "rows_per_s": round(rows / wall, 1), "first_result_s": round(first, 2),
            # the streaming rate once answers flow, start-up costs left out
            "streaming_rows_per_s": round(rows / max(wall - (built - started) - first, 1e-9), 1),
            "driver_base_mb": round(memory.base_mb),
            "driver_peak_mb": round(memory.peak_mb),
            "driver_peak_private_mb": round(memory.peak_private_mb), "parts": parts}


CONTENDERS = {"generate": run_generate}


def bench(config, sizes: list[int]) -> dict[str, Any]:
    """Each size in a fresh process; rows/s and the driver's peak memory per size."""
    spec = {"config": config.model_dump(mode="json")}
    rows = [run_contender(__name__.replace("__main__", "ray_align.bench.orchestration"),
                          "generate", {**spec, "rows": n}) for n in sizes]
    text = print_table("orchestration ceiling: generate() with an instant stub engine", rows, [
        ("rows", "rows"), ("rows_per_s", "rows/s"), ("wall_s", "wall s"),
        ("requests_s", "requests s"), ("first_result_s", "first answers s"),
        ("streaming_rows_per_s", "rows/s after"),
        ("driver_peak_mb", "driver peak MB"), ("driver_peak_private_mb", "without shared MB"),
        ("parts", "parts")])
    slowest = min(r["rows_per_s"] for r in rows)
    return {"rows": rows, "table": text, "target_rows_per_s": TARGET_ROWS_PER_S,
            "met": slowest >= TARGET_ROWS_PER_S}


if __name__ == "__main__":
    contender_main(CONTENDERS)
