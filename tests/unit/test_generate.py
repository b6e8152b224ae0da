import pytest

from ray_align.config import EngineConfig, ModelConfig
from ray_align.generate import (
    GenerationError,
    GenerationStats,
    check_engine_fits,
    engine_kwargs,
    engine_window,
    placement_bundles,
)


def test_placement_bundles_one_per_tensor_parallel_rank():
    engine = EngineConfig(tensor_parallel_size=4, gpus_per_engine=1, cpus_per_engine=2)
    assert placement_bundles(engine) == [{"CPU": 2, "GPU": 1}] * 4
    assert placement_bundles(EngineConfig()) == [{"CPU": 1}]


def test_engine_kwargs_user_settings_win():
    model = ModelConfig(path="m", max_model_len=1024, dtype="float32")
    kwargs = engine_kwargs(model, EngineConfig(engine_kwargs={"max_model_len": 512, "enforce_eager": True}))
    assert kwargs["max_model_len"] == 512 and kwargs["dtype"] == "float32"
    assert kwargs["trust_remote_code"] is False and kwargs["enforce_eager"] is True


def test_missing_gpus_are_named_before_an_engine_starts():
    engine = EngineConfig(tensor_parallel_size=8, gpus_per_engine=1)
    with pytest.raises(GenerationError, match=r"8 GPU \(has 4\).*tensor_parallel_size=8"):
        check_engine_fits(engine, {"CPU": 64, "GPU": 4})
    check_engine_fits(engine, {"CPU": 64, "GPU": 8})


def test_steady_rate_uses_the_engines_busy_window_when_vllm_reports_it():
    stats = {"scheduled_ts": 100.0, "first_token_ts": 100.5, "last_token_ts": 104.0}
    assert engine_window(stats) == (100.0, 104.0)
    assert engine_window(None) == engine_window({}) == (0.0, 0.0)  # stats off, or a failed row
    done = GenerationStats(requests=4, generated_now=4, output_tokens=200, seconds=30.0, engine_s=4.0)
    assert done.steady_tokens_per_s == 50.0 and done.tokens_per_s == pytest.approx(200 / 30)
    assert GenerationStats(4, 4, 200, 30.0).steady_tokens_per_s is None
    assert done.metrics() == {"output_tokens": 200, "tokens_per_s": 6.7, "engine_s": 4.0,
                              "steady_tokens_per_s": 50.0}
    assert GenerationStats(4, 4, 200, 30.0).metrics()["engine_s"] is None
