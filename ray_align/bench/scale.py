"""Scale benchmark: does the cost per item stay flat as the work grows?

Induce + analyze (the real stages, through the pipeline) at several prompt counts, and the
train stage at several row counts, each size in a fresh process. Per-item cost is measured
after start-up: for generation over the engines' busy time (first request scheduled to last
token, from vLLM's request stats), for training over the loop.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from ray_align.bench import training
from ray_align.bench.common import (
    BenchError,
    contender_main,
    print_table,
    run_contender,
    with_request_stats,
)

FLATNESS_TARGET = 0.15  # largest vs smallest per-item cost, at most this far apart


def run_generation_stages(spec: dict[str, Any]) -> dict[str, Any]:
    """Induce + analyze in one fresh run directory. Steady time is the engines' busy time the
    stages record (vLLM's request stats); the rest of the wall time is start-up."""
    from ray_align.config import Config
    from ray_align.pipeline import Context, run_stage
    from ray_align.stages import STAGES
    from ray_align.storage import RunDir

    with tempfile.TemporaryDirectory() as folder:
        config = Config.model_validate({**spec["config"], "run_dir": folder})
        # each stage's own engine start is what this measures, beside the engines' busy time
        config.engine.share_across_stages = False
        ctx = Context(config=config, run=RunDir(folder))
        began = time.perf_counter()
        tokens, steady_s = 0, 0.0
        for name in ("induce", "analyze"):
            metrics = run_stage(ctx, STAGES[name])["metrics"]
            if not metrics.get("engine_s"):
                raise BenchError(f"{name} recorded no engine busy time: vLLM's request stats are "
                                 "missing (this vLLM version may not record scheduled_ts / last_token_ts)")
            tokens += metrics["output_tokens"]
            steady_s += metrics["engine_s"]
        wall_s = time.perf_counter() - began
    return {"start_s": wall_s - steady_s, "wall_s": wall_s, "tokens": tokens, "steady_s": steady_s}


class ScaleError(BenchError):
    """The config's prompt sources cannot supply the largest size asked for."""


def write_prompt_pool(config, size: int, path: Path) -> Path:
    """``size`` distinct harmful prompts in one JSONL file: the config's harmful set first, then
    its evaluation sets (AdvBench has only 520 prompts). Repeating prompts instead would let
    vLLM's prefix cache make the larger sizes look cheaper than they are."""
    from ray_align.sources import load_source

    whole = {"offset": 0, "limit": None}  # every row of each file, not the slice a stage uses
    sources = [s.model_copy(update=whole) for s in [config.data.harmful, *config.evaluate.harmful]]
    rows, seen = [], set()
    for source in sources:
        loaded = load_source(source, config.data.max_prompt_chars, "quarantine", source.path).table
        for row in loaded.select(["id", "prompt", "category"]).to_pylist():
            if row["prompt"] not in seen and len(rows) < size:
                seen.add(row["prompt"])
                rows.append(row)
    if len(rows) < size:
        names = ", ".join(dict.fromkeys(s.path for s in sources))
        raise ScaleError(f"--sizes asks for {size} prompts but {names} hold {len(rows)} distinct "
                         "ones: lower the largest size or add prompts to data.harmful")
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def bench(config, sizes: list[int], train_sizes: list[int], max_tokens: int = 16) -> dict[str, Any]:
    cfg = config.model_copy(deep=True)
    cfg.induce.max_tokens = cfg.analyze.sampling.max_tokens = max_tokens
    cfg.engine.engine_kwargs = with_request_stats(cfg.engine.engine_kwargs)
    results: dict[str, list[dict]] = {"generation": [], "training": []}
    with tempfile.TemporaryDirectory() as folder:
        if sizes:
            pool = write_prompt_pool(config, max(sizes), Path(folder) / "prompts.jsonl")
            cfg.data.harmful = cfg.data.harmful.model_copy(update={
                "path": str(pool), "id_column": "id", "prompt_column": "prompt",
                "category_column": "category", "offset": 0, "split": "train"})
        for size in sizes:
            cfg.data.harmful.limit = size
            row = run_contender(__name__, "generation", {"config": cfg.model_dump(mode="json")})
            row.update(items=size, s_per_item=row["steady_s"] / size,
                       wall_per_item=row["wall_s"] / size)
            results["generation"].append(row)
    for size in train_sizes:
        row = training.bench(config, rows=size, contenders=("ray_align",))["results"][0]
        row.update(items=size, s_per_item=row["loop_s"] / size, wall_per_item=row["total_s"] / size)
        results["training"].append(row)
    tables, flatness = [], {}
    for kind, rows in results.items():
        if not rows:
            continue
        costs = [r["s_per_item"] for r in rows]
        flatness[kind] = {"spread": max(costs) / min(costs) - 1, "target": FLATNESS_TARGET,
                          "met": max(costs) / min(costs) - 1 <= FLATNESS_TARGET}
        label = "prompts (induce + analyze)" if kind == "generation" else "training rows"
        tables.append(print_table(
            f"scale, {kind}: {label}; per-item cost after start-up (spread "
            f"{flatness[kind]['spread']:.0%}, target <= {FLATNESS_TARGET:.0%})",
            rows, [("items", "items"), ("wall_per_item", "wall s/item"),
                   ("s_per_item", "steady s/item"), ("peak_gb", "peak GB")]))
    return {"benchmark": "scale", "max_tokens": max_tokens, "results": results,
            "flatness": flatness, "table": "\n".join(tables)}


if __name__ == "__main__":
    contender_main({"generation": run_generation_stages})
