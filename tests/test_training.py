"""The training scaffold: a resumed run is the uninterrupted one, and checkpoints are complete or absent."""

from __future__ import annotations

from pathlib import Path

import accelerate.accelerator
import pytest
import torch

from pipeline.errors import StorypipeError
from pipeline.training import CHECKPOINTS_DIR, LOG_FILE, TrainingRun, complete_checkpoints, read_log
from tests.crash import crash_after_step

STEPS = 6


def train_toy(out: Path, resume: bool = False, keep_checkpoints: int = 2) -> dict[str, torch.Tensor]:
    """A loop as the trainers write it; its inputs and dropout draw from torch's global RNG."""
    with TrainingRun(
        out, "toy-loop", checkpoint_every=2, keep_checkpoints=keep_checkpoints, resume=resume, seed=0
    ) as training:
        model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))
        model, optimizer = training.prepare(model, optimizer)
        training.accelerator.register_for_checkpointing(scheduler)
        for step in range(training.start(STEPS), STEPS):
            inputs = torch.randn(4, 3)  # (B, 3)
            loss = model(inputs).pow(2).mean()
            training.accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            training.log({"step": step + 1, "loss": loss.item(), "lr": scheduler.get_last_lr()[0]})
            training.maybe_checkpoint(step + 1)
        training.finish()
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def test_a_resumed_run_repeats_the_uninterrupted_one_exactly(tmp_path, monkeypatch):
    expected_weights = train_toy(tmp_path / "straight")
    expected = read_log(tmp_path / "straight" / LOG_FILE)

    crash_after_step(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        train_toy(tmp_path / "resumed", keep_checkpoints=1)
    monkeypatch.undo()
    checkpoints = tmp_path / "resumed" / CHECKPOINTS_DIR
    assert [path.name for path in checkpoints.iterdir()] == ["step_00000004"]  # pruned to the newest
    with pytest.raises(StorypipeError, match="already holds a run; pass --resume"):
        train_toy(tmp_path / "resumed")
    weights = train_toy(tmp_path / "resumed", resume=True)

    assert read_log(tmp_path / "resumed" / LOG_FILE) == expected  # losses and lr, bit for bit
    assert all(torch.equal(weights[name], expected_weights[name]) for name in expected_weights)
    assert not checkpoints.exists()  # the finished run keeps none


def test_an_interrupted_checkpoint_write_is_never_resumed_from(tmp_path, monkeypatch):
    expected = train_toy(tmp_path / "straight")
    writes = []
    real_save = accelerate.accelerator.save_custom_state

    def save_then_fail_the_second_checkpoint(obj, path, *args, **kwargs):
        writes.append(path)
        if len(writes) == 2:
            raise OSError("disk full")  # the model and optimizer files of step 4 are already written
        real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(accelerate.accelerator, "save_custom_state", save_then_fail_the_second_checkpoint)
    with pytest.raises(OSError, match="disk full"):
        train_toy(tmp_path / "run")
    monkeypatch.undo()
    checkpoints = tmp_path / "run" / CHECKPOINTS_DIR
    assert (checkpoints / ".staging-step_00000004" / "model_0.pt").is_file()  # half written
    assert complete_checkpoints(checkpoints) == [checkpoints / "step_00000002"]

    weights = train_toy(tmp_path / "run", resume=True)  # from step 2, not from the half-written step 4
    assert [record["step"] for record in read_log(tmp_path / "run" / LOG_FILE)] == list(range(1, STEPS + 1))
    assert all(torch.equal(weights[name], expected[name]) for name in expected)


def test_a_run_whose_only_checkpoint_was_interrupted_starts_afresh(tmp_path):
    staging = tmp_path / CHECKPOINTS_DIR / ".staging-step_00000002"
    staging.mkdir(parents=True)
    (staging / "model_0.pt").write_bytes(b"half")
    with pytest.raises(StorypipeError, match="no checkpoint"):
        train_toy(tmp_path, resume=True)
    train_toy(tmp_path)
    assert [record["step"] for record in read_log(tmp_path / LOG_FILE)] == list(range(1, STEPS + 1))
    assert not (tmp_path / CHECKPOINTS_DIR).exists()


def test_resume_refuses_a_checkpoint_another_command_wrote(tmp_path):
    checkpoint = tmp_path / CHECKPOINTS_DIR / "step_00000002"
    checkpoint.mkdir(parents=True)
    (checkpoint / "state.json").write_text('{"step": 2, "run": "train-clip"}')
    with pytest.raises(StorypipeError, match="written by 'train-clip', not by 'toy-loop'"):
        train_toy(tmp_path, resume=True)
