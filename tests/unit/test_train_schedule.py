"""Warnings about a schedule that does not fit the run's optimizer steps (a warmup that never
ends, a checkpoint interval past the end), at ``ray-align check`` and at the train stage."""

from __future__ import annotations

import pyarrow as pa

from ray_align.cli import main
from ray_align.config import load_config
from ray_align.stages import train as train_stage
from ray_align.stages.train import estimated_total_steps, planned_steps, schedule_warnings
from ray_align.storage import RunDir
from tests.unit.test_config import QUICKSTART, REPO
from tests.unit.test_train_stage import FakeBar, FakeDataset

GPU_CONFIG = REPO / "configs" / "gpu-llama3-8b.yaml"


def test_the_estimate_follows_the_configs_rows_and_batch():
    # 64 harmful + 64 helpful (ratio 1, helpful limit 180) = 128, 10% held out: 115 rows; one
    # row per micro-batch slot: 115 // 2 workers = 57 rows a worker / 1 per micro-batch / 4 accum
    config = load_config(QUICKSTART, ["build.val_fraction=0.1", "build.helpful_ratio=1"])
    assert estimated_total_steps(config) == 57 // 4
    capped = load_config(QUICKSTART, ["build.val_fraction=0.1", "build.helpful_ratio=4",
                                      "data.helpful.limit=64"])
    assert estimated_total_steps(capped) == 57 // 4  # the helpful source has only 64 rows
    assert estimated_total_steps(load_config(QUICKSTART, ["train.max_steps=3"])) == 3
    assert estimated_total_steps(load_config(QUICKSTART, ["data.harmful.limit=null"])) is None


def test_warmup_and_checkpoints_past_the_end_are_named_one_line_each():
    config = load_config(QUICKSTART, ["train.warmup_steps=10", "train.checkpoint_every_steps=11"])
    warmup, checkpoints = schedule_warnings(config.train, 10, False, "counted")
    assert warmup.startswith("train.warmup_steps 10 >= the optimizer steps of training, 10 (counted)")
    assert checkpoints.startswith("train.checkpoint_every_steps 11 > the optimizer steps of training")
    assert "\n" not in warmup + checkpoints
    assert schedule_warnings(config.train, 11, False, "counted") == []  # warmup ends, checkpoint at 11
    assert "at most 9" in schedule_warnings(config.train, 9, True, "estimated")[0]
    no_checkpoints = load_config(QUICKSTART, ["train.warmup_steps=0"])  # once per epoch, no warmup
    assert schedule_warnings(no_checkpoints.train, 1, False, "counted") == []


def test_check_warns_from_the_config_before_any_data_exists(capsys, tmp_path):
    run_dir = f"run_dir={tmp_path / 'run'}"
    assert main(["check", str(QUICKSTART), run_dir]) == 0
    assert "warning" not in capsys.readouterr().err  # the quickstart as shipped
    assert main(["check", str(QUICKSTART), run_dir, "train.warmup_steps=100",
                 "train.checkpoint_every_steps=200"]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" ")[2] for line in lines] == ["train.warmup_steps", "train.checkpoint_every_steps"]
    assert all(line.startswith("ray-align: warning: ") and "estimated from the config" in line
               for line in lines)


def test_check_counts_the_steps_from_the_build_when_it_exists(tmp_path):
    config = load_config(QUICKSTART, [f"run_dir={tmp_path / 'run'}"])
    run = RunDir(config.run_dir)
    run.write_table(pa.table({"input_ids": [[1, 2, 3]] * 40, "prompt_len": [1] * 40}),
                    "build", "train.parquet")
    steps, bound, how = planned_steps(config, run)
    assert (steps, bound, how) == (40 // 2 // 4, False, "counted from build/train.parquet")
    config.train.warmup_steps = 5
    assert "5 (counted from build/train.parquet)" in train_stage.check_warnings(config)[0]


def test_packed_steps_are_counted_from_the_builds_token_lengths(tmp_path):
    config = load_config(QUICKSTART, [f"run_dir={tmp_path / 'run'}", "train.packing=true",
                                      "train.grad_accum=1"])
    run = RunDir(config.run_dir)
    run.write_table(pa.table({"input_ids": [[1] * 100] * 40, "prompt_len": [1] * 40,
                              "num_tokens": [100] * 40,
                              "rejected_ids": pa.array([[]] * 40, pa.list_(pa.int32()))}),
                    "build", "train.parquet")
    steps, bound, _ = planned_steps(config, run)
    # 20 rows a worker of 100 tokens in sequences of up to 1,024: 2 packed micro-batches
    assert (steps, bound) == (train_stage.packed_micro_per_epoch(
        config.train, run, "build", config.max_seq_len), False)
    assert steps < estimated_total_steps(config)  # the config's estimate is a bound


def test_the_gpu_config_warms_up_and_checkpoints_within_its_estimated_steps():
    config = load_config(GPU_CONFIG)
    assert train_stage.check_warnings(config) == []
    tokens_per_step = (config.train.micro_batch_size * config.train.grad_accum
                       * config.train.num_workers * config.max_seq_len)
    assert tokens_per_step == 65_536  # the arithmetic written beside it


def test_the_train_stage_warns_with_the_real_count(ctx, monkeypatch, capsys):
    from types import SimpleNamespace

    import ray
    import ray.data
    import ray.train.torch

    import ray_align.training.progress

    class Trainer:
        def __init__(self, loop, **kwargs) -> None:
            pass

        def fit(self):
            ctx.run.write_json({}, "train", "model", "config.json")
            return SimpleNamespace(error=None, metrics={})

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8})
    monkeypatch.setattr(ray.data, "read_parquet", lambda uri, columns: FakeDataset())
    monkeypatch.setattr(ray.train.torch, "TorchTrainer", Trainer)
    monkeypatch.setattr(ray_align.training.progress, "TrainProgressBar", FakeBar)
    ctx.config.train.warmup_steps = 3
    train_stage.train(ctx)  # 8 rows, 2 workers, 1 per micro-batch, 4 accumulated: 1 step
    out = capsys.readouterr().out
    assert "[train] warning: train.warmup_steps 3 >= the optimizer steps of training, 1 (counted" in out
