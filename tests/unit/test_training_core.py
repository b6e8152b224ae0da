import math

import numpy as np
import torch

from ray_align.config import TrainConfig
from ray_align.training.core import (
    IGNORE_INDEX,
    collate,
    mean_over_ranks,
    micro_batches,
    training_dtype,
    while_every_rank_has_one,
)
from ray_align.training.deepspeed_config import deepspeed_config


def test_collate_pads_and_masks_prompt_and_padding():
    batch = collate([([5, 6, 7, 8], 2), ([9, 10, 11], 1)], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 11, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    i = IGNORE_INDEX
    assert batch["labels"].tolist() == [[i, i, 7, 8], [i, 10, 11, i]]
    assert batch["labels"].dtype == torch.long


def test_length_grouped_micro_batches_keep_every_row_once_and_cut_padding():
    rng = np.random.default_rng(1)
    lengths = rng.integers(5, 200, size=64)
    window = {"input_ids": [np.arange(n) for n in lengths], "prompt_len": np.ones(64, dtype=int)}

    def padded_tokens(batches):
        return sum(b["input_ids"].numel() for b in batches)

    grouped = list(micro_batches([window], pad_id=0, size=4, seed=3))
    in_file_order = [{k: v[i : i + 4] for k, v in window.items()} for i in range(0, 64, 4)]
    plain = list(micro_batches(in_file_order, pad_id=0))
    assert len(grouped) == len(plain) == 16
    assert sorted(int(m.sum()) for b in grouped for m in b["attention_mask"]) == sorted(lengths)
    assert padded_tokens(grouped) < 0.7 * padded_tokens(plain)
    again = list(micro_batches([window], pad_id=0, size=4, seed=3))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(grouped, again, strict=True))


def test_deepspeed_config_is_a_pure_function_of_the_config():
    cfg = TrainConfig(zero_stage=3, offload_optimizer=True, offload_params=True,
                      micro_batch_size=2, grad_accum=4, precision="bf16")
    ds = deepspeed_config(cfg, world_size=8)
    assert ds == deepspeed_config(cfg, world_size=8)
    assert ds["train_batch_size"] == 2 * 4 * 8
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert ds["bf16"] == {"enabled": True}
    plain = deepspeed_config(TrainConfig(zero_stage=0, precision="fp32"), world_size=1)
    assert "bf16" not in plain and "offload_optimizer" not in plain["zero_optimization"]


def test_torch_fused_adamw_unless_a_gpu_run_offloads_the_optimizer():
    """DeepSpeed's own Adam is compiled at the first step (and needs a CUDA toolkit on a GPU):
    only ZeRO-Offload on GPU nodes keeps it."""
    for use_gpu, offload in [(False, False), (False, True), (True, False)]:
        ds = deepspeed_config(TrainConfig(use_gpu=use_gpu, offload_optimizer=offload), world_size=2)
        assert ds["optimizer"]["params"]["torch_adam"] is True and ds["optimizer"]["params"]["fused"]
    offloaded = deepspeed_config(TrainConfig(use_gpu=True, offload_optimizer=True), world_size=2)
    assert "torch_adam" not in offloaded["optimizer"]["params"]
    assert "zero_force_ds_cpu_optimizer" not in offloaded
    assert deepspeed_config(TrainConfig(offload_optimizer=True), 2)["zero_force_ds_cpu_optimizer"] is False


def test_a_steps_loss_is_the_token_weighted_mean_of_its_micro_batches():
    from ray_align.training.core import step_loss

    assert step_loss([(2.0, 10), (4.0, 30)]) == 3.5
    assert step_loss([(1.5, 7)]) == 1.5
    assert math.isnan(step_loss([(1.0, 0)]))


def test_training_dtype_follows_the_precision():
    assert training_dtype(TrainConfig(precision="bf16")) == torch.bfloat16
    assert training_dtype(TrainConfig(precision="fp32")) == torch.float32


def _on_rank(rank: int, init: str, inputs: list, work, out) -> None:
    """One gloo rank of ``len(inputs)``: ``work(its input)``'s result goes to ``out``."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=len(inputs))
    try:
        out.put((rank, work(inputs[rank])))
    finally:
        dist.destroy_process_group()


def on_ranks(tmp_path, work, inputs: list) -> dict[int, object]:
    """Run ``work`` on one spawned gloo rank per input; each rank's result by rank."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    out = context.Queue()
    init = f"file://{tmp_path / 'store'}"
    procs = [context.Process(target=_on_rank, args=(r, init, inputs, work, out))
             for r in range(len(inputs))]
    for proc in procs:
        proc.start()
    results = dict(out.get(timeout=120) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
    return results


def _mean_of_shard(shard: tuple[float, int]) -> tuple[float, int]:
    return mean_over_ranks(*shard)


def test_validation_loss_is_the_token_weighted_mean_over_all_ranks(tmp_path):
    """Each rank evaluates its own shard: the loss is every token's, not rank 0's (2.0)."""
    shards = [(2.0, 10), (4.0, 30), (float("nan"), 0)]  # the last rank's shard had no tokens
    assert on_ranks(tmp_path, _mean_of_shard, shards) == {r: (3.5, 40) for r in range(len(shards))}


def test_without_a_process_group_the_mean_is_this_processs_own():
    assert mean_over_ranks(2.5, 8) == (2.5, 8)
    loss, tokens = mean_over_ranks(float("nan"), 0)
    assert math.isnan(loss) and tokens == 0


def _steps_taken(micro_batches: int) -> int:
    return len(list(while_every_rank_has_one(range(micro_batches))))


def test_ranks_with_epochs_of_unequal_length_all_stop_at_the_shortest(tmp_path):
    """Packed epochs differ between ranks: every rank must take the same number of steps, or
    the longer one waits forever in the gradient all-reduce."""
    assert on_ranks(tmp_path, _steps_taken, [5, 3, 4]) == {0: 3, 1: 3, 2: 3}
    assert len(list(while_every_rank_has_one(range(4)))) == 4  # no process group: all of them


def test_overlap_comm_is_deepspeeds_default_on_gpu_and_off_on_gloo():
    """Forced off it serializes ZeRO's reduce-scatter with backward on NCCL; gloo has no
    communication stream to overlap with."""
    for stage in (2, 3):
        assert "overlap_comm" not in deepspeed_config(TrainConfig(zero_stage=stage, use_gpu=True),
                                                      2)["zero_optimization"]
        on_gloo = deepspeed_config(TrainConfig(zero_stage=stage), 2)["zero_optimization"]
        assert on_gloo["overlap_comm"] is False


def test_auto_attention_is_flash_attention_on_gpu_workers_that_have_it_else_sdpa(monkeypatch,
                                                                                  tiny_model):
    import importlib.util

    from ray_align.training.core import attention_implementation, load_model, uses_varlen_attention

    assert attention_implementation("auto", use_gpu=False) == "sdpa"
    assert attention_implementation("eager", use_gpu=False) == "eager"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "flash_attn" else found(name, *a))
    assert attention_implementation("auto", use_gpu=True) == "flash_attention_2"
    assert attention_implementation("auto", use_gpu=False) == "sdpa"
    monkeypatch.undo()
    # the choice reaches the model (transformers itself would pick sdpa)
    model = load_model(str(tiny_model), attn_implementation="eager")
    assert model.config._attn_implementation == "eager" and not uses_varlen_attention(model)
