"""The benchmarks run end to end on the tiny model (a smoke test: no timing is asserted).

Every contender must do the same work: with ``ignore_eos`` each generation request yields
exactly ``max_tokens`` tokens, and every training contender sees the same rows.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, ray_align_env, tiny_config

pytestmark = pytest.mark.integration


def bench(tmp_path, tiny_model, name: str, *options: str, **settings) -> dict:
    config = tiny_config(tmp_path, tiny_model, engine_in_process=False, **settings)  # vLLM's default
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "-m", "ray_align.cli", "bench", name, str(config),
                             *options, "--out", str(out)], cwd=REPO, env=ray_align_env(), capture_output=True,
                            text=True, timeout=900, start_new_session=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    print(result.stdout)
    return json.loads(out.read_text())


def test_generation_bench_runs_every_contender_on_equal_work(tiny_model, tmp_path):
    # batches of 2: the engine's busy window spans several batches, as in a real stage
    report = bench(tmp_path, tiny_model, "generation", "--requests", "6", "--max-tokens", "5",
                   **{"engine.batch_size": 2})
    rows = {r["contender"]: r for r in report["results"]}
    assert set(rows) == {"ray_align", "vllm", "transformers"}
    assert {r["tokens"] for r in rows.values()} == {6 * 5}
    assert all(r["steady_tok_s"] > 0 and r["e2e_tok_s"] > 0 for r in rows.values())
    ray_align = rows["ray_align"]
    assert ray_align["start_s"] + ray_align["generate_s"] == pytest.approx(30 / ray_align["e2e_tok_s"])
    assert set(report["targets"]) == {"vllm", "transformers"}
    assert "steady tok/s" in report["table"]


def test_training_bench_runs_every_contender_on_the_same_rows(tiny_model, tmp_path):
    report = bench(tmp_path, tiny_model, "training", "--rows", "16")
    rows = {r["contender"]: r for r in report["results"]}
    assert set(rows) == {"ray_align", "deepspeed", "torch"}
    assert rows["ray_align"]["tokens"] == rows["deepspeed"]["tokens"] == rows["torch"]["tokens"] > 0
    assert all(r["loop_tok_s"] > 0 for r in rows.values())
    assert report["targets"]["deepspeed"]["measured"] > 0


def test_gpu_bench_runs_on_cpu_with_the_smoke_shape(tmp_path):
    """The GPU benchmark's code path (ray_align's DeepSpeed core, compiled torch: plain torch is
    the same function uncompiled) on a two-layer model; the device machine runs the same module
    with the 1.1B shape."""
    out = tmp_path / "gpu.json"
    result = subprocess.run([sys.executable, "-m", "ray_align.bench.gpu", "--shape", "smoke",
                             "--micro-batch", "2", "--seq-len", "32", "--steps", "2", "--warmup", "1",
                             "--compile-backend", "aot_eager", "--contenders", "core,torch_compile",
                             "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=600,
                            start_new_session=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {r["contender"]: r for r in report["results"]}
    assert set(rows) == {"core", "torch_compile"}
    tokens = {r["tokens"] for r in rows.values()}  # real tokens of the same packed batches
    assert len(tokens) == 1 and 0 < tokens.pop() <= 2 * 2 * 32
    assert all(r["tok_s"] > 0 and r["mfu"] is None and r["mfu_attn"] is None  # no known peak on CPU
               for r in rows.values())
    assert "mfu" not in report["targets"] and report["targets"]["torch_compile"]["measured"] > 0
