"""Engine settings vLLM can run: one GPU at most per tensor-parallel rank, engines sharing a GPU
within its memory, a tensor-parallel group packed on one node, and the judge's and critic's own
engines (``judge.engine``, ``analyze.engine``) reaching the processors built for them."""

from __future__ import annotations

import pytest

from ray_align import generate as generation
from ray_align.config import ConfigError, EngineConfig, JudgeConfig, ModelConfig, load_config
from ray_align.generate import placement_group_config
from ray_align.judges import scoring
from ray_align.stages import analyze, induce
from tests.unit.conftest import fake_generate
from tests.unit.test_config import QUICKSTART
from tests.unit.test_generate import stub  # noqa: F401 - the stub fixture


def test_more_than_one_gpu_per_rank_is_refused_naming_the_key_and_the_fix():
    with pytest.raises(ConfigError) as info:
        load_config(QUICKSTART, ["engine.gpus_per_engine=2", "engine.tensor_parallel_size=4"])
    text = str(info.value)
    assert "engine.gpus_per_engine:" in text and "cannot have more than 1 GPU" in text
    assert "tensor_parallel_size: N and gpus_per_engine: 1" in text
    with pytest.raises(ConfigError, match=r"judge\.engine\.gpus_per_engine:"):
        load_config(QUICKSTART, ["judge.engine.gpus_per_engine=8"])
    assert load_config(QUICKSTART, ["engine.gpus_per_engine=1", "engine.tensor_parallel_size=8"])


@pytest.mark.parametrize(("share", "utilization", "most"), [
    (0.5, 0.9, "0.47"), (0.5, None, "0.47"), (0.25, 0.3, "0.23"), (0.3, 0.4, "0.31")])
def test_engines_sharing_a_gpu_must_claim_less_than_its_memory(share, utilization, most):
    overrides = [f"engine.gpus_per_engine={share}"]
    if utilization is not None:
        overrides.append(f"engine.engine_kwargs.gpu_memory_utilization={utilization}")
    with pytest.raises(ConfigError) as info:
        load_config(QUICKSTART, overrides)
    text = str(info.value)
    assert "  engine: " in text and "engine_kwargs.gpu_memory_utilization" in text
    assert f"to at most {most}" in text
    assert ("vLLM's default 0.92" in text) == (utilization is None)


def test_engines_that_fit_their_shared_gpu_are_accepted():
    assert EngineConfig(gpus_per_engine=0.5, engine_kwargs={"gpu_memory_utilization": 0.45})
    assert EngineConfig(gpus_per_engine=0.3, engine_kwargs={"gpu_memory_utilization": 0.3})
    assert EngineConfig(gpus_per_engine=0.6)  # alone on its GPU: Ray fits one engine of 0.6
    assert EngineConfig(gpus_per_engine=1, engine_kwargs={"gpu_memory_utilization": 0.95})


def test_a_tensor_parallel_group_is_packed_on_one_node_in_both_ray_llm_configs():
    from ray.data.llm import vLLMEngineProcessorConfig
    from ray.serve.llm import LLMConfig

    from ray_align.engine_pool import llm_config_fields

    engine = EngineConfig(gpus_per_engine=1, cpus_per_engine=2, tensor_parallel_size=8)
    placement = placement_group_config(engine)
    assert placement == {"bundles": [{"CPU": 2, "GPU": 1}] * 8, "strategy": "STRICT_PACK"}
    model = ModelConfig(path="/models/judge")
    # Ray's own validation (PlacementGroupConfig) keeps the strategy in both configs
    batch = vLLMEngineProcessorConfig(model_source=model.path, placement_group_config=placement,
                                      engine_kwargs=generation.engine_kwargs(model, engine))
    assert batch.placement_group_config["strategy"] == "STRICT_PACK"
    fields = llm_config_fields(model, engine)
    assert fields["placement_group_config"] == placement
    assert LLMConfig(**fields).placement_group_config["strategy"] == "STRICT_PACK"


def test_the_built_processors_engine_stage_places_its_ranks_with_strict_pack(monkeypatch):
    import ray

    # building a processor calls ray.init(), which joins whatever cluster /tmp/ray last recorded
    # (a stale one hangs): unit tests start and join no Ray
    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: None)
    engine = EngineConfig(cpus_per_engine=1, tensor_parallel_size=2)
    processor = generation.build_engine_processor(ModelConfig(path="/models/m"), engine,
                                                  generation.SamplingConfig())
    (stage,) = [s for name, s in processor.stages.items() if "vLLM" in name]
    place = stage.map_batches_kwargs["ray_remote_args_fn"]  # tensor parallel: Ray's executor
    assert place.args[-1]["strategy"] == "STRICT_PACK"
    assert len(place.args[-1]["bundles"]) == 2


