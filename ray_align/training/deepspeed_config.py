"""DeepSpeed ZeRO configuration as a pure function of the training config."""

from __future__ import annotations

from typing import Any

from ray_align.config import TrainConfig


def deepspeed_config(train: TrainConfig, world_size: int) -> dict[str, Any]:
    """The ``deepspeed.initialize`` config for a run: ZeRO stage, offload, precision, batch sizes.

    The optimizer is built here too (AdamW), so a checkpoint restores it exactly.
    """
    zero: dict[str, Any] = {"stage": train.zero_stage}
    if train.zero_stage >= 2:
        zero.update(contiguous_gradients=True, reduce_bucket_size=5e7, allgather_bucket_size=5e7)
        if not train.use_gpu:
            # gloo has no separate communication stream to overlap with; on GPU DeepSpeed's own
            # default stays (on for ZeRO-3): off would serialize reduce-scatter with backward
            zero["overlap_comm"] = False
    if train.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": train.use_gpu}
    if train.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": train.use_gpu}
    if train.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.micro_batch_size * train.grad_accum * world_size,
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": train.lr, "weight_decay": train.weight_decay, "betas": [0.9, 0.95]},
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if train.warmup_steps:
        config["scheduler"] = {
            "type": "WarmupLR",
            "params": {"warmup_min_lr": 0.0, "warmup_max_lr": train.lr,
                       "warmup_num_steps": train.warmup_steps},
        }
    if train.precision == "bf16":
        config["bf16"] = {"enabled": True}
    if not (train.use_gpu and train.offload_optimizer):
        # DeepSpeed's own Adam is a C++/CUDA extension compiled at the first step of every fresh
        # install (minutes; it fails where no compiler or CUDA toolkit is installed); torch's
        # fused AdamW needs no build and makes one pass over the parameters (about 6x faster
        # than torch's default on CPU). Only GPU training with the optimizer offloaded to the
        # CPU keeps DeepSpeed's CPU Adam, which ZeRO-Offload is built around.
        config["optimizer"]["params"].update(torch_adam=True, fused=True)
    if train.offload_optimizer and not train.use_gpu:
        config["zero_force_ds_cpu_optimizer"] = False  # ZeRO-Offload would insist on its own
    return config
