"""The baselines' shared data for ``ray-align compare``, generated once for every method:
the harmless answer (with the harmlessness hint) for SFT and Chain of Hindsight, and the
critique and revision of the model's natural answer for Critique-Revise."""

from __future__ import annotations

import pyarrow as pa

from ray_align import prompts
from ray_align.generate import generate, make_requests, pool_metrics, results_by_id
from ray_align.pipeline import Context, StageOutput, with_harm_label
from ray_align.stages.common import set_aside_short, tokens_per_s

BASELINE_SCHEMA = pa.schema([
    ("id", pa.string()), ("instruction", pa.string()), ("category", pa.string()),
    ("harmful_response", pa.string()), ("initial_response", pa.string()),
    ("harmless_response", pa.string()), ("critique", pa.string()), ("revision", pa.string()),
])
MIN_CHARS = 20  # shorter generations are unusable as training targets


def baselines(ctx: Context) -> StageOutput:
    cfg, run = ctx.config, ctx.run
    induced = run.read_tables("induce", "data").to_pylist()
    ctx.ensure_ray()
    sampling = cfg.compare.sampling
    keys, messages = [], []
    for r in induced:  # round 1: both need only the induce stage's output
        keys += [f"{r['id']}::harmless", f"{r['id']}::critique"]
        messages += [prompts.harmless_answer(r["instruction"]),
                     prompts.critique(r["instruction"], r["unguided_response"])]
    first = generate(run, ("baselines", "parts", "first"), make_requests(keys, messages), cfg.model,
                     cfg.engine, sampling, desc="baselines: harmless answers + critiques",
                     engines=ctx.engines)
    answers = results_by_id(run, "baselines", "parts", "first")
    critiques = {r["id"]: answers[f"{r['id']}::critique"]["generated_text"].strip() for r in induced}
    revise = make_requests([r["id"] for r in induced],
                           [prompts.revision(r["instruction"], r["unguided_response"], critiques[r["id"]])
                            for r in induced])
    second = generate(run, ("baselines", "parts", "revision"), revise, cfg.model, cfg.engine, sampling,
                      desc="baselines: revisions", engines=ctx.engines)
    revisions = results_by_id(run, "baselines", "parts", "revision")
    rows = [{"id": r["id"], "instruction": r["instruction"], "category": r["category"],
             "harmful_response": r["guided_response"], "initial_response": r["unguided_response"],
             "harmless_response": answers[f"{r['id']}::harmless"]["generated_text"].strip(),
             "critique": critiques[r["id"]],
             "revision": revisions[r["id"]]["generated_text"].strip()}
            for r in induced]
    out, unusable = set_aside_short(run, "baselines", rows, ("harmless_response", "revision"),
                                    MIN_CHARS, "row")
    run.write_table(with_harm_label(pa.Table.from_pylist(out, schema=BASELINE_SCHEMA), harmful=True),
                    "baselines", "data.parquet")
    tokens = first.output_tokens + second.output_tokens
    return StageOutput(len(out), "data.parquet", {
        "unusable": unusable, "output_tokens": tokens,
        "tokens_per_s": tokens_per_s(tokens, first.seconds + second.seconds),
        **pool_metrics([first, second]),
    })
