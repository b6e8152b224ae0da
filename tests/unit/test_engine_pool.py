"""Shared engine pools (``engine.share_across_stages``): the requests and answers of the Serve
path, the deployment's settings, which generations share a pool, and that a ``Context`` always
shuts its pools down. The real Serve deployment runs in tests/integration/test_two_node_job.py."""

from __future__ import annotations

import pyarrow as pa
import pytest

from ray_align import engine_pool
from ray_align import generate as generation
from ray_align.config import ConfigError, EngineConfig, ModelConfig, SamplingConfig
from ray_align.engine_pool import (
    MODEL_ID,
    SharedEngines,
    app_name,
    completion_request,
    completion_result,
    llm_config_fields,
)
from ray_align.generate import LoraAdapters, request_seed
from ray_align.pipeline import Context
from ray_align.storage import RunDir
from tests.unit.test_generate import _generate, _requests, stub  # noqa: F401 - the stub fixture

MODEL = ModelConfig(path="/models/base", max_model_len=512, dtype="float32")


def test_shared_pools_default_on_for_gpu_engines_only():
    assert not EngineConfig().shared_pools
    assert EngineConfig(gpus_per_engine=1).shared_pools
    assert EngineConfig(share_across_stages=True).shared_pools
    assert not EngineConfig(gpus_per_engine=1, share_across_stages=False).shared_pools


def test_a_row_becomes_a_completions_request_on_token_ids_with_the_stages_sampling():
    sampling = SamplingConfig(max_tokens=12, temperature=0.3, top_p=0.9, repetition_penalty=1.1,
                              seed=7, ignore_eos=True)
    request = completion_request({"key": "r1", "prompt_ids": [5, 6, 7]}, sampling)
    assert request["method"] == "completions" and request["dtype"] == "CompletionRequest"
    kwargs = request["request_kwargs"]
    assert kwargs["prompt"] == [5, 6, 7] and all(type(t) is int for t in kwargs["prompt"])
    assert kwargs["model"] == MODEL_ID and kwargs["stream"] is False
    assert (kwargs["max_tokens"], kwargs["temperature"], kwargs["top_p"]) == (12, 0.3, 0.9)
    assert (kwargs["repetition_penalty"], kwargs["ignore_eos"]) == (1.1, True)
    assert kwargs["seed"] == request_seed(7, "r1")  # the same seed a stage's own pool draws with
    assert "seed" not in completion_request({"key": "r1", "prompt_ids": [1]},
                                            SamplingConfig())["request_kwargs"]


def test_answers_and_error_bodies_come_back_in_the_columns_every_generation_writes():
    ok = completion_result({"key": "r1", "choices": [{"text": "hello"}],
                            "usage": {"prompt_tokens": 4, "completion_tokens": 2}})
    assert ok == {"key": "r1", "generated_text": "hello", "num_input_tokens": 4,
                  "num_generated_tokens": 2, "error": "", "engine_window": [0.0, 0.0]}
    assert ok.keys() == generation.answer_row("k", "t", 1, 1).keys()  # one row contract
    # an OpenAI error body is a failure (a request that raised never reaches this function:
    # ray.data.llm returns it as an __inference_error__ row, see test_generate.py)
    body = completion_result({"key": "r3", "error": {"message": "bad request", "code": 400}})
    assert "bad request" in body["error"] and body["generated_text"] == ""


def test_a_shared_pool_request_times_out_instead_of_waiting_forever():
    from ray_align.engine_pool import request_timeout_s

    sampling = SamplingConfig(max_tokens=512)
    assert request_timeout_s(EngineConfig(), sampling) == pytest.approx(300 + 512 / 0.5)
    assert request_timeout_s(EngineConfig(request_timeout_s=30), sampling) == 30
    with pytest.raises(ValueError):
        EngineConfig(request_timeout_s=0)
    # the Serve stage gets it: without one a stuck replica hangs the stage forever
    engines = SharedEngines()
    engines._deploy = lambda name, fields: "deployment"
    processor, started = engines.processor(MODEL, EngineConfig(), SamplingConfig(max_tokens=10))
    assert started and processor.config.request_timeout_s == pytest.approx(320.0)
    assert processor.config.should_continue_on_error


