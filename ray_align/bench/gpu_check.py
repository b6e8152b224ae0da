"""Every GPU measurement of the training core in one run, written to ``docs/results/gpu-<card>.json``.

For a lent GPU machine (torch with CUDA, transformers, peft, accelerate; no Ray, no vLLM;
DeepSpeed only if carried as wheels): nothing here imports Ray. It runs, each in a fresh process:

- the benchmark (``ray_align.bench.gpu``): TinyLlama-shaped 1.1B random-init model, the
  pipeline's packed micro-batches, the core against plain torch and torch.compile; MFU as 6N and
  with attention, against the 45% target;
- the export of a small random-init Llama trained a few packed steps: full fine-tuning through
  ZeRO-3 gathering (when DeepSpeed is installed) and a LoRA adapter merged into the base, each
  reloaded by transformers and compared with the trained model's logits.

Run from the repository root: ``python -m ray_align.bench.gpu_check`` (``--quick`` for a short
first look; ``--shape smoke`` runs it all on a CPU in a minute, numbers meaningless).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ray_align.bench.common import BenchError, contender_main, free_port, machine, run_contender

SMALL = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 512}


def default_attention() -> str:
    """flash-attention's varlen kernel where the package is installed, else SDPA with the
    block-diagonal mask transformers builds from the position ids."""
    return "flash_attention_2" if importable("flash_attn") else "sdpa"


def importable(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _small_model(folder: str) -> str:
    """A random-init Llama saved as a Hugging Face directory (the base to train and export)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SMALL)).save_pretrained(folder, safe_serialization=True)
    return folder


