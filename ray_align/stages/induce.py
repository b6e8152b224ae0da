"""Step 1, guided mistake induction: the model answers each harmful instruction with a hint
asking for a harmful answer (y-), and plainly (y0, its natural answer)."""

from __future__ import annotations

import pyarrow as pa

from ray_align import prompts
from ray_align.generate import context_limit, generate, make_requests, results_by_id
from ray_align.judges.refusal import is_refusal
from ray_align.pipeline import Context, StageOutput, with_harm_label, write_quarantine
from ray_align.sources import load_source

INDUCED_SCHEMA = pa.schema([
    ("id", pa.string()), ("instruction", pa.string()), ("category", pa.string()),
    ("source", pa.string()), ("guided_response", pa.string()), ("unguided_response", pa.string()),
    ("unguided_refused", pa.bool_()),
])


def induce(ctx: Context) -> StageOutput:
    cfg, run = ctx.config, ctx.run
    fits = context_limit(cfg.model, cfg.induce.max_tokens, prompts.induce_guided, "induce.max_tokens")
    loaded = load_source(cfg.data.harmful, cfg.data.max_prompt_chars, cfg.data.on_bad_row, "harmful",
                         fits)
    quarantined = write_quarantine(run, "induce", loaded.quarantined)
    rows = loaded.table.to_pylist()
    keys, messages = [], []
    for row in rows:
        keys += [f"{row['id']}::guided", f"{row['id']}::unguided"]
        messages += [prompts.induce_guided(row["prompt"]), prompts.induce_unguided(row["prompt"])]
    ctx.ensure_ray()
    stats = generate(run, ("induce", "parts"), make_requests(keys, messages), cfg.model, cfg.engine,
                     cfg.induce, desc="induce", engines=ctx.engines)
    results = results_by_id(run, "induce", "parts")
    out = []
    for row in rows:
        guided = results[f"{row['id']}::guided"]["generated_text"]
        unguided = results[f"{row['id']}::unguided"]["generated_text"]
        out.append({"id": row["id"], "instruction": row["prompt"], "category": row["category"],
                    "source": row["source"], "guided_response": guided,
                    "unguided_response": unguided, "unguided_refused": is_refusal(unguided)})
    table = with_harm_label(pa.Table.from_pylist(out, schema=INDUCED_SCHEMA), harmful=True)
    run.write_table(table, "induce", "data.parquet")
    # Unguided answers the refusal detector does not call refusals: a proxy, not judged mistakes.
    unguided_answered = sum(not r["unguided_refused"] for r in out)
    guided_refused = sum(is_refusal(r["guided_response"]) for r in out)
    return StageOutput(len(out), "data.parquet", {
        "quarantined": quarantined, **stats.metrics(),
        "unguided_non_refusal_rate": unguided_answered / len(out),
        "guided_refusal_rate": guided_refused / len(out),
    })
