"""Step 2, guided mistake analysis: the model (or a named critic), told that its induced answer
is harmful, unethical or offensive, explains why. No human labels, no external judge."""

from __future__ import annotations

import pyarrow as pa

from ray_align import prompts
from ray_align.generate import generate, make_requests, results_by_id
from ray_align.pipeline import Context, StageOutput, with_harm_label
from ray_align.stages.common import set_aside_short

ANALYSIS_SCHEMA = pa.schema([
    ("id", pa.string()), ("instruction", pa.string()), ("category", pa.string()),
    ("response", pa.string()), ("analysis", pa.string()), ("critic", pa.string()),
])
MIN_ANALYSIS_CHARS = 20


def analyze(ctx: Context) -> StageOutput:
    cfg, run = ctx.config, ctx.run
    induced = run.read_table("induce", "data.parquet").to_pylist()
    requests = make_requests([r["id"] for r in induced],
                             [prompts.analyze_guided(r["instruction"], r["guided_response"])
                              for r in induced])
    ctx.ensure_ray()
    stats = generate(run, ("analyze", "parts"), requests, cfg.critic, cfg.critic_engine,
                     cfg.analyze.sampling, desc="analyze", engines=ctx.engines_for(cfg.critic_engine))
    results = results_by_id(run, "analyze", "parts")
    analysed = [{"id": row["id"], "instruction": row["instruction"], "category": row["category"],
                 "response": row["guided_response"],
                 "analysis": results[row["id"]]["generated_text"].strip(), "critic": cfg.critic.path}
                for row in induced]
    out, unusable = set_aside_short(run, "analyze", analysed, ("analysis",), MIN_ANALYSIS_CHARS,
                                    "analysis")
    run.write_table(with_harm_label(pa.Table.from_pylist(out, schema=ANALYSIS_SCHEMA), harmful=True),
                    "analyze", "data.parquet")
    return StageOutput(len(out), "data.parquet", {"unusable": unusable, **stats.metrics()})
