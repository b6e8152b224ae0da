"""Step 2, guided mistake analysis: the model (or a named critic), told that its induced answer
is harmful, unethical or offensive, explains why. No human labels, no external judge.

On Ray Datasets: requests built from ``induce/data/`` in Ray Data tasks, the induced row carried
through the engines, ``analyze/data/`` written from the workers."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc

from ray_align import prompts
from ray_align.datasets import map_data, stage_data, write_dataset
from ray_align.generate import generate
from ray_align.pipeline import Context, StageOutput
from ray_align.sources import QUARANTINE_SCHEMA

ANALYSIS_SCHEMA = pa.schema([
    ("id", pa.string()), ("instruction", pa.string()), ("category", pa.string()),
    ("response", pa.string()), ("analysis", pa.string()), ("critic", pa.string()),
])
MIN_ANALYSIS_CHARS = 20
CARRY = ("id", "instruction", "category", "response")


def analysis_requests(batch: pa.Table) -> pa.Table:
    """One request per induced row: its guided (harmful) answer, to be analysed."""
    messages = [json.dumps(prompts.analyze_guided(i, r), ensure_ascii=False) for i, r in
                zip(batch.column("instruction").to_pylist(),
                    batch.column("guided_response").to_pylist(), strict=True)]
    return pa.table({"key": batch.column("id"), "messages": pa.array(messages, pa.string()),
                     "id": batch.column("id"), "instruction": batch.column("instruction"),
                     "category": batch.column("category"),
                     "response": batch.column("guided_response")})


def analysis_rows(batch: pa.Table, critic: str, min_chars: int) -> tuple[dict, dict]:
    """A block of answers as ANALYSIS_SCHEMA rows; analyses too short to learn from go to the
    quarantine with their length as the reason (never silently dropped)."""
    analysis = pc.utf8_trim_whitespace(batch.column("generated_text"))
    lengths = pc.utf8_length(analysis)
    short = pc.less(lengths, min_chars)
    table = pa.table({"id": batch.column("id"), "instruction": batch.column("instruction"),
                      "category": batch.column("category"), "response": batch.column("response"),
                      "analysis": analysis,
                      "critic": pa.repeat(pa.scalar(critic), batch.num_rows)}, schema=ANALYSIS_SCHEMA)
    set_aside = batch.filter(short)
    reasons = [f"analysis has {n} characters (under {min_chars})"
               for n in lengths.filter(short).to_pylist()]
    quarantine = pa.table({"source": pa.repeat(pa.scalar("analyze"), set_aside.num_rows),
                           "row": pa.nulls(set_aside.num_rows, pa.int64()),
                           "id": set_aside.column("id"), "reason": pa.array(reasons, pa.string())},
                          schema=QUARANTINE_SCHEMA)
    kept = table.filter(pc.invert(short))
    return {"data": kept, "quarantine": quarantine}, {"rows": kept.num_rows,
                                                      "unusable": set_aside.num_rows}


def analyze(ctx: Context) -> StageOutput:
    cfg, run = ctx.config, ctx.run
    ctx.ensure_ray()
    rows = run.count_rows("induce", "data")
    requests = map_data(stage_data(run, "induce", "data", rows=rows), analysis_requests)
    stats = generate(run, ("analyze", "parts"), requests, cfg.critic, cfg.critic_engine,
                     cfg.analyze.sampling, desc="analyze", engines=ctx.engines_for(cfg.critic_engine),
                     carry=CARRY, rows=rows)
    counts = write_dataset(stage_data(run, "analyze", "parts", rows=rows), run,
                           {"data": ("analyze", "data"), "quarantine": ("analyze", "quarantine")},
                           analysis_rows, critic=cfg.critic.path, min_chars=MIN_ANALYSIS_CHARS)
    if counts["unusable"]:
        print(f"[analyze] {counts['unusable']} analyses under {MIN_ANALYSIS_CHARS} characters "
              f"quarantined in {run.uri_of('analyze', 'quarantine')}", flush=True)
    if not counts["rows"]:
        raise RuntimeError("analyze: no usable analysis was generated; see "
                           f"{run.uri_of('analyze', 'quarantine')}")
    return StageOutput(counts["rows"], "data", {"unusable": counts["unusable"], **stats.metrics()})
