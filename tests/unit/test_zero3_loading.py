"""ZeRO-3 loads the model partitioned (``deepspeed.zero.Init`` inside ``from_pretrained``) and
releases transformers' DeepSpeed config afterwards, so a later plain load (rank 0's export)
is an ordinary one. A real DeepSpeed ZeRO-3 engine in a gloo group of one, no Ray."""

from __future__ import annotations

import torch

from ray_align.config import TrainConfig
from ray_align.training.core import (
    deepspeed_engine,
    full_state_dict,
    load_model,
    partitioned_loading,
)
from ray_align.training.deepspeed_config import deepspeed_config

TRAIN = TrainConfig(zero_stage=3, precision="fp32", micro_batch_size=2, lr=1e-3)


def test_zero3_loads_partitioned_then_releases_the_deepspeed_config(single_process_group, tiny_model):
    from transformers.integrations import is_deepspeed_zero3_enabled

    with partitioned_loading(deepspeed_config(TRAIN, world_size=1)):
        assert is_deepspeed_zero3_enabled()
        model = load_model(str(tiny_model))
    assert not is_deepspeed_zero3_enabled()  # released: rank 0's export load is a plain one
    params = list(model.parameters())
    assert all(hasattr(p, "ds_id") for p in params)  # built by zero.Init: partitioned at load
    assert all(p.numel() == 0 for p in params)  # the full tensors live only in the shards

    plain = load_model(str(tiny_model))
    assert not any(hasattr(p, "ds_id") for p in plain.parameters())
    engine = deepspeed_engine(model, TRAIN, world_size=1)
    gathered = full_state_dict(engine, zero_stage=3, rank=0)  # the loaded weights, not random
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(gathered[name].float(), value.float(), rtol=0, atol=0)


def test_other_stages_load_as_before(tiny_model):
    from transformers.integrations import is_deepspeed_zero3_enabled

    with partitioned_loading(deepspeed_config(TrainConfig(zero_stage=2), world_size=1)):
        assert not is_deepspeed_zero3_enabled()


def test_lora_on_a_partitioned_model_trains(single_process_group, tiny_model):
    from ray_align.config import LoraConfig

    train = TRAIN.model_copy(update={"lora": LoraConfig(r=4, alpha=8, dropout=0.0)})
    with partitioned_loading(deepspeed_config(train, world_size=1)):
        model = load_model(str(tiny_model), lora=train.lora)
    engine = deepspeed_engine(model, train, world_size=1)
    ids = torch.randint(0, 100, (2, 16))
    losses = []
    for _ in range(3):
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
