"""Engine pools that outlive a stage: a Ray Serve LLM application per model, shared by the stages
of one driver run that sample from that model.

Why: every ``ray.data.llm`` processor starts engines of its own, and on a GPU cluster each start
costs minutes (weights, compile, CUDA graphs) with the GPUs idle. Induce, analyze, the baseline
rounds, the base model's evaluation and an LLM judge used repeatedly all sample from one model:
here they send their rows, through ``ServeDeploymentProcessorConfig`` stages, to one deployment
that stays up (and autoscales between ``engine.pool``'s min and max) until it is released.

One model is held at a time: asking for another releases the first, as does a generation that
starts a pool of its own (LoRA adapters) and, unless ``engine.keep_during_training``, the train
stage. ``close`` deletes every application this run made, and Serve itself when this run started
it, so nothing is left on a long-lived cluster; ``Context`` calls it on success, error and Ctrl-C.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

from ray_align import console
from ray_align.config import EngineConfig, ModelConfig, SamplingConfig

APP_PREFIX = "ray-align-"
MODEL_ID = "model"  # the name requests use for the deployment's model
REQUEST_TIMEOUT_BASE_S = 300.0  # a request's wait in the queue and its prefill, at most
MIN_TOKENS_PER_S = 0.5  # the slowest decoding a live request sees (a CPU engine's batch share)


def llm_config_fields(model: ModelConfig, engine: EngineConfig) -> dict[str, Any]:
    """The Serve LLM deployment of ``model``: the same engine arguments and placement as a
    stage's own pool; the replica actor itself takes no CPU (its engine's bundles hold them)."""
    from ray_align.generate import engine_kwargs, placement_group_config

    low, high = engine.pool
    return {
        "model_loading_config": {"model_id": MODEL_ID, "model_source": model.path},
        "engine_kwargs": engine_kwargs(model, engine),
        "placement_group_config": placement_group_config(engine),
        "deployment_config": {
            "autoscaling_config": {"min_replicas": low, "max_replicas": high, "initial_replicas": low,
                                   # Serve's default target never scales a batch workload up
                                   "target_ongoing_requests": engine.batch_size},
            "max_ongoing_requests": engine.batch_size * engine.max_concurrent_batches,
            "ray_actor_options": {"num_cpus": 0},
        },
        "runtime_env": {"env_vars": dict(engine.env)} if engine.env else None,
        "log_engine_metrics": False,
    }


def app_name(fields: dict[str, Any]) -> str:
    """One application name per distinct deployment: the same model with other engine settings
    is another application."""
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()
    return APP_PREFIX + digest[:12]


def completion_request(row: dict, sampling: SamplingConfig) -> dict[str, Any]:
    """One row as an OpenAI completions request on token ids, with the stage's sampling."""
    from ray_align.generate import sampling_params

    kwargs = {"model": MODEL_ID, "prompt": [int(t) for t in row["prompt_ids"]], "stream": False,
              **sampling_params(sampling, row["key"])}
    return {"key": row["key"], "method": "completions", "dtype": "CompletionRequest",
            "request_kwargs": kwargs}


def completion_result(row: dict, carry: tuple[str, ...] = ()) -> dict[str, Any]:
    """A deployment's reply in ``answer_row``'s columns, with the request's ``carry`` columns.
    A request that raised comes back without calling this (ray.data.llm's
    ``__inference_error__`` row); an OpenAI error body (``error``) is a failure too; Serve
    returns no per-request timing."""
    from ray_align.generate import answer_row, carried

    choices = row.get("choices") or [{}]
    usage = row.get("usage") or {}
    error = row.get("error") or ""
    return {**carried(row, carry),
            **answer_row(row["key"], choices[0].get("text"), usage.get("prompt_tokens"),
                         usage.get("completion_tokens"), error=str(error) if error else "")}


