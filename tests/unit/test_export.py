"""The export, without Ray or DeepSpeed: full fine-tuning writes the given weights straight to
sharded safetensors in the export dtype; LoRA writes a PEFT adapter and the base with it merged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ray_align.config import LoraConfig
from ray_align.training.core import (
    adapter_state_dict,
    export_dtype,
    export_full_model,
    export_merged_model,
    load_model,
    save_adapter,
)

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
SMALL_SHARD = "256KB"  # the tiny model's layers are ~0.5 MB in fp32: several shards


def written_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in a folder, by name (each name once)."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        part = load_file(file)
        assert not set(part) & set(tensors), f"{file.name} repeats tensors"
        tensors.update(part)
    return tensors


def check_hf_dir(folder: Path, dtype_name: str) -> None:
    """Sharded safetensors in the dtype, a config saying so with the KV cache on, a tokenizer."""
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1, sorted(p.name for p in folder.iterdir())
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    for shard in shards:
        with safe_open(shard, framework="pt") as f:
            names = f.keys()
            assert {f.get_slice(name).get_dtype() for name in names} == {
                {"bfloat16": "BF16", "float32": "F32"}[dtype_name]}
    config = json.loads((folder / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == dtype_name
    assert config["use_cache"] is True
    assert (folder / "tokenizer_config.json").exists()


def load_and_generate(folder: Path):
    """The exported folder loads with transformers and generates; the loaded model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    out = model.generate(**tokenizer("Hello there", return_tensors="pt"), max_new_tokens=4,
                         do_sample=False)
    assert out.shape[1] > 2
    return model


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float32"])
def test_full_export_writes_the_given_weights_sharded_in_the_dtype(tiny_model, tmp_path, dtype_name):
    from transformers import AutoTokenizer

    dtype = DTYPES[dtype_name]
    trained = load_model(str(tiny_model))  # fp32, as a run trained in fp32
    torch.manual_seed(1)
    with torch.no_grad():
        for param in trained.parameters():  # "training": every weight moves off the base
            param.add_(torch.randn_like(param) * 0.01)
    state = trained.state_dict()  # lm_head and embed_tokens: one tensor (tied)
    expected = {name: tensor.to(dtype).clone() for name, tensor in state.items()}

    out = tmp_path / "model"
    export_full_model(state, str(tiny_model), out, dtype=dtype, max_shard_size=SMALL_SHARD,
                      tokenizer=AutoTokenizer.from_pretrained(tiny_model))

    check_hf_dir(out, dtype_name)
    written = written_tensors(out)
    assert "lm_head.weight" not in written  # tied: written once, as embed_tokens
    assert set(written) == set(expected) - {"lm_head.weight"}
    reloaded = load_and_generate(out)
    assert reloaded.dtype == dtype
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    for name, tensor in reloaded.state_dict().items():
        assert tensor.dtype == dtype, name
        assert torch.equal(tensor, expected[name]), name


