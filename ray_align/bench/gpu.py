"""GPU benchmark of the training core without Ray: a random-init Llama of TinyLlama's shape
(1.1B) in bf16, fed the pipeline's own workload: rows of a realistic length distribution
(synthetic token ids) packed into micro-batches of 8 sequences of up to 2048 tokens by the same
code as training (``training.core.micro_batches``); tokens/s (real tokens) and MFU, both as 6N
and counting attention, against plain torch.

A lent GPU machine has torch, transformers and DeepSpeed but neither Ray nor vLLM, so nothing
here imports them: run it there as ``python -m ray_align.bench.gpu``. ``--shape smoke`` runs the
same code on a CPU in seconds (the CI smoke test; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from ray_align.bench.common import (
    contender_main,
    free_port,
    machine,
    print_table,
    side_by_side,
    write_json,
)

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
ROW_LENGTH = {"median": 320, "sigma": 0.8, "min": 16, "prompt_share": 0.4}  # lognormal rows
WINDOW = 16  # micro-batches' rows read together, as the Ray worker's LENGTH_GROUP_WINDOW


def random_model(shape: str, device: str, attn: str = "sdpa"):
    """A randomly initialised Llama in fp32 weights (the optimizer's master copy), on device."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, attn_implementation=attn)
    config.use_cache = False
    return LlamaForCausalLM(config).to(device).train()


def row_lengths(count: int, max_len: int, seed: int) -> list[tuple[int, int]]:
    """(tokens, prompt tokens) of ``count`` rows: lognormal lengths (a long tail of long
    answers, as instruction data has), cut to ``max_len`` as the build stage cuts them."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = rng.lognormal(np.log(ROW_LENGTH["median"]), ROW_LENGTH["sigma"], size=count)
    lengths = np.clip(lengths.astype(int), ROW_LENGTH["min"], max_len)
    return [(int(n), max(1, int(n * ROW_LENGTH["prompt_share"]))) for n in lengths]


def packed_batches(spec: dict[str, Any], vocab: int, flat: bool = False):
    """The pipeline's micro-batches: synthetic rows packed by ``training.core.micro_batches``
    (sequences of up to ``seq_len``, ``micro_batch`` of them per micro-batch), on the host;
    as many as the warm-up and timed steps need."""
    import numpy as np

    from ray_align.training.core import micro_batches

    rng = np.random.default_rng(spec["seed"])
    need, made, window = spec["warmup"] + spec["steps"], 0, 0
    while True:
        rows = row_lengths(spec["micro_batch"] * WINDOW * 8, spec["seq_len"], spec["seed"] + window)
        columns = {"input_ids": [rng.integers(0, vocab, size=n) for n, _ in rows],
                   "prompt_len": [p for _, p in rows]}
        for batch in micro_batches([columns], 0, spec["micro_batch"], seed=spec["seed"] + window,
                                   pack_len=spec["seq_len"], flat=flat):
            if made == need:
                return
            made += 1
            yield batch
        window += 1


def attention_flops(batch: dict[str, Any], shape: str) -> float:
    """Attention's matmul FLOPs of one training step on a packed micro-batch, PaLM's convention
    (appendix B: 12 x layers x hidden x s per token of an s-token sample, forward and backward,
    the causal half not discounted), each sample its own length, padding left out."""
    s = SHAPES[shape]
    lengths = batch["sample_lengths"].tolist()
    return 12.0 * s["num_hidden_layers"] * s["hidden_size"] * sum(n * n for n in lengths)


def _timed_loop(spec: dict[str, Any], step, batches, device: str) -> dict[str, Any]:
    """Run warm-up steps untimed (compilation, allocator), then time the rest; tokens are the
    samples' real tokens, padding not counted."""
    import torch

    from ray_align.training.core import real_tokens

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    began, tokens, attn = None, 0, 0.0
    for index, batch in enumerate(batches):
        if index == spec["warmup"]:
            sync()
            began = time.perf_counter()
        if index >= spec["warmup"]:
            tokens += real_tokens(batch)
            attn += attention_flops(batch, spec["shape"])
        step(batch)
    sync()
    loop_s = time.perf_counter() - began
    peak = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None
    return {"loop_s": loop_s, "tokens": tokens, "tok_s": tokens / loop_s,
            "attn_flops_per_token": attn / tokens, "gpu_peak_gb": peak}


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_plain_torch(spec: dict[str, Any], compile_model: bool = False) -> dict[str, Any]:
    """Plain torch: fp32 weights, bf16 autocast on a GPU, torch's fused AdamW."""
    import torch

    from ray_align.training.core import model_inputs, uses_varlen_attention

    device = _device()
    model = random_model(spec["shape"], device, spec["attn"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95),
                                  fused=device == "cuda")
    forward = torch.compile(model, backend=spec["compile_backend"]) if compile_model else model

    def step(batch):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = forward(**model_inputs(batch, device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    batches = packed_batches(spec, model.config.vocab_size, uses_varlen_attention(model))
    return _timed_loop(spec, step, batches, device)


def run_core(spec: dict[str, Any]) -> dict[str, Any]:
    """ray_align's training core as each Ray Train worker runs it (DeepSpeed ZeRO engine,
    stage 2 unless asked, ``train_step``), in one process with a world of one."""
    import deepspeed

    from ray_align.config import TrainConfig
    from ray_align.training.core import deepspeed_engine, train_step, uses_varlen_attention

    device = _device()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")
    train = TrainConfig(zero_stage=spec["zero_stage"], micro_batch_size=spec["micro_batch"], grad_accum=1,
                        lr=1e-4, precision="bf16" if device == "cuda" else "fp32",
                        use_gpu=device == "cuda")
    model = random_model(spec["shape"], device, spec["attn"])
    engine = deepspeed_engine(model, train, world_size=1)
    # on the host: train_step moves them, as in the Ray worker
    batches = packed_batches(spec, model.config.vocab_size, uses_varlen_attention(model))
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
          peak: float | None = None, compile_backend: str = "inductor", attn: str = "sdpa",
          zero_stage: int = 2) -> dict[str, Any]:
    """Every contender on the same packed micro-batches; MFU as 6N and with attention."""
    spec = {"shape": shape, "micro_batch": micro_batch, "seq_len": seq_len, "steps": steps,
            "warmup": warmup, "seed": 0, "compile_backend": compile_backend, "attn": attn,
            "zero_stage": zero_stage, "row_length": ROW_LENGTH}
    # by name: run as ``python -m``, this module's __name__ is "__main__"
    rows, runs, targets = side_by_side("ray_align.bench.gpu", contenders, spec, repeats, "tok_s",
                                       TARGETS, mine="core")
    tflops = peak_tflops(peak)
    flops_per_token = 6 * parameter_count(shape)  # the references' convention: attention left out
    for row in rows:
        row["mfu"] = row["tok_s"] * flops_per_token / (tflops * 1e12) if tflops else None
        with_attn = flops_per_token + row["attn_flops_per_token"]  # PaLM's, attention counted
        row["mfu_attn"] = row["tok_s"] * with_attn / (tflops * 1e12) if tflops else None
    mine = next((r for r in rows if r["contender"] == "core"), None)
    if mine and mine["mfu"] is not None:
        targets["mfu"] = {"target": MFU_TARGET, "measured": mine["mfu"], "met": mine["mfu"] >= MFU_TARGET}
    table = print_table(
        f"GPU training core: {shape} ({parameter_count(shape) / 1e9:.2f}B), micro-batch "
        f"{micro_batch} packed sequences of up to {seq_len}, {attn}, ZeRO-{zero_stage} (core), "
        f"{steps} timed steps after {warmup}, peak {tflops or 'unknown'} TFLOP/s",
        rows, [("contender", "contender"), ("tok_s", "tokens/s"), ("mfu", "MFU 6N"),
               ("mfu_attn", "MFU +attn"),
               ("gpu_peak_gb", "GPU peak GB"), ("ray_align_x", "core x")])
    return {"benchmark": "gpu", "spec": spec, "results": rows, "runs": runs, "targets": targets,
            "table": table}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ray_align.bench.gpu",
        description="The training core (DeepSpeed ZeRO, no Ray) against plain torch and "
                    "torch.compile on one GPU, on packed micro-batches: tokens/s and MFU. Needs "
                    "torch, transformers and DeepSpeed only.")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama-1.1b")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048, help="packed sequence length")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation)")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak "
                        "(default: known from its name: H100, H200, A100)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of the torch_compile contender (the CPU smoke "
                             "test uses aot_eager: the same tracing without a C++ build)")
    parser.add_argument("--attn", default="sdpa", help="attention implementation: sdpa (a "
                        "block-diagonal mask), flex_attention, flash_attention_2 (padding-free, "
                        "micro-batches laid out flat)")
    parser.add_argument("--zero-stage", type=int, default=2, choices=(0, 1, 2, 3),
                        help="the core contender's ZeRO stage")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    result = bench(args.shape, args.micro_batch, args.seq_len, args.steps, args.warmup,
                   tuple(c for c in args.contenders.split(",") if c), args.repeats, args.peak_tflops,
                   args.compile_backend, args.attn, args.zero_stage)
    result["machine"] = machine()
    for name, verdict in result["targets"].items():
        print(f"target vs {name}: {verdict}")
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] in CONTENDERS:  # one contender, in its own process
        contender_main({"core": run_core, "torch": run_plain_torch,
                        "torch_compile": lambda spec: run_plain_torch(spec, compile_model=True)})
    else:
        sys.exit(main())