def _packed(count: int = 2) -> list[dict[str, Any]]:
    """A few packed micro-batches of random rows, as training builds them."""
    import numpy as np

    from ray_align.training.core import micro_batches

    rng = np.random.default_rng(0)
    lengths = rng.integers(8, 120, size=16)
    window = {"input_ids": [rng.integers(1, SMALL["vocab_size"], size=n) for n in lengths],
              "prompt_len": [max(1, n // 3) for n in lengths]}
    return list(micro_batches([window], 0, size=2, seed=0, pack_len=256))[:count]


def _same_logits(reloaded, reference, batch: dict[str, Any], device: str) -> float:
    """Largest absolute difference of the two models' logits on a packed micro-batch."""
    import torch

    from ray_align.training.core import model_inputs

    inputs = {k: v for k, v in model_inputs(batch, device).items() if k != "labels"}
    with torch.no_grad():
        return float((reloaded(**inputs).logits.float() - reference(**inputs).logits.float())
                     .abs().max())


def check_lora_merge(spec: dict[str, Any]) -> dict[str, Any]:
    """LoRA: train the adapter a few steps (plain torch), save it, merge into the base, reload."""
    import torch
    from transformers import AutoModelForCausalLM

    from ray_align.config import LoraConfig
    from ray_align.training.core import (
        adapter_state_dict,
        export_merged_model,
        load_model,
        model_inputs,
        save_adapter,
    )

    device = spec["device"]
    with tempfile.TemporaryDirectory() as folder:
        base = _small_model(os.path.join(folder, "base"))
        model = load_model(base, lora=LoraConfig(r=4, alpha=8, dropout=0.0)).to(device).train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        batches = _packed()
        for batch in batches * 3:
            model(**model_inputs(batch, device)).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        adapter = adapter_state_dict(model, zero_stage=0, rank=0)
        save_adapter(model, adapter, os.path.join(folder, "adapter"))
        export_merged_model(base, os.path.join(folder, "adapter"), os.path.join(folder, "model"),
                            dtype=torch.float32)
        merged = AutoModelForCausalLM.from_pretrained(os.path.join(folder, "model")).to(device)
        model.eval()
        diff = _same_logits(merged, model, batches[0], device)
    return {"max_logit_diff": diff, "ok": diff < 1e-3}


def check_zero3_export(spec: dict[str, Any]) -> dict[str, Any]:
    """Full fine-tuning under DeepSpeed ZeRO-3 (world of one): gather, export, reload."""
    if not importable("deepspeed"):
        return {"skipped": "DeepSpeed is not installed (carry its wheel to run this)"}
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM

    from ray_align.config import TrainConfig
    from ray_align.training.core import (
        deepspeed_engine,
        export_full_model,
        full_state_dict,
        load_model,
        train_step,
    )

    device = spec["device"]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")
    train = TrainConfig(zero_stage=3, precision="fp32", micro_batch_size=2, lr=1e-2,
                        use_gpu=device == "cuda")
    with tempfile.TemporaryDirectory() as folder:
        base = _small_model(os.path.join(folder, "base"))
        engine = deepspeed_engine(load_model(base), train, world_size=1)
        batches = _packed()
        losses = [train_step(engine, batch)[0] for batch in batches * 3]
        state = full_state_dict(engine, 3, rank=0)
        export_full_model(state, base, os.path.join(folder, "model"), dtype=torch.float32)
        reloaded = AutoModelForCausalLM.from_pretrained(os.path.join(folder, "model")).to(device)
        engine.eval()
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            diff = _same_logits(reloaded, engine.module, batches[0], device)
    return {"losses": losses, "max_logit_diff": diff, "ok": diff < 1e-3 and losses[-1] < losses[0]}


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def card_name() -> str:
    """The card's name as a file-name part: ``gpu-nvidia-h200.json``; ``cpu`` without one."""
    import torch

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _checked(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """One check in a fresh process; its failure is recorded, never hides the others."""
    try:
        return run_contender("ray_align.bench.gpu_check", name, spec, timeout_s=spec["timeout_s"])
    except (BenchError, OSError, ValueError) as exc:
        return {"error": str(exc)[-2000:]}
    except Exception as exc:  # noqa: BLE001 - a timeout or anything else: recorded, go on
        return {"error": f"{type(exc).__name__}: {exc}"[-2000:]}


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    """The benchmark, then the export checks; everything in one JSON document."""
    from ray_align.bench import gpu

    started = time.perf_counter()
    result: dict[str, Any] = {"check": "gpu", "date": time.strftime("%Y-%m-%d"),
                              "machine": machine(), "attention": args.attn}
    try:
        result["benchmark"] = gpu.bench(
            args.shape, args.micro_batch, args.seq_len, args.steps, args.warmup,
            tuple(c for c in args.contenders.split(",") if c), 1, args.peak_tflops,
            args.compile_backend, args.attn, args.zero_stage)
    except Exception as exc:  # noqa: BLE001 - the export checks still run and are recorded
        result["benchmark"] = {"error": f"{type(exc).__name__}: {exc}"[-3000:]}
    spec = {"device": _device(), "timeout_s": 900}
    result["export"] = {"lora_merge": _checked("lora_merge", spec),
                        "zero3_full": _checked("zero3_full", spec)}
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ray_align.bench.gpu_check",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="tinyllama-1.1b")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--contenders", default="core,torch,torch_compile")
    parser.add_argument("--peak-tflops", type=float)
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--attn", default=None, help="default: flash_attention_2 if installed, else sdpa")
    parser.add_argument("--zero-stage", type=int, default=2, choices=(0, 1, 2, 3))
    parser.add_argument("--quick", action="store_true", help="5 timed steps after 2")
    parser.add_argument("--out", help="default: docs/results/gpu-<card>.json")
    args = parser.parse_args(argv)
    args.attn = args.attn or default_attention()
    if args.quick:
        args.steps, args.warmup = 5, 2
    result = run_all(args)
    out = Path(args.out or f"docs/results/gpu-{card_name()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    print(f"[gpu_check] wrote {out} in {result['seconds']} s", flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] in ("lora_merge", "zero3_full"):
        contender_main({"lora_merge": check_lora_merge, "zero3_full": check_zero3_export})
    else:
        sys.exit(main())
