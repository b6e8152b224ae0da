"""The train stage's driver side, with Ray Data and Ray Train replaced by stand-ins: the data
order that resuming relies on is kept for the trainer's datasets alone."""

from __future__ import annotations

from types import SimpleNamespace

from ray_align.stages import train as train_stage


class FakeDataset:
    """What ``read_parquet`` returns: a dataset with its own copy of the Ray Data context."""

    def __init__(self) -> None:
        from ray.data import DataContext

        self.context = DataContext.get_current().copy()
        self.materialized_in_order: bool | None = None

    def materialize(self) -> FakeDataset:
        self.materialized_in_order = self.context.execution_options.preserve_order
        return self

    def count(self) -> int:
        return 8


class FakeBar:
    def __init__(self, total: int) -> None:
        self.handle = None

    def __enter__(self) -> FakeBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def test_data_order_is_preserved_for_training_only(ctx, monkeypatch):
    import ray
    import ray.data
    import ray.train.torch
    from ray.data import DataContext

    import ray_align.training.progress

    read: list[FakeDataset] = []
    trainers: list[dict] = []

    def read_parquet(uri, columns):
        read.append(FakeDataset())
        return read[-1]

    class FakeTrainer:
        def __init__(self, loop, **kwargs) -> None:
            trainers.append(kwargs)

        def fit(self):
            ctx.run.write_json({}, "train", "model", "config.json")
            return SimpleNamespace(error=None, metrics={"global_step": 4})

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8})
    monkeypatch.setattr(ray.data, "read_parquet", read_parquet)
    monkeypatch.setattr(ray.train.torch, "TorchTrainer", FakeTrainer)
    monkeypatch.setattr(ray_align.training.progress, "TrainProgressBar", FakeBar)
    # the default, restored after the test whatever the stage does to it
    monkeypatch.setattr(DataContext.get_current().execution_options, "preserve_order", False)

    out = train_stage.train(ctx)

    assert out.metrics == {"global_step": 4}
    assert DataContext.get_current().execution_options.preserve_order is False  # later stages'
    assert [d.materialized_in_order for d in read] == [True, True]  # train, validation
    shards = trainers[0]["dataset_config"]
    for split in ("train", "validation"):  # what Ray Train sets on each dataset it shards
        assert shards._resolve_execution_options(split).preserve_order is True


def test_the_gpu_check_can_be_left_to_the_autoscaler(ctx, monkeypatch):
    """GPU nodes from 0 (the shipped autoscaling clusters): a run that starts at train must not
    be refused for GPUs the autoscaler has not added yet."""
    import pytest
    import ray
    import ray.data
    import ray.train.torch

    import ray_align.training.progress

    class FakeTrainer:
        def __init__(self, loop, **kwargs) -> None:
            pass

        def fit(self):
            ctx.run.write_json({}, "train", "model", "config.json")
            return SimpleNamespace(error=None, metrics={"global_step": 4})

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8})  # no GPU node yet
    monkeypatch.setattr(ray.data, "read_parquet", lambda uri, columns: FakeDataset())
    monkeypatch.setattr(ray.train.torch, "TorchTrainer", FakeTrainer)
    monkeypatch.setattr(ray_align.training.progress, "TrainProgressBar", FakeBar)
    ctx.config.train.use_gpu = True
    with pytest.raises(ValueError, match="GPU workers but the cluster has 0 GPUs"):
        train_stage.train(ctx)
    ctx.config.train.check_resources = False
    assert train_stage.train(ctx).metrics == {"global_step": 4}