def request_timeout_s(engine: EngineConfig, sampling: SamplingConfig) -> float:
    """How long one request may wait for its reply from a shared pool before it is a failure
    (retried like any other): a stuck replica must not hang the stage forever. The floor of
    ``MIN_TOKENS_PER_S`` per request is far below any engine's decoding speed, even a
    CPU engine's share of a full batch; ``engine.request_timeout_s`` sets it outright."""
    if engine.request_timeout_s is not None:
        return engine.request_timeout_s
    return REQUEST_TIMEOUT_BASE_S + sampling.max_tokens / MIN_TOKENS_PER_S


@dataclass
class SharedEngines:
    """The engine pools of one driver run: deployed on first use, held across stages."""

    held: dict[str, str] = field(default_factory=dict)  # application name -> deployment name
    started_serve: bool = False

    def processor(self, model: ModelConfig, engine: EngineConfig, sampling: SamplingConfig,
                  carry: tuple[str, ...] = ()):
        """A processor whose rows go to ``model``'s shared deployment (the ``carry`` columns
        kept beside each answer), and whether this call started it (the caller counts pools)."""
        from ray.data.llm import ServeDeploymentProcessorConfig, build_processor
        from ray.serve.llm.openai_api_models import CompletionRequest

        from ray_align.generate import LIGHT_CPU

        fields = llm_config_fields(model, engine)
        name = app_name(fields)
        started = name not in self.held
        if started:
            self.release()
            self.held[name] = ""  # held from the first call: a failed start is deleted too
            self.held[name] = self._deploy(name, fields)
        config = ServeDeploymentProcessorConfig(
            deployment_name=self.held[name], app_name=name,
            dtype_mapping={"CompletionRequest": CompletionRequest},
            # a map actor keeps its whole batch in flight: as many rows as a pool's own engines hold
            batch_size=engine.batch_size * engine.max_concurrent_batches,
            concurrency=engine.pool[1], should_continue_on_error=True,
            request_timeout_s=request_timeout_s(engine, sampling))
        light = {"num_cpus": LIGHT_CPU}
        processor = build_processor(
            config, preprocess=lambda row: completion_request(row, sampling),
            postprocess=functools.partial(completion_result, carry=carry),
            preprocess_map_kwargs=light, postprocess_map_kwargs=light)
        for stage in processor.stages.values():  # Ray Data asks a whole CPU per map actor
            stage.map_batches_kwargs["num_cpus"] = LIGHT_CPU
        return processor, started

    def _deploy(self, name: str, fields: dict[str, Any]) -> str:
        from ray import serve
        from ray.serve.llm import LLMConfig, build_llm_deployment

        self.started_serve = self.started_serve or not _serve_running()
        began = time.perf_counter()
        print(f"[engines] starting a shared engine pool for {fields['model_loading_config']['model_source']}",
              flush=True)
        console.quiet()  # Serve's loggers exist once it is imported
        app = build_llm_deployment(LLMConfig(**fields), name_prefix=f"{name}-")
        serve.start(http_options={"location": "NoServer"})  # no HTTP proxy: rows arrive by handle
        serve.run(app, name=name, route_prefix=None)
        console.quiet()  # Serve's client logger came up with it
        deployments = serve.status().applications[name].deployments
        print(f"[engines] shared engine pool up in {time.perf_counter() - began:.0f} s", flush=True)
        return next(iter(deployments))

    def release(self) -> None:
        """Delete the applications this run holds, freeing their CPUs and GPUs."""
        if not self.held:
            return
        from ray import serve

        names, self.held = list(self.held), {}
        if _serve_running():  # a start that failed before Serve came up left nothing to delete
            for name in names:
                serve.delete(name, _blocking=True)
        print("[engines] shared engine pool released", flush=True)

    def close(self) -> None:
        """Release everything, and stop Serve when this run started it."""
        try:
            self.release()
        finally:
            if self.started_serve:
                from ray import serve

                serve.shutdown()
                self.started_serve = False


def _serve_running() -> bool:
    """Whether a Serve controller already runs on the cluster (someone else's Serve is kept)."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        return True
    except ValueError:
        return False
