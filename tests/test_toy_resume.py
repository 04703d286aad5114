"""The toy trainers (classifier, tiny CLIP, text-only LM) resume after a crash exactly where they left off."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import ToyDataConfig
from pipeline.data.shapestories import generate_shapestories
from pipeline.errors import StorypipeError
from pipeline.training import CHECKPOINTS_DIR, LOG_FILE, read_log
from tests.crash import crash_after_step
from toy.classifier import train_classifier
from toy.clip import METRICS_FILE as CLIP_METRICS
from toy.clip import train_clip
from toy.config import ClassifierTrainConfig, ClipTrainConfig, TextBaselineTrainConfig
from toy.text_lm import METRICS_FILE as LM_METRICS
from toy.text_lm import train_text_baseline

# Five steps, checkpoints after steps 2 and 4; the crash comes after step 3.
TRAINERS = {
    "classifier": lambda data, out, resume: train_classifier(
        data, out, ClassifierTrainConfig(image_size=32, max_steps=5, batch_size=8, checkpoint_every=2),
        resume=resume,
    ),
    "clip": lambda data, out, resume: train_clip(
        data, out, ClipTrainConfig(max_steps=5, batch_size=8, warmup_steps=1, checkpoint_every=2), resume=resume
    ),
    "text-baseline": lambda data, out, resume: train_text_baseline(
        data, out, TextBaselineTrainConfig(max_steps=5, batch_size=4, warmup_steps=1, checkpoint_every=2),
        resume=resume,
    ),
}  # fmt: skip
FINISHED = {"classifier": "classifier.json", "clip": CLIP_METRICS, "text-baseline": LM_METRICS}


@pytest.fixture(scope="module")
def stories(tmp_path_factory) -> Path:
    """Eight ShapeStories at 32 px: 6 train, 1 val, 1 test."""
    out = tmp_path_factory.mktemp("stories")
    generate_shapestories(out, ToyDataConfig(stories=8, seed=4, image_size=32))
    return out


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return {f"{path.name}:{name}": tensor for path in folder.glob("*.safetensors")
            for name, tensor in load_file(str(path)).items()}  # fmt: skip


@pytest.mark.parametrize("trainer", sorted(TRAINERS))
def test_a_crashed_toy_run_resumes_to_the_uninterrupted_result(trainer, stories, tmp_path, monkeypatch):
    train = TRAINERS[trainer]
    expected_metrics = train(stories, tmp_path / "straight", False)
    expected_log = read_log(tmp_path / "straight" / LOG_FILE)

    crash_after_step(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        train(stories, tmp_path / "resumed", False)
    monkeypatch.undo()
    out = tmp_path / "resumed"
    assert [path.name for path in out.iterdir()] == [CHECKPOINTS_DIR]  # nothing else until the end
    assert sorted(path.name for path in (out / CHECKPOINTS_DIR).iterdir()) == ["step_00000002"]
    with pytest.raises(StorypipeError, match="already holds a run; pass --resume"):
        train(stories, out, False)
    metrics = train(stories, out, True)

    assert not (out / CHECKPOINTS_DIR).exists() and (out / FINISHED[trainer]).is_file()
    log = read_log(out / LOG_FILE)
    assert [record["step"] for record in log] == [record["step"] for record in expected_log]
    for got, want in zip(log, expected_log, strict=True):
        assert got.get("loss") == want.get("loss") and got.get("lr") == want.get("lr")  # bit for bit
    expected_weights, resumed_weights = weights(tmp_path / "straight"), weights(out)
    assert expected_weights and expected_weights.keys() == resumed_weights.keys()
    assert all(torch.equal(resumed_weights[name], expected_weights[name]) for name in expected_weights)
    assert metrics.keys() == expected_metrics.keys()
    for key in ("first_loss", "final_loss", "character_accuracy", "val_text_to_image_top1", "val_loss"):
        assert metrics.get(key) == expected_metrics.get(key), key


@pytest.mark.parametrize("trainer", ["clip", "text-baseline"])
def test_a_foreign_folder_is_refused_and_kept(trainer, stories, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(StorypipeError, match="holds no earlier train-"):
        TRAINERS[trainer](stories, tmp_path, False)
    assert [path.name for path in tmp_path.iterdir()] == ["notes.txt"]
