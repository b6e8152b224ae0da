"""GPU benchmark of the training core without Ray: a random-init Llama of TinyLlama's shape
(1.1B), micro-batches of 8 x 2048 tokens in bf16; tokens/s and MFU against plain torch.

A lent GPU machine has torch, transformers and DeepSpeed but neither Ray nor vLLM, so nothing
here imports them: run it there as ``python -m ray_align.bench.gpu``. ``--shape smoke`` runs the
same code on a CPU in seconds (the CI smoke test; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from ray_align.bench.common import contender_main, free_port, machine, print_table, side_by_side

SHAPES: dict[str, dict[str, int]] = {
    "tinyllama-1.1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                       "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000},
    "smoke": {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 512},
}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, per GPU
CONTENDERS = ("core", "torch", "torch_compile")  # core: the training core Ray Train workers run
TARGETS = {"torch_compile": 1.0}  # the training core ahead of compiled plain torch
MFU_TARGET = 0.45


def random_model(shape: str, device: str):
    """A randomly initialised Llama in fp32 weights (the optimizer's master copy), on device."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, attn_implementation="sdpa")
    config.use_cache = False
    return LlamaForCausalLM(config).to(device).train()


def random_batches(spec: dict[str, Any], vocab: int, device: str):
    """Full-length rows of random tokens (what sequence packing gives): every position a target."""
    import torch

    generator = torch.Generator().manual_seed(spec["seed"])
    for _ in range(spec["warmup"] + spec["steps"]):
        ids = torch.randint(0, vocab, (spec["micro_batch"], spec["seq_len"]), generator=generator)
        yield {"input_ids": ids.to(device), "labels": ids.to(device)}


def _timed_loop(spec: dict[str, Any], step, batches, device: str) -> dict[str, Any]:
    """Run warm-up steps untimed (compilation, allocator), then time the rest."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    began = None
    for index, batch in enumerate(batches):
        if index == spec["warmup"]:
            sync()
            began = time.perf_counter()
        step(batch)
    sync()
    loop_s = time.perf_counter() - began
    tokens = spec["steps"] * spec["micro_batch"] * spec["seq_len"]
    peak = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None
    return {"loop_s": loop_s, "tokens": tokens, "tok_s": tokens / loop_s, "gpu_peak_gb": peak}


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_plain_torch(spec: dict[str, Any], compile_model: bool = False) -> dict[str, Any]:
    """Plain torch: fp32 weights, bf16 autocast on a GPU, torch's fused AdamW."""
    import torch

    device = _device()
    model = random_model(spec["shape"], device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95),
                                  fused=device == "cuda")
    forward = torch.compile(model, backend=spec["compile_backend"]) if compile_model else model

    def step(batch):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = forward(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return _timed_loop(spec, step, random_batches(spec, model.config.vocab_size, device), device)


def run_core(spec: dict[str, Any]) -> dict[str, Any]:
    """ray_align's training core as each Ray Train worker runs it (DeepSpeed ZeRO-2 engine,
    ``train_step``), in one process with a world of one."""
    import deepspeed

    from ray_align.config import TrainConfig
    from ray_align.training.core import deepspeed_engine, train_step

    device = _device()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")
    train = TrainConfig(zero_stage=2, micro_batch_size=spec["micro_batch"], grad_accum=1,
                        lr=1e-4, precision="bf16" if device == "cuda" else "fp32",
                        use_gpu=device == "cuda")
    model = random_model(spec["shape"], device)
    engine = deepspeed_engine(model, train, world_size=1)
    batches = random_batches(spec, model.config.vocab_size, device)  # train_step moves them
    return _timed_loop(spec, lambda batch: train_step(engine, batch), batches, device)


def parameter_count(shape: str) -> int:
    """Parameters of the shape's model (embeddings and head included), without building it."""
    s = SHAPES[shape]
    h, inter, vocab = s["hidden_size"], s["intermediate_size"], s["vocab_size"]
    layers = s["num_hidden_layers"]
    kv = h * s["num_key_value_heads"] // s["num_attention_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h  # q, o; k, v; MLP; two norms
    return 2 * vocab * h + layers * per_layer + h  # embeddings, untied head, final norm


def peak_tflops(given: float | None) -> float | None:
    """The card's dense bf16 peak, from its name unless given; None on a CPU or unknown card."""
    if given:
        return given
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def bench(shape: str = "tinyllama-1.1b", micro_batch: int = 8, seq_len: int = 2048, steps: int = 20,
          warmup: int = 5, contenders: tuple[str, ...] = CONTENDERS, repeats: int = 1,
          peak: float | None = None, compile_backend: str = "inductor") -> dict[str, Any]:
    spec = {"shape": shape, "micro_batch": micro_batch, "seq_len": seq_len, "steps": steps,
            "warmup": warmup, "seed": 0, "compile_backend": compile_backend}
    # by name: run as ``python -m``, this module's __name__ is "__main__"
    rows, runs, targets = side_by_side("ray_align.bench.gpu", contenders, spec, repeats, "tok_s",
                                       TARGETS, mine="core")
    tflops = peak_tflops(peak)
    flops_per_token = 6 * parameter_count(shape)  # the references' convention: attention left out
    for row in rows:
        row["mfu"] = row["tok_s"] * flops_per_token / (tflops * 1e12) if tflops else None
    mine = next((r for r in rows if r["contender"] == "core"), None)
    if mine and mine["mfu"] is not None:
        targets["mfu"] = {"target": MFU_TARGET, "measured": mine["mfu"], "met": mine["mfu"] >= MFU_TARGET}
    table = print_table(
        f"GPU training core: {shape} ({parameter_count(shape) / 1e9:.2f}B), micro-batch "
        f"{micro_batch} x {seq_len}, {steps} timed steps after {warmup}, peak "
        f"{tflops or 'unknown'} TFLOP/s",
        rows, [("contender", "contender"), ("tok_s", "tokens/s"), ("mfu", "MFU"),
               ("gpu_peak_gb", "GPU peak GB"), ("ray_align_x", "core x")])
    return {"benchmark": "gpu", "spec": spec, "results": rows, "runs": runs, "targets": targets,
            "table": table}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ray_align.bench.gpu",
        description="The training core (DeepSpeed ZeRO-2, no Ray) against plain torch and "
                    "torch.compile on one GPU: tokens/s and MFU. Needs torch, transformers and "
                    "DeepSpeed only.")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama-1.1b")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation)")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak "
                        "(default: known from its name: H100, H200, A100)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of the torch_compile contender (the CPU smoke "
                             "test uses aot_eager: the same tracing without a C++ build)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    result = bench(args.shape, args.micro_batch, args.seq_len, args.steps, args.warmup,
                   tuple(c for c in args.contenders.split(",") if c), args.repeats, args.peak_tflops,
                   args.compile_backend)
    result["machine"] = machine()
    for name, verdict in result["targets"].items():
        print(f"target vs {name}: {verdict}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as out:
            json.dump(result, out, indent=2)
    return 0


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] in CONTENDERS:  # one contender, in its own process
        contender_main({"core": run_core, "torch": run_plain_torch,
                        "torch_compile": lambda spec: run_plain_torch(spec, compile_model=True)})
    else:
        sys.exit(main())
