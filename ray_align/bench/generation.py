"""Generation benchmark: ray_align's induce machinery (Ray Data + vLLM engine actors) against
vLLM's offline ``LLM.chat`` in one process and against batched transformers ``generate``.

Same model, chat messages (the induce step's guided and unguided prompts) and sampling; every
request generates exactly ``max_tokens`` (``ignore_eos``), so all contenders do equal work.
Start-up (imports, Ray, engine) is reported apart from steady-state tokens/s. ``generate s`` is
the steady-state time for all requests; ``e2e tok/s`` counts start-up too (and, for ray_align,
writing the results to Parquet as the stage does).
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
from typing import Any

from ray_align.bench.common import contender_main, print_table, side_by_side, with_request_stats

CONTENDERS = ("ray_align", "vllm", "transformers")
TARGETS = {"vllm": 0.95, "transformers": 1.2}  # ray_align's steady tok/s over each, at least


def _configs(spec: dict[str, Any]):
    from ray_align.config import EngineConfig, ModelConfig, SamplingConfig

    return (ModelConfig(**spec["model"]), EngineConfig(**spec["engine"]),
            SamplingConfig(**spec["sampling"]))


def run_ray_align(spec: dict[str, Any]) -> dict[str, Any]:
    """The induce stage's path. Steady state is the rate over the engine's busy window (first
    request scheduled to last token, from vLLM's request stats); start-up is the rest of the time,
    so the two add up to the end-to-end time."""
    started = time.perf_counter()
    from ray_align.config import RayConfig
    from ray_align.generate import generate, make_requests
    from ray_align.pipeline import init_ray
    from ray_align.storage import RunDir

    model, engine, sampling = _configs(spec)
    init_ray(RayConfig(num_cpus=spec["num_cpus"]))
    keys = [f"r{i}" for i in range(len(spec["messages"]))]
    with tempfile.TemporaryDirectory() as folder:
        stats = generate(RunDir(folder), ("out",), make_requests(keys, spec["messages"]), model,
                         engine, sampling, desc="ray_align")
    return _timings(time.perf_counter() - started, stats.output_tokens, stats.engine_s)


def run_vllm(spec: dict[str, Any]) -> dict[str, Any]:
    """vLLM's own offline API in this process, with the same engine arguments; steady state
    over the same busy window as ray_align's."""
    started = time.perf_counter()
    model, engine, sampling = _configs(spec)
    os.environ.update(engine.env)
    from vllm import LLM, SamplingParams

    from ray_align.generate import busy_seconds, engine_kwargs, engine_window

    llm = LLM(model=model.path, **engine_kwargs(model, engine))
    params = SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p,
                            max_tokens=sampling.max_tokens, ignore_eos=sampling.ignore_eos,
                            repetition_penalty=sampling.repetition_penalty)
    outputs = llm.chat(spec["messages"], params, use_tqdm=False)
    total_s = time.perf_counter() - started
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    windows = [engine_window(o.metrics and dataclasses.asdict(o.metrics)) for o in outputs]
    return _timings(total_s, tokens, busy_seconds(windows))


def _timings(total_s: float, tokens: int, engine_s: float | None) -> dict[str, Any]:
    """Start-up is everything outside the engine's busy window."""
    if not engine_s:
        raise RuntimeError("no vLLM request stats came back: the benchmark needs them "
                           "(engine.engine_kwargs.disable_log_stats must not be true)")
    return {"start_s": total_s - engine_s, "generate_s": engine_s, "tokens": tokens,
            "steady_tok_s": tokens / engine_s, "e2e_tok_s": tokens / total_s}


