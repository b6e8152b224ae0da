"""Training benchmark: ray_align's train stage (Ray Train + DeepSpeed ZeRO, data from Ray Data)
against the same DeepSpeed loop without Ray, and against a plain single-process torch loop.

Same model, rows (token ids), global batch, length grouping and packing (``train.packing``).
Tokens are real (unpadded) tokens; tokens/s is measured over the training loop, start-up reported apart.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

from ray_align.bench.common import contender_main, free_port, print_table, side_by_side

CONTENDERS = ("ray_align", "deepspeed", "torch")
TARGETS = {"deepspeed": 0.95}  # ray_align's loop tok/s over the same loop without Ray, at least


def _windows(rows: list[list], micro: int):
    """Column batches of 16 micro-batches, as the Ray worker reads them."""
    from ray_align.training.ray_worker import LENGTH_GROUP_WINDOW

    step = micro * LENGTH_GROUP_WINDOW
    for i in range(0, len(rows), step):
        chunk = rows[i : i + step]
        yield {"input_ids": [r[0] for r in chunk], "prompt_len": [r[1] for r in chunk]}


def run_ray_align(spec: dict[str, Any]) -> dict[str, Any]:
    """The train stage itself, on a run directory holding only the benchmark's rows."""
    import pyarrow as pa

    from ray_align.config import Config
    from ray_align.pipeline import Context
    from ray_align.stages.train import train
    from ray_align.storage import RunDir

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        config = Config.model_validate({**spec["config"], "run_dir": folder})
        run = RunDir(folder)
        for split, rows in (("train", spec["rows"]), ("validation", spec["rows"][:8])):
            table = pa.table({"input_ids": pa.array([r[0] for r in rows], pa.list_(pa.int32())),
                              "prompt_len": pa.array([r[1] for r in rows], pa.int32())})
            run.write_table(table, "build", f"{split}.parquet")
        out = train(Context(config=config, run=run))
    stage_s = time.perf_counter() - started
    loop_s = out.metrics["train_seconds"]
    return {"start_s": stage_s - loop_s, "loop_s": loop_s, "tokens": out.metrics["tokens"],
            "loop_tok_s": out.metrics["tokens_per_s"], "total_s": stage_s}


def _deepspeed_rank(rank: int, spec: dict[str, Any], port: int, queue) -> None:
    import torch
    import torch.distributed as dist

    from ray_align.config import ModelConfig, TrainConfig
    from ray_align.training.core import (
        deepspeed_engine,
        load_model,
        micro_batches,
        real_tokens,
        train_step,
        training_dtype,
    )

    train, model_cfg = TrainConfig(**spec["config"]["train"]), ModelConfig(**spec["config"]["model"])
    world = train.num_workers
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_SIZE=str(world))
    torch.set_num_threads(max(1, int(train.cpus_per_worker)))  # what Ray gives each worker
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = load_model(model_cfg.path, dtype=training_dtype(train), lora=train.lora)
    engine = deepspeed_engine(model, train, world)
    share = len(spec["rows"]) // world
    rows = spec["rows"][rank * share : (rank + 1) * share]
    dist.barrier()
    began, tokens = time.perf_counter(), 0
    for batch in micro_batches(_windows(rows, train.micro_batch_size), spec["pad_id"],
                               train.micro_batch_size, seed=train.seed, pack_len=spec["pack_len"]):
        train_step(engine, batch)
        tokens += real_tokens(batch)
    dist.barrier()
    loop_s = time.perf_counter() - began
    total = torch.tensor([tokens])
    dist.all_reduce(total)
    if rank == 0:
        queue.put({"loop_s": loop_s, "tokens": int(total)})
    dist.destroy_process_group()


