"""Peak host memory per rank while two gloo ranks load the embedded SmolLM2-135M for ZeRO-3,
without and with ``partitioned_loading`` (measured for docs/performance.md; no Ray, no GPU).

    .venv/bin/python scripts/zero3_load_memory.py plain
    .venv/bin/python scripts/zero3_load_memory.py partitioned
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

import torch
import torch.multiprocessing as mp

PORT = "29611"


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (VmHWM), in MB."""
    with open("/proc/self/status") as status:
        line = next(x for x in status if x.startswith("VmHWM"))
    return int(line.split()[1]) / 1024


def worker(rank: int, partitioned: bool, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=PORT, RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_SIZE="2")
    import deepspeed

    from ray_align.assets import MODEL_NAME, asset_home
    from ray_align.config import TrainConfig
    from ray_align.training.core import load_model, partitioned_loading
    from ray_align.training.deepspeed_config import deepspeed_config

    deepspeed.init_distributed(dist_backend="gloo")
    train = TrainConfig(zero_stage=3, precision="fp32")
    before = peak_rss_mb()
    loading = partitioned_loading(deepspeed_config(train, 2)) if partitioned else contextlib.nullcontext()
    with loading:
        model = load_model(str(asset_home() / MODEL_NAME), dtype=torch.float32)
    local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())
    out[rank] = {"rss_before_mb": round(before), "peak_rss_mb": round(peak_rss_mb()),
                 "load_delta_mb": round(peak_rss_mb() - before), "local_params": local}
    torch.distributed.barrier()


if __name__ == "__main__":
    variant = sys.argv[1]
    results = mp.Manager().dict()
    mp.spawn(worker, args=(variant == "partitioned", results), nprocs=2)
    print(json.dumps({"variant": variant, "ranks": dict(sorted(results.items()))}))
