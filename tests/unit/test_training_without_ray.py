"""The training core runs under plain torch.distributed, without Ray: DeepSpeed ZeRO-2 in one
process, target-only loss falling on a repeated batch, then a Hugging Face export (for LoRA under
ZeRO-3: only the adapter gathered, then merged into the base)."""

from __future__ import annotations

import pytest
import torch

from ray_align.config import LoraConfig, TrainConfig
from ray_align.tokenization import encode_sample, pad_token_id
from ray_align.training.core import (
    adapter_state_dict,
    collate,
    deepspeed_engine,
    export_full_model,
    export_merged_model,
    full_state_dict,
    load_model,
    save_adapter,
    train_step,
)


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
    batch = collate(samples, pad_token_id(tokenizer))
    losses = [train_step(engine, batch)[0] for _ in range(6)]
    assert losses[-1] < losses[0]
    assert engine.global_steps == 6

    out = tmp_path / "export"
    state = full_state_dict(engine, zero_stage, rank=0)  # under ZeRO-3: gathered from the shards
    key = "model.layers.0.mlp.down_proj.weight"
    trained = state[key].to(torch.bfloat16).float()  # the export consumes the state
    export_full_model(state, str(tiny_model), str(out), dtype=torch.bfloat16, tokenizer=tokenizer)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert trained.shape == reloaded.state_dict()[key].shape
    assert torch.allclose(reloaded.state_dict()[key].float(), trained)
    untrained = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()[key]
    assert not torch.allclose(untrained.to(torch.bfloat16).float(), trained)


def test_lora_under_zero3_gathers_the_adapter_and_the_merge_computes_the_same(
        tiny_model, tmp_path, single_process_group, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ray_align.training import deepspeed_config as ds_config

    def partition_everything(train, world_size):
        """ZeRO-3 keeps parameters under 1e5 elements whole on every rank (all of this tiny
        adapter): partition them too, so the export has to gather them."""
        config = original(train, world_size)
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        return config

    original = ds_config.deepspeed_config
    monkeypatch.setattr(ds_config, "deepspeed_config", partition_everything)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    train = TrainConfig(zero_stage=3, precision="fp32", micro_batch_size=2, lr=1e-2,
                        lora=LoraConfig(r=4, alpha=8, dropout=0.0))
    engine = deepspeed_engine(load_model(str(tiny_model), lora=train.lora), train, world_size=1)
    samples = [encode_sample(tokenizer, [{"role": "user", "content": "Capital of France?"}], "Paris.")]
    batch = collate(samples * 2, pad_token_id(tokenizer))
    for _ in range(3):
        train_step(engine, batch)

    assert all(p.numel() == 0 for p in engine.module.parameters())  # only partitions held here
    adapter = adapter_state_dict(engine.module, zero_stage=3, rank=0)  # collective under ZeRO-3
    assert adapter and all(".lora_A." in name or ".lora_B." in name for name in adapter)
    assert all(t.numel() > 0 for t in adapter.values())  # gathered, not the empty partitions
    assert any(t.abs().sum() > 0 for name, t in adapter.items() if ".lora_B." in name)  # trained
    save_adapter(engine.module, adapter, tmp_path / "adapter")
    export_merged_model(str(tiny_model), tmp_path / "adapter", tmp_path / "model",
                        dtype=torch.float32, tokenizer=tokenizer)

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    engine.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, engine(**inputs).logits,
                                   rtol=1e-4, atol=1e-4)
    engine.train()
