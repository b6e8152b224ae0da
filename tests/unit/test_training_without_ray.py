"""The training core runs under plain torch.distributed, without Ray: DeepSpeed ZeRO-2 in one
process, target-only loss falling on a repeated batch, then a Hugging Face export."""

from __future__ import annotations

import socket

import pytest
import torch

from ray_align.config import TrainConfig
from ray_align.training.core import (
    collate,
    deepspeed_engine,
    encode_sample,
    export_model,
    full_state_dict,
    load_model,
    train_step,
)


@pytest.fixture(scope="module")
def single_process_group():
    """One gloo group for the module, as Ray Train or torchrun would set up before DeepSpeed
    (DeepSpeed caches its groups, so they must outlive each test)."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.MonkeyPatch.context() as patch:
        for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0",
                           "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1"}.items():
            patch.setenv(key, value)
        dist.init_process_group("gloo")
        yield
        dist.destroy_process_group()


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_zero_steps_without_ray_then_export(tiny_model, tmp_path, single_process_group, zero_stage):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    train = TrainConfig(zero_stage=zero_stage, precision="fp32", micro_batch_size=2, lr=1e-2)
    model = load_model(str(tiny_model))
    engine = deepspeed_engine(model, train, world_size=1)
    assert isinstance(engine.optimizer.optimizer, torch.optim.AdamW)  # no C++ build on CPU
    samples = [encode_sample(tokenizer, [{"role": "user", "content": q}], a)
               for q, a in [("Capital of France?", "Paris."), ("Two plus two?", "Four.")]]
    batch = collate(samples, tokenizer.pad_token_id or 0)
    losses = [train_step(engine, batch)[0] for _ in range(6)]
    assert losses[-1] < losses[0]
    assert engine.global_steps == 6

    out = tmp_path / "export"
    state = full_state_dict(engine, zero_stage, rank=0)  # under ZeRO-3: gathered from the shards
    export_model(state, str(tiny_model), str(out), lora=None, trust_remote_code=False,
                 tokenizer=tokenizer)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    key = "model.layers.0.mlp.down_proj.weight"
    trained = state[key].to(torch.bfloat16).float()
    assert trained.shape == reloaded.state_dict()[key].shape
    assert torch.allclose(reloaded.state_dict()[key].float(), trained)
    untrained = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()[key]
    assert not torch.allclose(untrained.to(torch.bfloat16).float(), trained)
