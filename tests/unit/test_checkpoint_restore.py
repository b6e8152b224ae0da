"""A training checkpoint that is truncated or incomplete is named in a clear error, never used.

The checkpoints are real DeepSpeed ones: a tiny torch model under ZeRO-2 in one process (gloo,
world of one, no Ray: ``single_process_group`` in conftest), saved as the Ray Train worker saves
them (``engine.save_checkpoint`` with tag ``state``, plus ``progress.json``), then damaged file by
file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from ray.train import Checkpoint

from ray_align.config import TrainConfig
from ray_align.training.core import deepspeed_engine
from ray_align.training.ray_worker import PROGRESS_FILE, CheckpointError, restore

POSITION = {"epoch": 1, "batches_done": 2, "global_step": 3, "tokens": 96}
TRAIN = TrainConfig(zero_stage=2, precision="fp32", micro_batch_size=4, lr=1e-2)


def _engine(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    return deepspeed_engine(model, TRAIN, world_size=1)


def _weights(engine) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


@pytest.fixture(scope="module")
def saved(single_process_group, tmp_path_factory):
    """A checkpoint after three optimizer steps, and the weights it holds."""
    engine = _engine(seed=0)
    x, y = torch.randn(4, 8), torch.randn(4, 1)
    for _ in range(3):
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
    folder = tmp_path_factory.mktemp("checkpoint")
    engine.save_checkpoint(str(folder), tag="state")
    (folder / PROGRESS_FILE).write_text(json.dumps(POSITION))
    return folder, _weights(engine)


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_sound_checkpoint_restores_its_weights_and_data_position(saved, tmp_path):
    folder, weights = saved
    engine = _engine(seed=1)  # other initial weights than the ones saved
    assert any(not torch.equal(weights[k], v) for k, v in _weights(engine).items())
    got = restore(engine, Checkpoint.from_directory(str(_copy(folder, tmp_path / "ckpt"))))
    assert got == POSITION
    assert engine.global_steps == 3
    for name, value in _weights(engine).items():
        torch.testing.assert_close(value, weights[name], rtol=0, atol=0)
    assert restore(engine, None)["global_step"] == 0


def _damage_model_states(folder: Path) -> None:
    (model_states,) = (folder / "state").glob("*model_states.pt")
    _truncate(model_states)


def _damage_optimizer_states(folder: Path) -> None:
    (optim_states,) = (folder / "state").glob("*optim_states.pt")
    _truncate(optim_states)


def _damage_progress(folder: Path) -> None:
    _truncate(folder / PROGRESS_FILE)


def _remove_progress(folder: Path) -> None:
    (folder / PROGRESS_FILE).unlink()


def _remove_deepspeed_state(folder: Path) -> None:
    shutil.rmtree(folder / "state")


@pytest.mark.parametrize(("damage", "named"), [
    (_damage_model_states, "PytorchStreamReader failed reading zip archive"),
    (_damage_optimizer_states, "PytorchStreamReader failed reading zip archive"),
    (_damage_progress, "JSONDecodeError"),
    (_remove_progress, "FileNotFoundError: [Errno 2] No such file or directory"),
    # DeepSpeed 0.19 answers a missing tag folder with a bare AssertionError (no text): restore
    # looks for the folder first and says so
    (_remove_deepspeed_state, "no DeepSpeed state folder in it"),
], ids=["model-states-truncated", "optimizer-states-truncated", "progress-truncated", "progress-missing",
        "deepspeed-state-missing"])
def test_a_truncated_or_incomplete_checkpoint_is_named(saved, tmp_path, damage, named):
    folder, _ = saved
    broken = _copy(folder, tmp_path / "ckpt")
    damage(broken)
    engine = _engine(seed=1)
    with pytest.raises(CheckpointError) as info:
        restore(engine, Checkpoint.from_directory(str(broken)))
    message = str(info.value)
    assert f"checkpoint {broken} is unreadable" in message
    assert named in message
    assert "delete that checkpoint folder" in message
