"""The Ray Train worker loop's bookkeeping, without Ray or a model: checkpoints only where an
optimizer step ends (an epoch that ends mid-step saves at the next step), a step's loss spanning
an epoch's end, the validation loss over all ranks, and as many steps as the progress bar's
total, resumed or not."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from ray_align.config import ModelConfig, TrainConfig
from ray_align.stages.train import total_steps
from ray_align.training import ray_worker
from ray_align.training.ray_worker import CheckpointSchedule


def test_checkpoints_wait_for_the_end_of_an_optimizer_step():
    schedule = CheckpointSchedule(grad_accum=4, every_steps=2)
    assert [m for m in range(1, 21) if schedule.after_micro_batch(m)] == [8, 16]
    assert schedule.at_epoch_end(12, finished=False)  # at a step's end: save now
    assert not schedule.at_epoch_end(13, finished=False)  # mid-step: owed to the next step
    assert not schedule.after_micro_batch(14) and not schedule.after_micro_batch(15)
    assert schedule.after_micro_batch(16) and not schedule.owed
    assert not schedule.at_epoch_end(17, finished=False)
    assert schedule.after_micro_batch(20)  # owed, though not a periodic step
    assert schedule.at_epoch_end(21, finished=True)  # the end: the partial step is never taken


def test_without_a_cadence_only_epoch_ends_save():
    schedule = CheckpointSchedule(grad_accum=1)
    assert not any(schedule.after_micro_batch(m) for m in range(1, 10))
    assert schedule.at_epoch_end(9, finished=False)


class FakeEngine:
    """DeepSpeed's accumulation as the loop sees it: an optimizer step on every
    ``grad_accum``-th micro-batch, counted by the engine since it started (a loaded checkpoint
    restores the step count, never the micro-step count)."""

    def __init__(self, grad_accum: int) -> None:
        self.grad_accum, self.micro_steps, self.global_steps, self.device = grad_accum, 0, 0, "cpu"

    def micro_step(self) -> None:
        if (self.micro_steps + 1) % self.grad_accum == 0:  # is_gradient_accumulation_boundary
            self.global_steps += 1
        self.micro_steps += 1

    def get_lr(self) -> list[float]:
        return [1e-3]

    def get_global_grad_norm(self) -> float:
        return 0.5


class FakeShard:
    def __init__(self, rows: int) -> None:
        self.rows = rows

    def iter_batches(self, batch_size: int, batch_format: str, drop_last: bool = False):
        for start in range(0, self.rows, batch_size):
            count = min(batch_size, self.rows - start)
            yield {"input_ids": [np.arange(3 + i % 3) for i in range(start, start + count)],
                   "prompt_len": np.ones(count, dtype=int)}


def run_loop(monkeypatch, train: TrainConfig, rows: int, progress: dict | None = None,
             max_seq_len: int = 12):
    """Run ``train_loop_per_worker`` on one rank with fakes; what it saved and reported."""
    import ray.train

    events: list[tuple] = []
    engine = FakeEngine(train.grad_accum)
    losses = iter(range(1, 10_000))  # each micro-batch's loss: 1, 2, 3, ... (one token each)

    def train_step(eng, batch, objective=None):
        eng.micro_step()
        return float(next(losses)), 1

    def restore(eng, checkpoint, **where):
        start = progress or {"epoch": 0, "batches_done": 0, "global_step": 0, "tokens": 0}
        eng.global_steps = start["global_step"]
        return start

    def save(eng, state, metrics, **where):
        events.append(("save", state, metrics, eng.micro_steps % eng.grad_accum == 0))

    patches = {
        "local_model_path": lambda path: path,
        "load_tokenizer": lambda path, trust: SimpleNamespace(pad_token_id=0, eos_token_id=0),
        "load_model": lambda *args, **kwargs: None,
        "deepspeed_engine": lambda model, cfg, world: engine,
        "restore": restore, "train_step": train_step, "_save": save,
        "eval_loss": lambda eng, batches, device, objective=None: (2.0, 4),  # this rank's own shard
        "mean_over_ranks": lambda loss, tokens, device: (3.0, 12),  # every rank's
        "_sum_over_ranks": lambda value, device: value,
        # the end's export ("train"), or a learning curve's point (its folder recorded)
        "_export": lambda *args: events.append(("export", engine.global_steps)
                                               + (() if args[5] == "train" else (args[5],))),
    }
    for name, fake in patches.items():
        monkeypatch.setattr(ray_worker, name, fake)
    context = SimpleNamespace(get_world_rank=lambda: 0, get_world_size=lambda: 1)
    monkeypatch.setattr(ray.train, "get_context", lambda: context)
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    monkeypatch.setattr(ray.train, "get_dataset_shard",
                        lambda name: FakeShard(rows if name == "train" else 2))
    monkeypatch.setattr(ray.train, "report", lambda metrics, **kw: events.append(("report", metrics)))
    ray_worker.train_loop_per_worker({
        "train": train.model_dump(mode="json"), "model": ModelConfig(path="m").model_dump(mode="json"),
        "run_dir": "unused", "folder": "train", "train_rows": rows, "max_seq_len": max_seq_len})
    return events, engine


# 10 rows in micro-batches of 2: 5 per epoch; steps of 2 micro-batches: epoch 1 ends mid-step.
TRAIN = TrainConfig(num_workers=1, micro_batch_size=2, grad_accum=2, epochs=3, precision="fp32",
                    packing=False)
# Packed: rows of 3, 4, 5 tokens into sequences of up to 12, one sequence per micro-batch.
PACKED = TrainConfig(num_workers=1, micro_batch_size=1, grad_accum=2, epochs=3, precision="fp32",
                     checkpoint_every_steps=1)


def test_an_epoch_ending_mid_step_saves_at_the_next_step_with_its_position(monkeypatch):
    events, engine = run_loop(monkeypatch, TRAIN, rows=10)
    saves = [e for e in events if e[0] == "save"]
    assert all(at_boundary for *_, at_boundary in saves[:-1])  # the last: the end of training
    first_epoch = next(e for e in events if e[0] == "report" and "val_loss" in e[1])
    assert first_epoch[1]["epoch"] == 1 and first_epoch[1]["val_loss"] == 3.0  # over all ranks
    assert first_epoch[1]["global_step"] == 2  # micro-batches 1-4; the 5th is mid-step
    assert [{k: e[1][k] for k in ("epoch", "batches_done", "global_step")} for e in saves] == [
        {"epoch": 1, "batches_done": 1, "global_step": 3},  # micro-batch 6 ends step 3
        {"epoch": 2, "batches_done": 0, "global_step": 5},  # epoch 2 ends with step 5
        {"epoch": 3, "batches_done": 0, "global_step": 7}]
    assert [e[1]["tokens"] for e in saves][1:] == [78, 117]  # rows of 3, 4, 5 tokens; 39 an epoch
    assert saves[0][2]["loss"] == 5.5  # step 3: micro-batches 5 (epoch 1) and 6 (epoch 2)
    assert saves[-1][2]["val_loss"] == 3.0
    assert events[-1] == ("export", total_steps(TRAIN, 10))


@pytest.mark.parametrize("resume_at", [0, 1])
def test_a_resume_from_any_checkpoint_takes_the_same_steps(monkeypatch, resume_at):
    saves = [e for e in run_loop(monkeypatch, TRAIN, rows=10)[0] if e[0] == "save"]
    events, engine = run_loop(monkeypatch, TRAIN, rows=10, progress=saves[resume_at][1])
    assert events[-1] == ("export", total_steps(TRAIN, 10))
    again = [e for e in events if e[0] == "save"]
    assert [e[1] for e in again] == [e[1] for e in saves[resume_at + 1:]]
    assert all(at_boundary for *_, at_boundary in again[:-1])


def test_a_learning_curve_exports_the_model_after_each_listed_step_once(monkeypatch):
    train = TRAIN.model_copy(update={"max_steps": 6, "export_at_steps": [1, 3, 6]})
    events, _ = run_loop(monkeypatch, train, rows=10)
    exports = [e for e in events if e[0] == "export"]
    # step 6 is the end: its model is the stage's own export, not a second copy
    assert exports == [("export", 1, "train/steps/1"), ("export", 3, "train/steps/3"), ("export", 6)]
    saves = [e for e in events if e[0] == "save"]
    resumed, _ = run_loop(monkeypatch, train, rows=10, progress=saves[0][1])  # after step 3
    assert [e for e in resumed if e[0] == "export"] == [("export", 6)]  # points kept, not redone


@pytest.mark.parametrize(("rows", "micro", "accum", "epochs", "max_steps"), [
    (10, 2, 2, 3, None), (7, 2, 3, 2, None), (9, 1, 4, 3, None), (8, 2, 5, 4, None),
    (10, 2, 2, 3, 4), (5, 1, 3, 5, 2),
])
def test_the_run_takes_total_steps(monkeypatch, rows, micro, accum, epochs, max_steps):
    """The progress bar's total (``stages.train.total_steps``) is what training takes."""
    train = TrainConfig(num_workers=1, micro_batch_size=micro, grad_accum=accum, epochs=epochs,
                        max_steps=max_steps, checkpoint_every_steps=1, precision="fp32",
                        packing=False)
    events, engine = run_loop(monkeypatch, train, rows)
    assert engine.global_steps == total_steps(train, rows)
    saves = [e for e in events if e[0] == "save"]
    assert all(at_boundary for *_, at_boundary in saves[:-1])


@pytest.mark.parametrize("resume_at", [0, 2, 3])
def test_packed_training_resumes_at_the_same_micro_batch_and_counts_real_tokens(monkeypatch,
                                                                              resume_at):
    """Packed epochs are not ``rows / micro_batch_size`` long: checkpoints record the
    micro-batches done, and a resume from any of them takes the same steps after it."""
    events, engine = run_loop(monkeypatch, PACKED, rows=10)
    saves = [e for e in events if e[0] == "save"]
    assert all(at_boundary for *_, at_boundary in saves[:-1])
    assert [e[1]["tokens"] for e in saves if e[1]["batches_done"] == 0] == [39, 78, 117]
    assert [e[1]["micro_done"] for e in saves if e[1]["batches_done"] == 0] == [4, 8, 12]
    assert events[-1] == ("export", 6)  # 39 tokens an epoch: 4 sequences of up to 12
    again = [e for e in run_loop(monkeypatch, PACKED, rows=10, progress=saves[resume_at][1])[0]
             if e[0] == "save"]
    assert [e[1] for e in again] == [e[1] for e in saves[resume_at + 1:]]