def test_full_export_refuses_weights_that_do_not_fit(tiny_model, tmp_path):
    state = load_model(str(tiny_model)).state_dict()
    del state["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(RuntimeError, match="up_proj"):
        export_full_model(state, str(tiny_model), tmp_path / "model", dtype=torch.bfloat16)
    assert not (tmp_path / "model").exists()


def test_export_dtype(tiny_model, tmp_path):
    assert export_dtype("bfloat16", str(tiny_model), torch.float32) == torch.bfloat16
    assert export_dtype("float16", str(tiny_model), torch.float32) == torch.float16
    assert export_dtype("auto", str(tiny_model), torch.bfloat16) == torch.float32  # the base's own
    undeclared = tmp_path / "undeclared"
    undeclared.mkdir()
    config = json.loads((tiny_model / "config.json").read_text())
    config.pop("dtype", None)
    config.pop("torch_dtype", None)
    (undeclared / "config.json").write_text(json.dumps(config))
    assert export_dtype("auto", str(undeclared), torch.bfloat16) == torch.bfloat16  # training's


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float32"])
def test_lora_export_writes_the_adapter_and_the_merged_model(tiny_model, tmp_path, dtype_name):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = DTYPES[dtype_name]
    lora = LoraConfig(r=4, alpha=8, dropout=0.0)
    trained = load_model(str(tiny_model), lora=lora)
    torch.manual_seed(2)
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if "lora_B" in name:  # zero at init: make the delta real
                param.normal_(std=0.1)

    adapter = adapter_state_dict(trained, zero_stage=2, rank=0)
    assert adapter and all("lora_" in name for name in adapter)  # the adapter, not the base
    save_adapter(trained, adapter, tmp_path / "adapter")
    export_merged_model(str(tiny_model), tmp_path / "adapter", tmp_path / "model", dtype=dtype,
                        max_shard_size=SMALL_SHARD,
                        tokenizer=AutoTokenizer.from_pretrained(tiny_model))

    # The adapter: a PEFT directory that loads back to the trained adapter weights.
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in (tmp_path / "adapter").iterdir()}
    reloaded = PeftModel.from_pretrained(load_model(str(tiny_model)), tmp_path / "adapter")
    reloaded_state = reloaded.state_dict()
    for name, tensor in adapter.items():
        assert torch.equal(reloaded_state[name], tensor), name

    # The merged model: W + B @ A * alpha / r for each adapted linear layer, the rest the base's.
    check_hf_dir(tmp_path / "model", dtype_name)
    base = load_file(tiny_model / "model.safetensors")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    merged = load_and_generate(tmp_path / "model").state_dict()
    adapted = set()
    for key in saved:
        if ".lora_A." not in key:
            continue
        module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
        a, b = saved[key].float(), saved[key.replace(".lora_A.", ".lora_B.")].float()
        weight = base[f"{module}.weight"].to(dtype).float()
        expected = (weight + (b @ a) * (lora.alpha / lora.r)).to(dtype)
        got = merged[f"{module}.weight"]
        assert got.dtype == dtype
        tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {
            "rtol": 2 ** -7, "atol": 1e-5}  # one bf16 step: the delta is summed in another order
        torch.testing.assert_close(got, expected, **tolerance, msg=f"{module}: not merged")
        assert not torch.allclose(got.float(), weight, rtol=1e-2, atol=1e-3), module  # delta shows
        adapted.add(f"{module}.weight")
    assert len(adapted) == 2 * 7  # all-linear: q k v o gate up down in each of the 2 layers
    for name, tensor in merged.items():
        if name not in adapted:
            source = base.get(name, base["model.embed_tokens.weight"])  # lm_head: tied
            assert torch.equal(tensor, source.to(dtype)), name

    if dtype == torch.float32:  # the merged model computes what base + adapter computes
        ids = torch.tensor([[1, 42, 7, 300, 9]])
        merged_model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
        with torch.no_grad():
            torch.testing.assert_close(merged_model(ids).logits, reloaded(ids).logits,
                                       rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_worker_export_uploads_model_and_adapter_without_renames(tiny_model, tmp_path, method, capsys):
    """The Ray worker's export step, minus Ray: one rank, ZeRO-2, a local run directory."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from ray_align.config import ModelConfig, TrainConfig
    from ray_align.training.ray_worker import _export

    lora = LoraConfig(r=4, alpha=8, dropout=0.0) if method == "lora" else None
    train = TrainConfig(zero_stage=2, precision="fp32", lora=lora)
    engine = SimpleNamespace(module=load_model(str(tiny_model), lora=lora))
    folder = tmp_path / "run" / "methods" / "m" / "train"
    (folder / "adapter").mkdir(parents=True)  # left by an earlier run: must not survive
    (folder / "adapter" / "stale.txt").write_text("old")
    _export(engine, ModelConfig(path=str(tiny_model), dtype="bfloat16"), train,
            AutoTokenizer.from_pretrained(tiny_model), str(tmp_path / "run"), "methods/m/train",
            rank=0, training_dtype=torch.float32)

    assert json.loads((folder / "model" / "config.json").read_text())["dtype"] == "bfloat16"
    assert (folder / "model" / "tokenizer_config.json").exists()
    assert not any(p.name.endswith(".tmp") for p in folder.iterdir())
    printed = capsys.readouterr().out
    assert f"exported model (bfloat16) {folder / 'model'}" in printed
    if method == "lora":
        assert {p.name for p in (folder / "adapter").iterdir()} >= {
            "adapter_config.json", "adapter_model.safetensors"}
        assert not (folder / "adapter" / "stale.txt").exists()
        assert f"exported LoRA adapter {folder / 'adapter'}" in printed
    else:
        assert not (folder / "adapter").exists()