def test_the_deployment_has_the_stage_pools_engine_and_autoscales_between_pools_bounds():
    engine = EngineConfig(pool=(1, 3), batch_size=8, cpus_per_engine=2,
                          engine_kwargs={"enforce_eager": True}, env={"A": "1"})
    fields = llm_config_fields(MODEL, engine)
    assert fields["model_loading_config"] == {"model_id": MODEL_ID, "model_source": MODEL.path}
    assert fields["engine_kwargs"] == generation.engine_kwargs(MODEL, engine)
    assert fields["placement_group_config"] == {"bundles": [{"CPU": 2}], "strategy": "STRICT_PACK"}
    deployment = fields["deployment_config"]
    scaling = deployment["autoscaling_config"]
    assert (scaling["min_replicas"], scaling["max_replicas"], scaling["initial_replicas"]) == (1, 3, 1)
    assert scaling["target_ongoing_requests"] == 8
    assert deployment["ray_actor_options"] == {"num_cpus": 0}  # the engine's bundle holds the CPUs
    assert fields["runtime_env"] == {"env_vars": {"A": "1"}}
    # the same model with other engine settings is another application
    other = llm_config_fields(MODEL, engine.model_copy(update={"engine_kwargs": {}}))
    assert app_name(fields) == app_name(llm_config_fields(MODEL, engine)) != app_name(other)
    assert app_name(fields).startswith(engine_pool.APP_PREFIX)


class RecordingEngines(SharedEngines):
    """A SharedEngines whose pool is the unit tests' stub engine: records what was asked."""

    def __init__(self, stub_engines):
        super().__init__()
        self.stub_engines, self.asked, self.releases, self.closed = stub_engines, [], 0, False

    def processor(self, model, engine, sampling, carry=()):
        started = model.path not in self.held
        self.held = {model.path: "d"}
        self.asked.append(model.path)
        return self.stub_engines.build(model, engine, sampling), started

    def release(self):
        self.releases += 1
        self.held = {}

    def close(self):
        self.closed = True


def test_generations_of_one_model_share_a_pool_and_count_it_once(stub, tmp_path):  # noqa: F811
    engines = RecordingEngines(stub)
    run = RunDir(str(tmp_path))
    first = generation.generate(run, ("a",), _requests(3), MODEL, EngineConfig(), SamplingConfig(),
                                "a", engines=engines)
    second = generation.generate(run, ("b",), _requests(3), MODEL, EngineConfig(), SamplingConfig(),
                                 "b", engines=engines)
    assert engines.asked == [MODEL.path, MODEL.path]
    assert (first.engine_pools, second.engine_pools) == (1, 0)
    assert first.first_result_s is not None and second.first_result_s is None
    # a generation with adapters starts a pool of its own, after freeing the shared one
    lora = LoraAdapters(names=("/a",), max_rank=8)
    third = generation.generate(run, ("c",), _requests(2), MODEL, EngineConfig(), SamplingConfig(),
                                "c", lora=lora, engines=engines)
    assert engines.releases == 1 and third.engine_pools == 1 and stub.lora[-1] is lora


def _context(tmp_path, *overrides):
    from ray_align.config import load_config
    from tests.unit.test_config import QUICKSTART

    config = load_config(QUICKSTART, [f"run_dir={tmp_path}", *overrides])
    return Context(config=config, run=RunDir(str(tmp_path)))


def test_a_context_shuts_its_pools_down_on_error_and_ctrl_c(tmp_path):
    assert _context(tmp_path).engines is None  # CPU engines: each stage starts its own
    for raised in (RuntimeError("a stage failed"), KeyboardInterrupt()):
        ctx = _context(tmp_path, "engine.share_across_stages=true")
        ctx.engines, ctx._ray_ready = RecordingEngines(None), True
        with pytest.raises(type(raised)), ctx:
            raise raised
        assert ctx.engines.closed


def test_training_frees_the_pools_unless_they_are_kept(tmp_path):
    for keep, releases in ((False, 1), (True, 0)):
        ctx = _context(tmp_path, "engine.share_across_stages=true",
                       f"engine.keep_during_training={str(keep).lower()}")
        ctx.engines = RecordingEngines(None)
        ctx.release_engines(for_training=True)
        assert ctx.engines.releases == releases


def test_an_unknown_engine_setting_is_named(tmp_path):
    with pytest.raises(ConfigError, match="share_across_stage"):
        _context(tmp_path, "engine.share_across_stage=true")


def test_a_carried_id_survives_the_completion_replys_own_id():
    # Ray's stage merges the reply into the request row: an OpenAI completion's "id" would
    # overwrite a carried column named "id" (every induce row lost its prompt's id on Serve)
    from ray_align.generate import CARRY_PREFIX, with_carry_names

    block = with_carry_names(pa.table({"key": ["h1::guided"], "id": ["h1"]}), ("id",))
    row = {**block.to_pylist()[0], "id": "cmpl-7", "choices": [{"text": "hi"}], "usage": {}}
    assert f"{CARRY_PREFIX}id" in row
    assert completion_result(row, carry=("id",))["id"] == "h1"
