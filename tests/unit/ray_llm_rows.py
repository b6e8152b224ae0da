"""Engine output as ray.data.llm 2.60 hands it to ``generate()``, built with Ray's own code.

A row goes through the engine stage, then Ray's ``wrap_postprocess`` (with the
``include_error_column`` that ``should_continue_on_error=True`` turns on), then Ray Data's block
builder. So a failed row skips our postprocess and comes back as the stage's raw data (without
our columns), and a block that mixes both has nulls where a row lacked a column, exactly as the
library does it. A stub that wrote our columns on failed rows hid failures stored as answers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyarrow as pa
from ray.llm._internal.batch.stages.base import wrap_postprocess

DATA_COLUMN = "__data"  # the processor's data column (its name does not matter here)


def vllm_answered(row: dict[str, Any], text: str, tokens: int,
                  window: tuple[float, float] = (0.0, 0.0)) -> dict[str, Any]:
    """The data of a row the vLLM stage answered (``_generate_with_error_handling``'s try)."""
    metrics = {"scheduled_ts": window[0], "last_token_ts": window[1]} if window[0] else None
    return {**row, "prompt": "", "prompt_token_ids": list(row.get("prompt_ids") or []),
            "num_input_tokens": len(row.get("prompt_ids") or []), "generated_tokens": [1] * tokens,
            "generated_text": text, "num_generated_tokens": tokens, "metrics": metrics,
            "request_id": 0, "batch_uuid": "b", "time_taken_llm": 0.1, "params": "",
            "__inference_error__": ""}


def vllm_failed(row: dict[str, Any], message: str) -> dict[str, Any]:
    """The data of a row whose request raised in the vLLM stage (its ``except`` branch: a default
    ``vLLMOutputData`` with empty text and zero tokens, and the message)."""
    return {**row, "prompt": "", "prompt_token_ids": None, "num_input_tokens": 0,
            "generated_tokens": [], "generated_text": "", "num_generated_tokens": 0,
            "embeddings": None, "metrics": None, "logprobs": None, "prompt_logprobs": None,
            "request_id": -1, "batch_uuid": "b", "time_taken_llm": -1, "params": "",
            "__inference_error__": message}


def serve_failed(row: dict[str, Any], message: str) -> dict[str, Any]:
    """The data of a row whose request raised in the Serve deployment stage (a timeout, say)."""
    return {**row, "batch_uuid": "b", "__inference_error__": message, "request_kwargs": "{...}"}


def serve_replied(row: dict[str, Any], reply: dict[str, Any]) -> dict[str, Any]:
    """The data of a row the Serve deployment replied to (an answer or an OpenAI error body)."""
    return {**row, **reply, "request_id": "0", "batch_uuid": "b", "time_taken": 0.1,
            "__inference_error__": ""}


def engine_block(stage_rows: list[dict[str, Any]], postprocess: Callable[[dict], dict]) -> pa.Table:
    """The block Ray Data builds from these rows after the processor's postprocess map."""
    from ray.data._internal import size_estimator
    from ray.data._internal.delegating_block_builder import DelegatingBlockBuilder

    wrapped = wrap_postprocess(postprocess, DATA_COLUMN, include_error_column=True)
    builder = DelegatingBlockBuilder()
    estimate = size_estimator.SizeEstimator._real_size
    # The builder sizes rows with ray.put, which would start a Ray instance; the size is only an
    # estimate for splitting blocks, so it is fixed here and the rows are built as Ray builds them.
    size_estimator.SizeEstimator._real_size = lambda self, item: 1000
    try:
        for row in stage_rows:
            builder.add(wrapped({DATA_COLUMN: row}))
        return builder.build()
    finally:
        size_estimator.SizeEstimator._real_size = estimate
