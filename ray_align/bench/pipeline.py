"""Pipeline scale benchmark: the method's stages on generated prompts of realistic length, with
an instant stub engine, at several sizes, each in a fresh process.

What it measures is everything but the model: sources read and checked, requests tokenized
with the chat template, answers written, guided and unguided answers paired, analyses
quarantined, the training set built and the training plan read. Per stage: rows/s of the
stage, and for a generation stage the requests/s of ``generate()`` in it (tokenizing with the
chat template, the stub, writing the parts); for the whole run: the driver's peak resident
memory without shared pages (the Ray object store's). The engines answer in microseconds, so
a driver that holds rows or does the work itself shows as memory that grows with the size and
rows/s that fall.
"""

from __future__ import annotations

import functools
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from ray_align.bench.common import contender_main, print_table, run_contender
from ray_align.bench.orchestration import PeakRss, stub_processor

STAGE_NAMES = ("induce", "analyze", "build", "plan")
GENERATION_STAGES = ("induce", "analyze")
TARGETS = {"generation_rows_per_s": 5000, "build_rows_per_s": 20000, "driver_peak_gb": 1.5,
           "driver_growth": 0.10}
PROMPT_WORDS = 230  # about 300 tokens with the embedded model's tokenizer
ANSWER_WORDS = 380  # about 500 tokens: what the stub engine answers every request with
WORDS = ("the", "a", "plan", "system", "water", "river", "signal", "market", "people", "network",
         "describe", "explain", "quickly", "carefully", "under", "between", "without", "several",
         "bridge", "station", "account", "password", "chemical", "process", "detailed", "steps")


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def write_prompts(path: Path, rows: int, seed: int, with_response: bool) -> Path:
    """``rows`` distinct prompts of about 300 tokens (and responses, for a helpful source) in
    a JSONL file, streamed to disk (never held whole)."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as out:
        for i in range(rows):
            row = {"id": f"p{i}", "prompt": f"Request {i}: {_text(rng, PROMPT_WORDS)}"}
            if with_response:
                row["response"] = _text(rng, 60)
            out.write(json.dumps(row) + "\n")
    return path


def run_pipeline(spec: dict[str, Any]) -> dict[str, Any]:
    """Every stage of ``spec["stages"]`` on ``spec["rows"]`` generated prompts, in this process."""
    import ray

    from ray_align import generate as generation
    from ray_align.config import Config
    from ray_align.pipeline import Context, run_stage
    from ray_align.stages import STAGES, analyze, induce
    from ray_align.stages import train as train_stage
    from ray_align.storage import RunDir

    rows, stages = spec["rows"], spec["stages"]
    answer = _text(random.Random(1), ANSWER_WORDS)
    generation.build_engine_processor = functools.partial(stub_processor, text=answer)
    timed: dict[str, Any] = {}

    def timing(name, generate):
        def wrapped(*args, **kwargs):
            stats = generate(*args, **kwargs)
            timed[name] = stats
            return stats
        return wrapped

    induce.generate = timing("induce", induce.generate)
    analyze.generate = timing("analyze", analyze.generate)
    out: dict[str, Any] = {"rows": rows, "stages": {}}
    with tempfile.TemporaryDirectory(dir=spec.get("tmp")) as folder:
        harmful = write_prompts(Path(folder) / "harmful.jsonl", rows, 0, with_response=False)
        helpful = write_prompts(Path(folder) / "helpful.jsonl", rows, 1, with_response=True)
        config = Config.model_validate({**spec["config"], "run_dir": f"{folder}/run"})
        config.data.harmful = config.data.harmful.model_copy(update={
            "path": str(harmful), "id_column": "id", "prompt_column": "prompt", "offset": 0,
            "limit": None, "category_column": None})
        config.data.helpful = config.data.helpful.model_copy(update={
            "path": str(helpful), "id_column": "id", "prompt_column": "prompt",
            "response_column": "response", "offset": 0, "limit": None, "category_column": None})
        config.engine.share_across_stages = False
        ctx = Context(config=config, run=RunDir(config.run_dir))
        with PeakRss() as memory:
            for name in stages:
                began = time.perf_counter()
                if name == "plan":  # what the train stage reads before it starts Ray Train
                    steps = train_stage.planned_steps(config, ctx.run)
                    done = {"rows": steps[0] if steps else 0}
                else:
                    done = run_stage(ctx, STAGES[name])
                seconds = time.perf_counter() - began
                row = {"seconds": round(seconds, 2), "rows": done["rows"],
                       "rows_per_s": round(done["rows"] / seconds, 1),
                       "driver_peak_private_mb": round(memory.peak_private_mb)}
                if name in timed:  # generate() alone: tokenizing, the stub, writing the parts
                    stats = timed[name]
                    row.update(requests=stats.generated_now, generate_s=round(stats.seconds, 2),
                               generate_rows_per_s=round(stats.generated_now / stats.seconds, 1))
                out["stages"][name] = row
                print(f"[bench] {name}: {json.dumps(row)}", flush=True)
        out.update(driver_base_mb=round(memory.base_mb), driver_peak_mb=round(memory.peak_mb),
                   driver_peak_private_mb=round(memory.peak_private_mb))
        ctx.close()
    ray.shutdown()
    return out


def bench(config, sizes: list[int], stages: tuple[str, ...] = STAGE_NAMES,
          tmp: str | None = None) -> dict[str, Any]:
    """Each size in a fresh process; per stage rows/s, the driver's peak memory per size, and
    the targets (generate() >= 5,000 requests/s, build >= 20,000 rows/s, the
    driver's peak < 1.5 GB and < 10% more from the smallest size to the largest)."""
    cfg = config.model_copy(deep=True)
    cfg.model.max_model_len = 4096  # realistic prompts with the analysed answer in them
    spec = {"config": cfg.model_dump(mode="json"), "stages": list(stages), "tmp": tmp}
    results = [run_contender("ray_align.bench.pipeline", "pipeline", {**spec, "rows": n},
                             timeout_s=6 * 3600) for n in sizes]
    table_rows = []
    for result in results:
        row = {"rows": result["rows"], "peak_mb": result["driver_peak_private_mb"]}
        for name, stage in result["stages"].items():
            row[f"{name}_rows_s"] = stage["rows_per_s"]
            if "generate_rows_per_s" in stage:
                row[f"{name}_generate_rows_s"] = stage["generate_rows_per_s"]
        table_rows.append(row)
    text = print_table(
        "pipeline scale, instant stub engine: rows/s per stage (and requests/s of generate() "
        "in it), driver peak MB without shared pages",
        table_rows, [("rows", "prompts"), *((f"{n}_rows_s", f"{n} rows/s") for n in stages),
                     *((f"{n}_generate_rows_s", f"{n} gen req/s") for n in stages
                       if n in GENERATION_STAGES),
                     ("peak_mb", "driver peak MB")])
    peaks = [r["driver_peak_private_mb"] for r in results]
    verdicts = {
        "driver_peak_gb": {"target": TARGETS["driver_peak_gb"], "measured": max(peaks) / 1000,
                           "met": max(peaks) / 1000 < TARGETS["driver_peak_gb"]},
        "driver_growth": {"target": TARGETS["driver_growth"], "measured": peaks[-1] / peaks[0] - 1,
                          "met": peaks[-1] / peaks[0] - 1 < TARGETS["driver_growth"]},
    }
    for name in stages:
        goal = (TARGETS["generation_rows_per_s"] if name in GENERATION_STAGES
                else TARGETS["build_rows_per_s"] if name == "build" else None)
        column = f"{name}_generate_rows_s" if name in GENERATION_STAGES else f"{name}_rows_s"
        if goal:
            slowest = min(r[column] for r in table_rows)
            verdicts[f"{name}_rows_per_s"] = {"target": goal, "measured": slowest,
                                              "met": slowest >= goal}
    return {"benchmark": "pipeline", "results": results, "table": text, "targets": verdicts}


if __name__ == "__main__":
    contender_main({"pipeline": run_pipeline})
