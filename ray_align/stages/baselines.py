"""The baselines' shared data for ``ray-align compare``, generated once for every method:
the harmless answer (with the harmlessness hint) for SFT and Chain of Hindsight, and the
critique and revision of the model's natural answer for Critique-Revise."""

from __future__ import annotations

import pyarrow as pa

from ray_align import prompts
from ray_align.generate import generate, make_requests, results_by_id
from ray_align.pipeline import Context, StageOutput, labelled, write_quarantine

BASELINE_SCHEMA = pa.schema([
    ("id", pa.string()), ("instruction", pa.string()), ("category", pa.string()),
    ("harmful_response", pa.string()), ("initial_response", pa.string()),
    ("harmless_response", pa.string()), ("critique", pa.string()), ("revision", pa.string()),
])
MIN_CHARS = 20  # shorter generations are unusable as training targets


def baselines(ctx: Context) -> StageOutput:
    cfg, run = ctx.config, ctx.run
    induced = run.read_table("induce", "data.parquet").to_pylist()
    ctx.ensure_ray()
    sampling = cfg.compare.sampling
    keys, messages = [], []
    for r in induced:  # round 1: both need only the induce stage's output
        keys += [f"{r['id']}::harmless", f"{r['id']}::critique"]
        messages += [prompts.harmless_answer(r["instruction"]),
                     prompts.critique(r["instruction"], r["unguided_response"])]
    first = generate(run, ("baselines", "parts", "first"), make_requests(keys, messages), cfg.model,
                     cfg.engine, sampling, desc="baselines: harmless answers + critiques")
    answers = results_by_id(run, "baselines", "parts", "first")
    critiques = {r["id"]: answers[f"{r['id']}::critique"]["generated_text"].strip() for r in induced}
    revise = make_requests([r["id"] for r in induced],
                           [prompts.revision(r["instruction"], r["unguided_response"], critiques[r["id"]])
                            for r in induced])
    second = generate(run, ("baselines", "parts", "revision"), revise, cfg.model, cfg.engine, sampling,
                      desc="baselines: revisions")
    revisions = results_by_id(run, "baselines", "parts", "revision")
    out, bad = [], []
    for r in induced:
        row = {"id": r["id"], "instruction": r["instruction"], "category": r["category"],
               "harmful_response": r["guided_response"], "initial_response": r["unguided_response"],
               "harmless_response": answers[f"{r['id']}::harmless"]["generated_text"].strip(),
               "critique": critiques[r["id"]],
               "revision": revisions[r["id"]]["generated_text"].strip()}
        short = [k for k in ("harmless_response", "revision") if len(row[k]) < MIN_CHARS]
        if short:
            bad.append({"source": "baselines", "row": None, "id": r["id"],
                        "reason": f"{', '.join(short)} under {MIN_CHARS} characters"})
            continue
        out.append(row)
    if not out:
        raise RuntimeError("baselines: no usable row was generated; see baselines/quarantine.parquet")
    run.write_table(labelled(pa.Table.from_pylist(out, schema=BASELINE_SCHEMA), harmful=True),
                    "baselines", "data.parquet")
    tokens = first.output_tokens + second.output_tokens
    seconds = first.seconds + second.seconds
    return StageOutput(len(out), "data.parquet", {
        "unusable": write_quarantine(run, "baselines", bad), "output_tokens": tokens,
        "tokens_per_s": round(tokens / seconds, 1) if seconds else 0.0,
    })