class Recorder:
    """Wraps the stub engines: records which model was built on which engine settings."""

    def __init__(self, stub_engines):
        self.stub_engines, self.built = stub_engines, []

    def build(self, model, engine, sampling, lora=None, carry=()):
        self.built.append((model.path, engine))
        return self.stub_engines.build(model, engine, sampling, lora, carry)


JUDGE_ENGINE = EngineConfig(pool=(1, 1), tensor_parallel_size=8, gpus_per_engine=1,
                            check_resources=False, share_across_stages=False)


def test_the_critics_own_engine_reaches_its_processor(ctx, stub, monkeypatch):  # noqa: F811
    recorder = Recorder(stub)
    monkeypatch.setattr(generation, "build_engine_processor", recorder.build)
    monkeypatch.setattr(induce, "generate", fake_generate(lambda k, m: "Sure, here is how"))
    induce.induce(ctx)
    monkeypatch.setattr(analyze, "MIN_ANALYSIS_CHARS", 1)  # the stub's answers are short
    ctx.config.analyze.engine = JUDGE_ENGINE
    analyze.analyze(ctx)
    assert [(path, e.tensor_parallel_size) for path, e in recorder.built] == [(ctx.config.model.path, 8)]
    assert ctx.config.engine.tensor_parallel_size == 1  # the policy's engines are untouched


def test_the_judges_own_engine_reaches_its_processor(ctx, stub, monkeypatch):  # noqa: F811
    recorder = Recorder(stub)
    monkeypatch.setattr(generation, "build_engine_processor", recorder.build)
    ctx.config.judge = JudgeConfig(kind="llm", model=ModelConfig(path="/models/judge"),
                                   engine=JUDGE_ENGINE)
    answers = [{"variant": "base", "set": "advbench", "id": "a1", "prompt": "p", "answer": "no"}]
    scoring._llm(ctx, answers, "evaluate/judge")
    assert recorder.built == [("/models/judge", JUDGE_ENGINE)]
    ctx.config.judge = JudgeConfig(kind="llm", model=ModelConfig(path="/models/judge"))
    scoring._llm(ctx, answers, "evaluate/judge2")
    assert recorder.built[-1] == ("/models/judge", ctx.config.engine)  # no override: the top level


def test_an_override_that_does_not_share_frees_the_shared_pool_first(ctx):
    released = []

    class Held:
        def release(self):
            released.append(True)

    ctx.engines = Held()
    assert ctx.engines_for(EngineConfig(gpus_per_engine=1)) is ctx.engines
    assert released == []
    assert ctx.engines_for(EngineConfig(gpus_per_engine=1, share_across_stages=False)) is None
    assert released == [True]


def test_an_unset_override_leaves_the_stages_identity_as_it_was():
    plain = load_config(QUICKSTART)
    assert "engine" not in plain.stage_identity("analyze")["analyze"]
    assert "engine" not in plain.stage_identity("judge")["judge"]
    faster = load_config(QUICKSTART, ["judge.engine.pool=[1, 4]", "analyze.engine.batch_size=64"])
    other = load_config(QUICKSTART, ["judge.engine.pool=[2, 2]", "analyze.engine.batch_size=8"])
    assert faster.section_hash("judge", "analyze") == other.section_hash("judge", "analyze")
    quantized = load_config(QUICKSTART, ["judge.engine.engine_kwargs.quantization=fp8"])
    assert quantized.section_hash("judge") != faster.section_hash("judge")
    assert faster.judge_engine.pool == (1, 4) and plain.judge_engine is plain.engine
    assert faster.critic_engine.batch_size == 64 and plain.critic_engine is plain.engine


def test_the_gpu_configs_commented_judge_and_critic_engines_validate():
    import yaml

    from ray_align.config import Config
    from tests.unit.test_config import REPO

    lines = (REPO / "configs" / "gpu-llama3-8b.yaml").read_text().splitlines()
    start = lines.index("# judge:")
    judge = [line[2:] for line in lines[start:lines.index("", start)]]
    critic = [line.replace("# ", "", 1) for line in lines
              if line.startswith(("  # critic:", "  # engine:", "  #          "))]
    at = lines.index("analyze:") + 4  # after analyze.sampling's lines
    config = Config.model_validate(yaml.safe_load("\n".join([*lines[:at], *critic, *lines[at:], *judge])))
    assert config.judge_engine.tensor_parallel_size == 8 and config.engine.tensor_parallel_size == 1
    assert config.critic_engine.tensor_parallel_size == 8 and config.critic.path.endswith("70B-Instruct")
