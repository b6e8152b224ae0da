"""A training checkpoint that is truncated or incomplete is named in a clear error, never used.

The checkpoints are real DeepSpeed ones: a tiny torch model under ZeRO-2 in one process (gloo,
world of one, no Ray: ``single_process_group`` in conftest), saved as the Ray Train worker saves
them (``engine.save_checkpoint`` with tag ``state``, plus ``progress.json``), then damaged file by
file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

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


# A ZeRO-3 checkpoint of 2 ranks in bf16, as DeepSpeed names its files (rank 1 and rank 10 must
# not be mistaken for one another).
ZERO3_FILES = ["latest", "zero_to_fp32.py", PROGRESS_FILE,
               "state/zero_pp_rank_0_mp_rank_00_model_states.pt",
               "state/zero_pp_rank_1_mp_rank_00_model_states.pt",
               "state/zero_pp_rank_10_mp_rank_00_model_states.pt",
               "state/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
               "state/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
               "state/zero_pp_rank_1_mp_rank_00_optim_states.pt"]


def test_a_rank_reads_its_own_zero_shards_and_the_shared_files():
    from ray_align.training.ray_worker import needed_by_rank

    shared = ["latest", "zero_to_fp32.py", PROGRESS_FILE]
    assert [n for n in ZERO3_FILES if needed_by_rank(1)(n)] == [
        *shared, "state/zero_pp_rank_1_mp_rank_00_model_states.pt",
        "state/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "state/zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert needed_by_rank(0)("state/mp_rank_00_model_states.pt")  # below ZeRO-3: every rank's


def test_a_checkpoint_on_object_storage_restores_from_this_ranks_files_only(saved, s3_bucket,
                                                                             tmp_path):
    """Each rank downloads its own shards and the shared files into the scratch folder (Ray's
    ``as_directory`` downloads every rank's), and the download is gone afterwards."""
    import pyarrow.fs as pafs

    from ray_align.storage import RunDir

    folder, weights = saved
    other_rank = folder / "state" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    local = _copy(folder, tmp_path / "ckpt")
    (local / other_rank.relative_to(folder)).write_bytes(b"another rank's shard")
    remote = RunDir(f"{s3_bucket}/ray_train/checkpoint_000001")
    remote.upload_dir(local)
    engine = _engine(seed=1)
    seen: list[str] = []
    where: list[Path] = []
    load = engine.load_checkpoint

    def load_and_look(path, **kwargs):
        where.append(Path(path))
        seen.extend(sorted(str(p.relative_to(path)) for p in Path(path).rglob("*") if p.is_file()))
        return load(path, **kwargs)

    engine.load_checkpoint = load_and_look
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    checkpoint = Checkpoint(path=remote.root, filesystem=remote.fs)
    assert not isinstance(checkpoint.filesystem, pafs.LocalFileSystem)
    assert restore(engine, checkpoint, rank=0, scratch=str(scratch)) == POSITION
    assert "state/zero_pp_rank_1_mp_rank_00_optim_states.pt" not in seen
    assert "state/zero_pp_rank_0_mp_rank_00_optim_states.pt" in seen and PROGRESS_FILE in seen
    assert where[0].parent == scratch and not list(scratch.iterdir())  # downloaded there, then removed
    for name, value in _weights(engine).items():
        torch.testing.assert_close(value, weights[name], rtol=0, atol=0)


LORA_TRAIN = TrainConfig(zero_stage=2, precision="fp32", micro_batch_size=2, lr=1e-2,
                         lora={"r": 4, "alpha": 8, "dropout": 0.0})


def _lora_engine(tiny_model, seed: int):
    from ray_align.training.core import load_model

    torch.manual_seed(seed)  # the adapter's initial A matrices
    model = load_model(str(tiny_model), lora=LORA_TRAIN.lora)
    return deepspeed_engine(model, LORA_TRAIN, world_size=1)


def _lora_step(engine) -> None:
    ids = torch.arange(2 * 12).reshape(2, 12) % 200 + 5
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()


def _trainable(engine) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in engine.module.named_parameters() if p.requires_grad}


def test_a_lora_checkpoint_holds_the_adapter_only_and_resumes_it_exactly(single_process_group,
                                                                         tiny_model, tmp_path):
    """The frozen base is the model's own: a checkpoint with it would be as big as the model."""
    from ray_align.training.ray_worker import write_checkpoint

    engine = _lora_engine(tiny_model, seed=0)
    for _ in range(2):
        _lora_step(engine)
    folder = tmp_path / "ckpt"
    write_checkpoint(engine, str(folder), POSITION, rank=0, frozen_excluded=True)
    (states,) = (folder / "state").glob("mp_rank_*_model_states.pt")
    module = torch.load(states, map_location="cpu", weights_only=False)["module"]
    adapter = _trainable(engine)
    assert set(module) == set(adapter) and all("lora_" in name for name in module)
    base_bytes = sum(p.numel() * p.element_size() for p in engine.module.parameters()
                     if not p.requires_grad)
    assert states.stat().st_size < base_bytes / 4  # the adapter, not the base

    resumed = _lora_engine(tiny_model, seed=1)  # other initial adapter weights
    assert any(not torch.equal(v, adapter[n]) for n, v in _trainable(resumed).items())
    restore(resumed, Checkpoint.from_directory(str(folder)), frozen_excluded=True)
    for name, value in _trainable(resumed).items():
        torch.testing.assert_close(value, adapter[name], rtol=0, atol=0)
    _lora_step(engine)  # the same next step: equal only if Adam's moments were restored too
    _lora_step(resumed)
    after = _trainable(engine)
    for name, value in _trainable(resumed).items():
        torch.testing.assert_close(value, after[name], rtol=0, atol=0)


def test_checkpoints_are_staged_in_the_scratch_folder(single_process_group, tmp_path, monkeypatch):
    """Not the system temp dir: a checkpoint's shards at 8B are ~14 GB per rank."""
    import ray.train

    from ray_align.training.ray_worker import _save, scratch_folder

    scratch = scratch_folder(TrainConfig(scratch_dir=str(tmp_path / "scratch")))  # made if missing
    staged: list[tuple[Path, list[str]]] = []

    def report(metrics, checkpoint):
        folder = Path(checkpoint.path)
        staged.append((folder, sorted(p.name for p in folder.iterdir())))

    monkeypatch.setattr(ray.train, "report", report)
    monkeypatch.setattr(ray.train, "get_context", lambda: SimpleNamespace(get_world_rank=lambda: 0))
    _save(_engine(seed=0), POSITION, {"loss": 1.0}, scratch=scratch)
    ((folder, names),) = staged
    assert folder.parent == tmp_path / "scratch" and {"latest", PROGRESS_FILE, "state"} <= set(names)
    assert not folder.exists()  # uploaded by Ray Train, then removed