def run_deepspeed(spec: dict[str, Any]) -> dict[str, Any]:
    """The same DeepSpeed ZeRO loop and workers, started by torch.multiprocessing, no Ray."""
    import torch.multiprocessing as mp

    started = time.perf_counter()
    port = free_port()
    context = mp.get_context("spawn")
    queue = context.Queue()
    world = spec["config"]["train"]["num_workers"]
    procs = [context.Process(target=_deepspeed_rank, args=(r, spec, port, queue)) for r in range(world)]
    for proc in procs:
        proc.start()
    result = queue.get(timeout=3600)
    for proc in procs:
        proc.join()
    total_s = time.perf_counter() - started
    return {"start_s": total_s - result["loop_s"], "loop_s": result["loop_s"],
            "tokens": result["tokens"], "loop_tok_s": result["tokens"] / result["loop_s"],
            "total_s": total_s}


def run_torch(spec: dict[str, Any]) -> dict[str, Any]:
    """Plain torch: one process on all the cores, AdamW, the same global batch."""
    import torch

    from ray_align.config import ModelConfig, TrainConfig
    from ray_align.training.core import load_model, micro_batches, model_inputs, real_tokens, training_dtype

    started = time.perf_counter()
    train, model_cfg = TrainConfig(**spec["config"]["train"]), ModelConfig(**spec["config"]["model"])
    torch.set_num_threads(spec["num_cpus"])
    model = load_model(model_cfg.path, dtype=training_dtype(train), lora=train.lora).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=train.lr,
                                  betas=(0.9, 0.95), weight_decay=train.weight_decay)
    micro = train.micro_batch_size * train.num_workers
    began, tokens = time.perf_counter(), 0
    for batch in micro_batches(_windows(spec["rows"], micro), spec["pad_id"], micro, seed=train.seed,
                               pack_len=spec["pack_len"]):
        model(**model_inputs(batch)).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += real_tokens(batch)
    loop_s = time.perf_counter() - began
    return {"start_s": began - started, "loop_s": loop_s, "tokens": tokens,
            "loop_tok_s": tokens / loop_s, "total_s": time.perf_counter() - started}


def training_rows(config, count: int) -> tuple[list[list], int]:
    """Token ids of the embedded helpful set (instruction -> response), repeated to ``count``."""
    from ray_align.sources import load_source
    from ray_align.tokenization import encode_sample, load_tokenizer, pad_token_id

    tokenizer = load_tokenizer(config.model.path, config.model.trust_remote_code)
    table = load_source(config.data.helpful, config.data.max_prompt_chars, "quarantine", "helpful").table
    base = [encode_sample(tokenizer, [{"role": "user", "content": p}], r)
            for p, r in zip(table.column("prompt").to_pylist(), table.column("response").to_pylist(),
                            strict=True)]
    rows = [list(base[i % len(base)]) for i in range(count)]
    return rows, pad_token_id(tokenizer)


def bench(config, rows: int = 128, repeats: int = 1,
          contenders: tuple[str, ...] = CONTENDERS) -> dict[str, Any]:
    """Run every contender ``repeats`` times, interleaved; medians, ratios and the table."""
    data, pad_id = training_rows(config, rows)
    cfg = config.model_copy(deep=True)
    cfg.train.epochs, cfg.train.max_steps, cfg.train.checkpoint_every_steps = 1, None, None
    spec = {"config": cfg.model_dump(mode="json"), "rows": data, "pad_id": pad_id,
            "pack_len": config.max_seq_len if config.train.packing else None,  # as the train stage
            "num_cpus": config.ray.num_cpus or os.cpu_count()}
    results, runs, targets = side_by_side(__name__, contenders, spec, repeats, "loop_tok_s", TARGETS)
    t = config.train
    table = print_table(
        f"training: {rows} rows, ZeRO-{t.zero_stage} x {t.num_workers} workers, micro-batch "
        f"{t.micro_batch_size}, {t.precision}, {config.model.path}",
        results, [("contender", "contender"), ("start_s", "start s"), ("loop_s", "loop s"),
                  ("tokens", "tokens"), ("loop_tok_s", "loop tok/s"), ("peak_gb", "peak GB"),
                  ("ray_align_x", "ray_align x")])
    return {"benchmark": "training", "rows": rows, "results": results, "runs": runs,
            "targets": targets, "table": table}


if __name__ == "__main__":
    contender_main({"ray_align": run_ray_align, "deepspeed": run_deepspeed, "torch": run_torch})
