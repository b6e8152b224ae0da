"""ZeRO-3 on two real gloo ranks (spawned processes, no Ray): each rank loads only its half of the
model, the export gathers a correct Hugging Face model on rank 0 (a plain load there, after the
partitioned one, does not hang), and a checkpoint on object storage is restored by each rank from
its own shards and the shared files only, with the same weights and optimizer state."""

from __future__ import annotations

import os
import traceback
from pathlib import Path

import torch

from ray_align.config import TrainConfig

TRAIN = TrainConfig(num_workers=2, zero_stage=3, precision="fp32", micro_batch_size=2, lr=1e-2)
POSITION = {"epoch": 0, "batches_done": 1, "global_step": 1, "tokens": 48}


def _engine(model_dir: str):
    from ray_align.training.core import deepspeed_engine, load_model, partitioned_loading
    from ray_align.training.deepspeed_config import deepspeed_config

    with partitioned_loading(deepspeed_config(TRAIN, world_size=2)):
        model = load_model(model_dir)
    return model, deepspeed_engine(model, TRAIN, world_size=2)


def _step(engine, rank: int) -> None:
    ids = (torch.arange(2 * 12).reshape(2, 12) * (rank + 3)) % 200 + 5  # each rank its own batch
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()


def _gathered(engine, rank: int) -> dict[str, torch.Tensor] | None:
    from ray_align.training.core import full_state_dict

    state = full_state_dict(engine, zero_stage=3, rank=rank)
    return None if state is None else {k: v.detach().clone() for k, v in state.items()}


def _restored(spec: dict, rank: int, seen: list[str]):
    """A fresh engine restored from the checkpoint on object storage; the files its rank read."""
    from ray.train import Checkpoint

    from ray_align.storage import RunDir
    from ray_align.training.ray_worker import restore

    _, engine = _engine(spec["model"])
    load = engine.load_checkpoint

    def load_and_look(path, **kwargs):
        seen.extend(sorted(str(p.relative_to(path)) for p in Path(path).rglob("*") if p.is_file()))
        return load(path, **kwargs)

    engine.load_checkpoint = load_and_look
    remote = RunDir(spec["checkpoint_uri"])
    scratch = Path(spec["scratch"]) / f"rank{rank}"
    scratch.mkdir(parents=True)
    assert restore(engine, Checkpoint(path=remote.root, filesystem=remote.fs), rank=rank,
                   scratch=str(scratch)) == POSITION
    return engine


def _on_rank(spec: dict) -> dict:
    """One rank's run: load, step, export, checkpoint, restore, step again."""
    import torch.distributed as dist

    from ray_align.storage import RunDir
    from ray_align.training.core import export_full_model
    from ray_align.training.ray_worker import write_checkpoint

    rank = dist.get_rank()
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")  # what DeepSpeed asks of a launcher
    model, engine = _engine(spec["model"])
    params = list(model.parameters())
    out = {"partitioned": all(hasattr(p, "ds_id") for p in params),
           "local": sum(p.ds_tensor.numel() for p in params), "full": sum(p.ds_numel for p in params)}
    out["loaded"] = _gathered(engine, rank)
    _step(engine, rank)
    trained = _gathered(engine, rank)
    if rank == 0:
        export_full_model(dict(trained), spec["model"], spec["export"], dtype=torch.float32)
    folder = Path(spec["scratch"]) / "checkpoint"
    write_checkpoint(engine, str(folder), POSITION, rank)
    dist.barrier()
    if rank == 0:
        RunDir(spec["checkpoint_uri"]).upload_dir(folder)
    dist.barrier()
    seen: list[str] = []
    resumed = _restored(spec, rank, seen)
    out["seen"], out["restored"] = seen, _gathered(resumed, rank)
    _step(engine, rank)
    _step(resumed, rank)  # the same weights only if the optimizer state came back too
    out["next"], out["resumed_next"] = _gathered(engine, rank), _gathered(resumed, rank)
    out["trained"] = trained
    # numpy across the queue: torch's shared-memory tensors would not outlive this process
    return {k: {n: t.numpy() for n, t in v.items()} if isinstance(v, dict) else v
            for k, v in out.items()}


def _guarded(rank: int, init: str, spec: dict, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        results.put((rank, _on_rank(spec)))
    except Exception:  # noqa: BLE001 - the parent reports it instead of waiting for a timeout
        results.put((rank, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def _run_two_ranks(tmp_path: Path, spec: dict) -> dict[int, dict]:
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    results = context.Queue()
    init = f"file://{tmp_path / 'store'}"
    procs = [context.Process(target=_guarded, args=(r, init, spec, results)) for r in range(2)]
    for proc in procs:
        proc.start()
    got = dict(results.get(timeout=400) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
    for rank, result in got.items():
        assert isinstance(result, dict), f"rank {rank} failed:\n{result}"
    return got


def test_zero3_on_two_ranks_loads_halves_exports_and_restores_per_rank(tiny_model, s3_bucket, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    spec = {"model": str(tiny_model), "export": str(tmp_path / "export"),
            "scratch": str(tmp_path / "scratch"), "checkpoint_uri": f"{s3_bucket}/ray_train/ckpt"}
    ranks = {rank: {k: {n: torch.from_numpy(a) for n, a in v.items()} if isinstance(v, dict) else v
                    for k, v in result.items()}
             for rank, result in _run_two_ranks(tmp_path, spec).items()}

    for rank, result in ranks.items():  # each rank holds its half of every parameter, no more
        assert result["partitioned"], rank
        assert result["local"] <= result["full"] // 2 + 64, (rank, result["local"], result["full"])
    base = {}
    for file in sorted(Path(tiny_model).glob("*.safetensors")):
        base.update(load_file(file))
    loaded = ranks[0]["loaded"]
    for name, value in base.items():  # the checkpoint's weights, not a random initialization
        torch.testing.assert_close(loaded[name].float(), value.float(), rtol=0, atol=0)

    exported = AutoModelForCausalLM.from_pretrained(spec["export"]).state_dict()
    trained = ranks[0]["trained"]
    assert any(not torch.equal(trained[n], loaded[n]) for n in trained)  # the step moved them
    for name, value in trained.items():
        torch.testing.assert_close(exported[name], value, rtol=0, atol=0)

    shards = {0: "zero_pp_rank_0_", 1: "zero_pp_rank_1_"}
    for rank, result in ranks.items():  # its own model and optimizer shards, not the other's
        own = [n for n in result["seen"] if shards[rank] in n]
        assert len(own) == 2 and not [n for n in result["seen"] if shards[1 - rank] in n], result["seen"]
        assert "progress.json" in result["seen"]
    for name, value in trained.items():
        torch.testing.assert_close(ranks[0]["restored"][name], value, rtol=0, atol=0)
    for name, value in ranks[0]["next"].items():
        torch.testing.assert_close(ranks[0]["resumed_next"][name], value, rtol=0, atol=0)
