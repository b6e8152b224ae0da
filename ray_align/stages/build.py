"""Step 3, the fine-tuning set: unguided analysis samples (instruction and induced response shown
without saying they are harmful; the target is the analysis) mixed with helpful instruction data.
Deduplicated, length-filtered against the model's context, split into train and validation."""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter

import pyarrow as pa

from ray_align import prompts
from ray_align.methods import Sample, mistake_analysis_samples
from ray_align.pipeline import Context, StageOutput, with_harm_label, write_quarantine
from ray_align.sources import load_source
from ray_align.tokenization import encode_sample, load_tokenizer

SAMPLE_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("kind", pa.string(), nullable=False),  # "analysis", "helpful" or a baseline's kind
    pa.field("messages", pa.string(), nullable=False),  # JSON chat messages (the prompt)
    pa.field("target", pa.string(), nullable=False),
    pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("prompt_len", pa.int32(), nullable=False),
    pa.field("num_tokens", pa.int32(), nullable=False),
    # a preference pair's rejected answer after the same prompt (empty for every other sample)
    pa.field("rejected", pa.string(), nullable=False),
    pa.field("rejected_ids", pa.list_(pa.int32()), nullable=False),
])


def _in_validation(row_id: str, fraction: float, seed: int) -> bool:
    digest = hashlib.sha256(f"{seed}:{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def build(ctx: Context) -> StageOutput:
    """Mistake analysis samples (analyze's output) mixed with helpful data, into ``build/``."""
    analyses = ctx.run.read_tables("analyze", "data").to_pylist()
    kept = kept_analyses(ctx, analyses)
    out = write_samples(ctx, "build", mistake_analysis_samples(kept, []))
    if ctx.config.build.drop_analyses:
        out.metrics["analyses_dropped_judged_harmful"] = len(analyses) - len(kept)
    return out


def kept_analyses(ctx: Context, analyses: list[dict]) -> list[dict]:
    """The analyses fine-tuning learns from: all of them, or with ``build.drop_analyses:
    judged_harmful`` those the offline judge finds harmless as answers to their instruction."""
    if not ctx.config.build.drop_analyses or not analyses:
        return analyses
    from ray_align.judges.offline import OfflineJudge

    scores = OfflineJudge.load().score([r["instruction"] for r in analyses],
                                       [r["analysis"] for r in analyses])
    kept = [r for r, score in zip(analyses, scores, strict=True) if not score.harmful]
    print(f"[build] left out {len(analyses) - len(kept)} of {len(analyses)} analyses the offline "
          "judge found harmful (build.drop_analyses)", flush=True)
    return kept


def helpful_samples(ctx: Context, folder: str) -> tuple[list[Sample], list[dict]]:
    """The helpful samples every trained method mixes in, chosen once for all of them:
    ``build.helpful_ratio`` x the induced instructions (``induce``'s rows, shared by every
    method), from ``data.helpful`` shuffled with ``build.seed``; and the quarantined rows.
    A method that keeps fewer samples of its own still gets exactly these."""
    cfg = ctx.config
    helpful = load_source(cfg.data.helpful, cfg.data.max_prompt_chars, cfg.data.on_bad_row, "helpful")
    rows = helpful.table.to_pylist()
    random.Random(cfg.build.seed).shuffle(rows)
    wanted = round(cfg.build.helpful_ratio * ctx.run.count_rows("induce", "data"))
    if wanted > len(rows):
        print(f"[{folder}] asked for {wanted} helpful samples, {len(rows)} available: using all")
    samples = [Sample(f"helpful-{r['id']}", "helpful", prompts.helpful_sample_prompt(r["prompt"]),
                      r["response"]) for r in rows[:wanted]]
    return samples, helpful.quarantined


def write_samples(ctx: Context, folder: str, samples: list[Sample]) -> StageOutput:
    """Mix ``samples`` with the helpful samples (``helpful_samples``: the same ones for every
    method), deduplicate, tokenize, drop what exceeds the context, split into train and
    validation, and write both under ``folder``."""
    cfg, run = ctx.config, ctx.run
    tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
    helpful, quarantined = helpful_samples(ctx, folder)
    candidates = samples + helpful

    max_len, seen = cfg.max_seq_len, set()
    rows, dropped = {"train": [], "validation": []}, {"duplicate": 0, "too_long": 0}
    for sample_id, kind, messages, target, rejected in candidates:
        text_key = json.dumps([messages, target, rejected])
        if text_key in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(text_key)
        ids, prompt_len = encode_sample(tokenizer, messages, target)
        # the same prompt, so the same prompt tokens: only the answers differ
        rejected_ids = encode_sample(tokenizer, messages, rejected)[0] if rejected is not None else []
        if max(len(ids), len(rejected_ids)) > max_len:
            dropped["too_long"] += 1
            continue
        split = "validation" if _in_validation(sample_id, cfg.build.val_fraction, cfg.build.seed) else "train"
        rows[split].append({"id": sample_id, "kind": kind, "messages": json.dumps(messages),
                            "target": target, "input_ids": ids, "prompt_len": prompt_len,
                            "num_tokens": len(ids) + len(rejected_ids),
                            "rejected": rejected or "", "rejected_ids": rejected_ids})
    if not rows["train"]:
        raise RuntimeError(f"{folder}: no training samples left after deduplication and length filter")
    # Mixed order: each training worker reads a contiguous share, which must hold both kinds
    # (and like amounts of tokens, or one worker waits on the other every step).
    random.Random(cfg.build.seed).shuffle(rows["train"])
    for split, items in rows.items():
        table = pa.Table.from_pylist(items, schema=SAMPLE_SCHEMA)
        run.write_table(with_harm_label(table, harmful=True), folder, f"{split}.parquet")
    if any(dropped.values()):
        print(f"[{folder}] dropped {dropped['duplicate']} duplicates and {dropped['too_long']} samples "
              f"longer than {max_len} tokens")
    kinds = Counter(dict.fromkeys([*(c.kind for c in samples), "helpful"], 0))  # all dropped: 0
    kinds.update(r["kind"] for r in rows["train"])
    return StageOutput(len(rows["train"]) + len(rows["validation"]), "train.parquet", {
        "train_rows": len(rows["train"]), "validation_rows": len(rows["validation"]),
        **{f"{kind}_samples": count for kind, count in sorted(kinds.items())},
        "train_tokens": sum(r["num_tokens"] for r in rows["train"]),
        "dropped_duplicates": dropped["duplicate"], "dropped_too_long": dropped["too_long"],
        "quarantined": write_quarantine(run, folder, quarantined),
    })
