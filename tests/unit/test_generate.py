import pytest

from ray_align.config import EngineConfig, ModelConfig
from ray_align.generate import GenerationError, check_engine_fits, engine_kwargs, placement_bundles


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
