"""Step 1, guided mistake induction: the model answers each harmful instruction with a hint
asking for a harmful answer (y-), and plainly (y0, its natural answer).

On Ray Datasets end to end: the source checked and staged by Ray Data tasks, two requests per
prompt carrying the prompt's columns through the engines, the guided and unguided answers
paired by a Ray Data join, ``induce/data/`` written as many parts from the workers."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc

from ray_align import prompts
from ray_align.datasets import joined, map_data, stage_data, stage_source, write_dataset
from ray_align.generate import context_limit, generate
from ray_align.judges.refusal import is_refusal
from ray_align.pipeline import Context, StageOutput

INDUCED_SCHEMA = pa.schema([
    ("id", pa.string()), ("instruction", pa.string()), ("category", pa.string()),
    ("source", pa.string()), ("guided_response", pa.string()), ("unguided_response", pa.string()),
    ("unguided_refused", pa.bool_()),
])
CARRY = ("id", "instruction", "category", "source")  # a request's columns kept beside its answer
KINDS = {"guided": prompts.induce_guided, "unguided": prompts.induce_unguided}


def induce_requests(batch: pa.Table) -> pa.Table:
    """Two requests per prompt, keyed ``ID::guided`` and ``ID::unguided``."""
    ids, texts = batch.column("id").to_pylist(), batch.column("prompt").to_pylist()
    payload = {"id": batch.column("id"), "instruction": batch.column("prompt"),
               "category": batch.column("category"), "source": batch.column("source")}
    tables = [pa.table({"key": [f"{i}::{kind}" for i in ids],
                        "messages": [json.dumps(ask(t), ensure_ascii=False) for t in texts],
                        **payload}) for kind, ask in KINDS.items()]
    return pa.concat_tables(tables)


def answers_of(batch: pa.Table, kind: str) -> pa.Table:
    """One kind's answers of a block of ``induce/parts``, under the column name it takes."""
    mine = batch.filter(pc.ends_with(batch.column("key"), f"::{kind}"))
    text = mine.column("generated_text")
    if kind == "unguided":
        return pa.table({"id": mine.column("id"), "unguided_response": text})
    return mine.select(list(CARRY)).append_column("guided_response", text)


def induced_rows(batch: pa.Table) -> tuple[dict[str, pa.Table], dict[str, int]]:
    """A block of paired answers in INDUCED_SCHEMA, with the refusal detector's counts."""
    refused = [is_refusal(t) for t in batch.column("unguided_response").to_pylist()]
    guided_refused = sum(is_refusal(t) for t in batch.column("guided_response").to_pylist())
    table = batch.append_column("unguided_refused", pa.array(refused, pa.bool_()))
    return ({"data": table.select(INDUCED_SCHEMA.names).cast(INDUCED_SCHEMA)},
            {"rows": batch.num_rows, "unguided_answered": refused.count(False),
             "guided_refused": guided_refused})


def induce(ctx: Context) -> StageOutput:
    cfg, run = ctx.config, ctx.run
    ctx.ensure_ray()
    fits = context_limit(cfg.model, cfg.induce.max_tokens, prompts.induce_guided, "induce.max_tokens")
    source = stage_source(run, "induce", cfg.data.harmful, cfg.data.max_prompt_chars,
                          cfg.data.on_bad_row, "harmful", fits)
    requests = map_data(source.dataset(), induce_requests)
    stats = generate(run, ("induce", "parts"), requests, cfg.model, cfg.engine, cfg.induce,
                     desc="induce", engines=ctx.engines, carry=CARRY, rows=2 * source.rows)
    answers = stage_data(run, "induce", "parts", rows=2 * source.rows)
    guided, unguided = (map_data(answers, answers_of, kind=kind) for kind in KINDS)
    paired = joined(guided, unguided, "id", source.rows)
    counts = write_dataset(paired, run, {"data": ("induce", "data")}, induced_rows)
    rows = counts["rows"]
    if rows != source.rows:
        raise RuntimeError(f"induce: {rows} of {source.rows} prompts have both answers in "
                           f"{run.uri_of('induce', 'parts')}; rerun to answer the rest")
    # Unguided answers the refusal detector does not call refusals: a proxy, not judged mistakes.
    return StageOutput(rows, "data", {
        "quarantined": source.quarantined, **stats.metrics(),
        "unguided_non_refusal_rate": counts["unguided_answered"] / rows,
        "guided_refusal_rate": counts["guided_refused"] / rows,
    })