def run_transformers(spec: dict[str, Any]) -> dict[str, Any]:
    """Batched ``model.generate`` with left padding, on all the machine's cores."""
    started = time.perf_counter()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ray_align.tokenization import pad_token_id

    model_cfg, _, sampling = _configs(spec)
    torch.set_num_threads(spec["num_cpus"])
    # its own tokenizer, not the shared cached one: it is switched to left padding
    tokenizer = AutoTokenizer.from_pretrained(model_cfg.path)
    tokenizer.padding_side = "left"
    pad = pad_token_id(tokenizer)
    dtype = {"float32": torch.float32, "float16": torch.float16}.get(model_cfg.dtype, torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(model_cfg.path, dtype=dtype).eval()
    start_s = time.perf_counter() - started
    size, messages, tokens = spec["hf_batch_size"], spec["messages"], 0
    sample = sampling.temperature > 0
    began = time.perf_counter()
    for i in range(0, len(messages), size):
        batch = tokenizer.apply_chat_template(messages[i : i + size], add_generation_prompt=True,
                                              padding=True, return_tensors="pt", return_dict=True)
        with torch.inference_mode():
            out = model.generate(
                **batch, max_new_tokens=sampling.max_tokens, do_sample=sample,
                min_new_tokens=sampling.max_tokens if sampling.ignore_eos else None,
                temperature=sampling.temperature if sample else None,
                top_p=sampling.top_p if sample else None,
                repetition_penalty=sampling.repetition_penalty,
                pad_token_id=pad)
        new = out[:, batch["input_ids"].shape[1]:]
        tokens += int((new != pad).sum())
    seconds = time.perf_counter() - began
    return {"start_s": start_s, "generate_s": seconds, "tokens": tokens,
            "steady_tok_s": tokens / seconds, "e2e_tok_s": tokens / (start_s + seconds)}


def induce_messages(config, count: int) -> list[list[dict[str, str]]]:
    """The induce step's chat messages (guided and unguided) for the config's harmful prompts."""
    from ray_align import prompts
    from ray_align.sources import load_source

    source = config.data.harmful.model_copy(update={"limit": math.ceil(count / 2)})
    rows = load_source(source, config.data.max_prompt_chars, "quarantine", "harmful").table
    messages = []
    for prompt in rows.column("prompt").to_pylist():
        messages += [prompts.induce_guided(prompt), prompts.induce_unguided(prompt)]
    return messages[:count]


def bench_spec(config, requests: int, max_tokens: int, hf_batch_size: int) -> dict[str, Any]:
    sampling = config.induce.model_copy(update={"max_tokens": max_tokens, "ignore_eos": True})
    engine = config.engine.model_dump()
    engine["engine_kwargs"] = with_request_stats(engine["engine_kwargs"])
    return {"model": config.model.model_dump(), "engine": engine,
            "sampling": sampling.model_dump(), "messages": induce_messages(config, requests),
            "num_cpus": config.ray.num_cpus or os.cpu_count(), "hf_batch_size": hf_batch_size}


def bench(config, requests: int = 128, max_tokens: int = 64, repeats: int = 1,
          contenders: tuple[str, ...] = CONTENDERS, hf_batch_size: int = 32) -> dict[str, Any]:
    """Run every contender ``repeats`` times, interleaved; medians, ratios and the table."""
    spec = bench_spec(config, requests, max_tokens, hf_batch_size)
    rows, runs, targets = side_by_side(__name__, contenders, spec, repeats, "steady_tok_s", TARGETS)
    table = print_table(
        f"generation: {len(spec['messages'])} requests x {max_tokens} tokens, {config.model.path}",
        rows, [("contender", "contender"), ("start_s", "start s"), ("generate_s", "generate s"),
               ("tokens", "tokens"), ("steady_tok_s", "steady tok/s"), ("e2e_tok_s", "e2e tok/s"),
               ("peak_gb", "peak GB"), ("ray_align_x", "ray_align x")])
    return {"benchmark": "generation", "requests": len(spec["messages"]), "max_tokens": max_tokens,
            "results": rows, "runs": runs, "targets": targets, "table": table}


if __name__ == "__main__":
    contender_main({"ray_align": run_ray_align, "vllm": run_vllm, "transformers": run_transformers})
