"""The token loss's memory: the model's own full-logits loss against the chunked one
(``training.token_loss``), on one micro-batch, forward and backward, on the CPU.

Each contender runs in a fresh process: the config's model, LoRA and precision, gradient
checkpointing on (so the activations do not hide the loss's share), one row of ``tokens``
random token ids, every token but the first a target. Peak memory is the process's own peak
resident set (``VmHWM``) during the step, reset just before it (``/proc/self/clear_refs``), and
its rise over the resident set before the step; both report the loss and the gradient norm,
which must agree. Run as ``ray-align bench loss [CONFIG] [train.precision=bf16] [--tokens N]``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from ray_align.bench.common import contender_main, print_table, side_by_side

CONTENDERS = ("full_logits", "chunked")


def _status_gb(field: str) -> float:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in GB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / 1e9  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    """Reset the process's peak resident set to its current one (Linux 4.0+)."""
    Path("/proc/self/clear_refs").write_text("5")


def run_step(spec: dict[str, Any], chunked: bool) -> dict[str, Any]:
    """One forward and backward of one ``spec["tokens"]``-token row; peak memory of the step."""
    import torch

    from ray_align.config import LoraConfig
    from ray_align.training.core import collate, load_model, model_inputs
    from ray_align.training.token_loss import lm_loss

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    dtype = torch.bfloat16 if spec["precision"] == "bf16" else torch.float32
    lora = LoraConfig(**spec["lora"]) if spec["lora"] else None
    model = load_model(spec["model"], dtype=dtype, lora=lora, gradient_checkpointing=True).train()
    ids = torch.randint(0, model.config.vocab_size, (spec["tokens"],),
                        generator=torch.Generator().manual_seed(1))
    inputs = model_inputs(collate([(ids.tolist(), 1)], spec["pad_id"]))
    before = _status_gb("VmRSS")
    _reset_peak()
    began = time.perf_counter()
    loss = lm_loss(model, inputs)[0] if chunked else model(**inputs).loss
    loss.backward()
    seconds = time.perf_counter() - began
    peak = _status_gb("VmHWM")
    grads = [p.grad.float().norm() for p in model.parameters() if p.grad is not None]
    return {"loss": float(loss), "grad_norm": float(torch.stack(grads).norm()), "step_s": seconds,
            "rss_before_gb": before, "peak_rss_gb": peak, "peak_rise_gb": peak - before}


def bench(config, tokens: int = 4096, threads: int = 2) -> dict[str, Any]:
    """Both contenders once each, the table side by side and whether the losses agree."""
    from ray_align.assets import resolve
    from ray_align.tokenization import load_tokenizer, pad_token_id

    path = resolve(config.model.path)
    train = config.train
    spec = {"model": path, "tokens": tokens, "threads": threads, "precision": train.precision,
            "lora": train.lora.model_dump(mode="json") if train.lora else None,
            "pad_id": pad_token_id(load_tokenizer(path, config.model.trust_remote_code))}
    results, runs, _ = side_by_side("ray_align.bench.loss", CONTENDERS, spec, 1, "step_s", {},
                                    mine="chunked")
    for row in results:
        row.pop("ray_align_x", None)  # a ratio of step times, not of speeds: the table has both
    by_name = {row["contender"]: row for row in results}
    gap = abs(by_name["chunked"]["loss"] - by_name["full_logits"]["loss"])
    table = print_table(
        f"token loss: one {tokens}-token row, forward + backward, {train.precision}, LoRA "
        f"{'r=' + str(train.lora.r) if train.lora else 'off'}, gradient checkpointing, "
        f"{threads} threads; peak = the process's VmHWM during the step",
        results, [("contender", "contender"), ("loss", "loss"), ("grad_norm", "grad norm"),
                  ("step_s", "step s"), ("rss_before_gb", "RSS before GB"),
                  ("peak_rss_gb", "peak RSS GB"), ("peak_rise_gb", "peak rise GB")])
    print(f"loss difference: {gap:.2e}", flush=True)
    return {"benchmark": "loss", "tokens": tokens, "results": results, "runs": runs,
            "loss_difference": gap, "table": table}


if __name__ == "__main__":
    contender_main({"full_logits": lambda spec: run_step(spec, False),
                    "chunked": lambda spec: run_step(spec, True)})
    sys.exit(0)
