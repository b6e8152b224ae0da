"""A training checkpoint that is truncated or incomplete is named in a clear error, never used."""

from __future__ import annotations

import json

import pytest
from ray.train import Checkpoint

from ray_align.training.ray_worker import PROGRESS_FILE, CheckpointError, restore


class FakeEngine:
    """Stands in for a DeepSpeed engine: ``load_checkpoint`` returns (path, state) or fails."""

    def __init__(self, result=None, error: Exception | None = None) -> None:
        self.result, self.error = result, error

    def load_checkpoint(self, folder, tag):
        if self.error:
            raise self.error
        return self.result


def _checkpoint(tmp_path, progress: str | None):
    if progress is not None:
        (tmp_path / PROGRESS_FILE).write_text(progress)
    return Checkpoint.from_directory(str(tmp_path))


def test_a_sound_checkpoint_gives_its_data_position(tmp_path):
    position = {"epoch": 0, "batches_done": 6, "global_step": 3, "tokens": 900}
    got = restore(FakeEngine(result=("state", {})), _checkpoint(tmp_path, json.dumps(position)))
    assert got == position
    assert restore(FakeEngine(), None)["global_step"] == 0


@pytest.mark.parametrize(("engine", "progress", "named"), [
    (FakeEngine(result=("state", {})), '{"epoch": 0, "batch', "JSONDecodeError"),
    (FakeEngine(result=("state", {})), None, "FileNotFoundError"),
    (FakeEngine(result=(None, None)), '{"epoch": 0}', "no DeepSpeed state"),
    (FakeEngine(error=RuntimeError("PytorchStreamReader failed reading zip archive")),
     '{"epoch": 0}', "failed reading zip archive"),
])
def test_a_truncated_or_incomplete_checkpoint_is_named(tmp_path, engine, progress, named):
    with pytest.raises(CheckpointError) as info:
        restore(engine, _checkpoint(tmp_path, progress))
    assert str(tmp_path) in str(info.value) and named in str(info.value)
    assert "delete that checkpoint folder" in str(info.value)
