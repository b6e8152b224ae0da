"""Sequence packing against padded micro-batches, on the CPU, on the quickstart's training data.

Both contenders run the training loop of one worker in one process (the model, LoRA, precision
and micro-batch size of the config; the windows, ordering and collation of the Ray worker;
torch's fused AdamW), each in a fresh process, interleaved: tokens/s over the loop counts real
tokens only, peak RSS is the process's own. Run as
``python -m ray_align.bench.packing [--config configs/quickstart.yaml] [--rows 24] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from typing import Any

from ray_align.bench.common import contender_main, machine, print_table, side_by_side, write_json

CONTENDERS = ("packed", "padded")


def _windows(rows: list[list], micro: int):
    """Column batches of ``LENGTH_GROUP_WINDOW`` micro-batches' rows, as the worker reads them."""
    from ray_align.training.ray_worker import LENGTH_GROUP_WINDOW

    step = micro * LENGTH_GROUP_WINDOW
    for i in range(0, len(rows), step):
        chunk = rows[i : i + step]
        yield {"input_ids": [r[0] for r in chunk], "prompt_len": [r[1] for r in chunk]}


def run_loop(spec: dict[str, Any], packed: bool) -> dict[str, Any]:
    """One worker's loop over the rows: forward, backward, an optimizer step every
    ``grad_accum`` micro-batches."""
    import torch

    from ray_align.config import ModelConfig, TrainConfig
    from ray_align.training.core import load_model, micro_batches, model_inputs, real_tokens, training_dtype

    train, model_cfg = TrainConfig(**spec["train"]), ModelConfig(**spec["model"])
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(train.seed)
    model = load_model(model_cfg.path, dtype=training_dtype(train), lora=train.lora,
                       gradient_checkpointing=train.gradient_checkpointing).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=train.lr,
                                  betas=(0.9, 0.95), fused=True)
    batches = micro_batches(_windows(spec["rows"], train.micro_batch_size), spec["pad_id"],
                            train.micro_batch_size, seed=train.seed,
                            pack_len=spec["max_seq_len"] if packed else None)
    began, tokens, micro = time.perf_counter(), 0, 0
    for micro, batch in enumerate(batches, start=1):
        model(**model_inputs(batch)).loss.backward()
        tokens += real_tokens(batch)
        if micro % train.grad_accum == 0:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    loop_s = time.perf_counter() - began
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux
    return {"loop_s": loop_s, "tokens": tokens, "micro_batches": micro,
            "tok_s": tokens / loop_s, "peak_rss_gb": peak_rss}


def bench(config, rows: int, repeats: int, threads: int) -> dict[str, Any]:
    """Both contenders ``repeats`` times, interleaved; medians and the table."""
    from ray_align.assets import resolve
    from ray_align.bench.training import training_rows

    model = config.model.model_copy(update={"path": resolve(config.model.path)})
    config = config.model_copy(update={"model": model})
    data, pad_id = training_rows(config, rows)
    spec = {"train": config.train.model_dump(mode="json"), "model": model.model_dump(mode="json"),
            "rows": data, "pad_id": pad_id, "max_seq_len": config.max_seq_len, "threads": threads}
    # by name: run as ``python -m``, this module's __name__ is "__main__"
    results, runs, _ = side_by_side("ray_align.bench.packing", CONTENDERS, spec, repeats, "tok_s",
                                    {}, mine="packed")
    t = config.train
    lengths = sorted(len(r[0]) for r in data)
    table = print_table(
        f"packing: {rows} rows (tokens per row: median {lengths[len(lengths) // 2]}, max "
        f"{lengths[-1]}), max_seq_len {config.max_seq_len}, micro-batch {t.micro_batch_size} x "
        f"{t.grad_accum} accumulation, {t.precision}, LoRA {'r=' + str(t.lora.r) if t.lora else 'off'}, "
        f"{threads} threads, median of {repeats}",
        results, [("contender", "contender"), ("micro_batches", "micro-batches"), ("tokens", "tokens"),
                  ("loop_s", "loop s"), ("tok_s", "tokens/s"), ("peak_rss_gb", "peak RSS GB"),
                  ("ray_align_x", "packed x")])
    return {"benchmark": "packing", "rows": rows, "results": results, "runs": runs, "table": table}


def main(argv: list[str] | None = None) -> int:
    from ray_align.config import load_config

    parser = argparse.ArgumentParser(prog="python -m ray_align.bench.packing",
                                     description="Packed against padded training micro-batches.")
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--rows", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    result = bench(load_config(args.config), args.rows, args.repeats, args.threads)
    result["machine"] = machine()
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] in CONTENDERS:  # one contender, in its own process
        contender_main({"packed": lambda spec: run_loop(spec, True),
                        "padded": lambda spec: run_loop(spec, False)})
    else:
        sys.exit(main())
