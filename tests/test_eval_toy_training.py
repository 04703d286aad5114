"""Toy models trained for the eval stage (tiny CLIP, text-only LM), the memory-attention generator, referential scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoTokenizer, CLIPModel, CLIPProcessor, CLIPTextModel

from eval.baselines import TextOnlyBaseline
from eval.image_metrics import ClipSimilarity
from eval.referential_metrics import (
    described_labels,
    is_pronoun_caption,
    named_characters,
    referential_scores,
)
from eval.scoring import Measures, score_images
from pipeline.config import RESOLVED_CONFIG_NAME, ToyDataConfig
from pipeline.data.shapestories import CONNECTIVES, generate_shapestories
from pipeline.data.vist import load_vist_split
from pipeline.errors import ConfigError, DataError
from storypipe import wiring
from storypipe.cli import app
from storypipe.config import resolve_config
from toy.clip import METRICS_FILE as CLIP_METRICS
from toy.clip import collect_pairs, contrastive_loss, retrieval_accuracy, train_clip
from toy.config import ClipTrainConfig, TextBaselineTrainConfig
from toy.text_lm import METRICS_FILE as LM_METRICS
from toy.text_lm import train_text_baseline

runner = CliRunner()
CONNECTIVE_WORDS = tuple(c.rstrip(",").lower() for c in CONNECTIVES)  # "then", "next", "after that", "later"


@pytest.fixture(scope="module")
def shapestories(tmp_path_factory) -> Path:
    """60 ShapeStories stories at 32 px: 48 train, 6 val, 6 test."""
    out = tmp_path_factory.mktemp("shapestories")
    generate_shapestories(out, ToyDataConfig(stories=60, seed=3, image_size=32))
    return out


def _train(command: str, data: Path, out: Path, *sets: str):
    result = runner.invoke(app, [command, "--data", str(data), "--out", str(out), "--preset", "tiny",
                                 *(a for s in sets for a in ("--set", s))])  # fmt: skip
    assert result.exit_code == 0, result.output
    return result


# --------------------------------------------------------------------------------------------
# Tiny CLIP
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_clip(shapestories, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("clip") / "clip"
    result = _train("train-clip", shapestories, out, "clip_training.max_steps=60",
                    "clip_training.batch_size=32", "clip_training.warmup_steps=5")  # fmt: skip
    return out, result.output


def test_clip_training_lowers_the_loss_and_beats_chance_retrieval(trained_clip, shapestories):
    out, output = trained_clip
    assert f"CLIP written to {out}" in output and f"--set eval.clip_model={out}" in output
    metrics = json.loads((out / CLIP_METRICS).read_text())
    assert metrics["train_frames"] == 240 and metrics["validation"] == "the val split"
    assert metrics["final_loss"] < 0.75 * metrics["first_loss"]
    # Retrieval on the training pairs, from the saved folder, in pools of 32 (chance about 1/32).
    model = CLIPModel.from_pretrained(out)
    processor = CLIPProcessor.from_pretrained(out)
    scores = retrieval_accuracy(model, collect_pairs(shapestories, "train", processor), pool=32)
    assert scores["queries"] == 240
    assert scores["text_to_image_top1"] > 3 * scores["chance"]
    assert metrics["val_text_to_image_top1"] > metrics["untrained_val_text_to_image_top1"]
    saved = (out / RESOLVED_CONFIG_NAME).read_text()
    assert "clip_training:" in saved and "max_steps: 60" in saved  # the whole resolved config


def test_the_clip_text_tower_loads_alone_as_a_text_encoder(trained_clip):
    out, _ = trained_clip
    text_encoder = CLIPTextModel.from_pretrained(out)  # the vision tower and projections are skipped
    tokenizer = AutoTokenizer.from_pretrained(out)
    full = CLIPModel.from_pretrained(out)
    tokens = tokenizer(["A red circle jumps over a rock on a snowy field."], return_tensors="pt")
    with torch.no_grad():
        alone = text_encoder(**tokens).last_hidden_state  # (1, T, 32)
        inside = full.text_model(**tokens).last_hidden_state  # (1, T, 32)
    assert torch.equal(alone, inside)
    assert tokenizer.model_max_length == 77


def test_contrastive_loss_is_symmetric_infonce_with_shared_descriptions_as_positives():
    text = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)  # (4, 8)
    image = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)  # (4, 8)
    scale = torch.tensor(2.0)
    logits = scale.exp() * text @ image.T  # (4, 4)
    targets = torch.arange(4)
    expected = (torch.nn.functional.cross_entropy(logits, targets) + torch.nn.functional.cross_entropy(logits.T, targets)) / 2  # fmt: skip
    assert torch.allclose(contrastive_loss(text, image, scale, torch.arange(4)), expected)
    # Frames 0 and 1 share a description: each row's target is split between them.
    shared = torch.tensor([[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    expected = (torch.nn.functional.cross_entropy(logits, shared) + torch.nn.functional.cross_entropy(logits.T, shared)) / 2  # fmt: skip
    assert torch.allclose(contrastive_loss(text, image, scale, torch.tensor([7, 7, 1, 2])), expected)


def test_training_refuses_a_foreign_folder_and_bad_settings(shapestories, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    result = runner.invoke(
        app, ["train-clip", "--data", str(shapestories), "--out", str(foreign), "--preset", "tiny"]
    )
    assert result.exit_code == 2 and "holds no earlier train-clip run" in result.output
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(ConfigError, match="ClipTrainConfig.warmup_steps must be non-negative"):
        ClipTrainConfig(warmup_steps=-1)
    with pytest.raises(ConfigError, match="ClipTrainConfig.batch_size"):
        ClipTrainConfig(batch_size=1)
    with pytest.raises(ConfigError, match="TextBaselineTrainConfig.learning_rate"):
        TextBaselineTrainConfig(learning_rate=0)


def test_without_a_val_split_training_holds_frames_out(tmp_path):
    data = tmp_path / "data"
    generate_shapestories(data, ToyDataConfig(stories=4, image_size=32, val_fraction=0.0, test_fraction=0.0))
    metrics = train_clip(
        data, tmp_path / "clip", ClipTrainConfig(max_steps=2, batch_size=8, val_fraction=0.1)
    )
    assert metrics["validation"] == "2 held-out frames of train" and metrics["train_frames"] == 18
    metrics = train_text_baseline(data, tmp_path / "lm", TextBaselineTrainConfig(max_steps=2, batch_size=2))
    assert metrics["val_loss"] is None and metrics["train_stories"] == 4
    empty = tmp_path / "empty"
    generate_shapestories(empty, ToyDataConfig(stories=1, image_size=32))
    (empty / "images" / "train").joinpath(next((empty / "images" / "train").iterdir()).name).unlink()
    with pytest.raises(DataError, match="needs at least 2, and 4 when there is no val split"):
        train_clip(empty, tmp_path / "clip2", ClipTrainConfig(max_steps=2))


# --------------------------------------------------------------------------------------------
# Text-only LM baseline
# --------------------------------------------------------------------------------------------


def test_text_baseline_learns_to_continue_a_story(shapestories, tmp_path):
    out = tmp_path / "lm"
    result = _train("train-text-baseline", shapestories, out, "text_baseline_training.max_steps=60",
                    "text_baseline_training.batch_size=16", "text_baseline_training.warmup_steps=5")  # fmt: skip
    assert f"Language model written to {out}" in result.output
    metrics = json.loads((out / LM_METRICS).read_text())
    assert metrics["train_stories"] == 48
    assert (
        metrics["final_loss"] < metrics["first_loss"] / 3 and metrics["val_loss"] < metrics["first_loss"] / 3
    )
    # Greedy continuation, prompted exactly as the eval's text-only row prompts it.
    baseline = TextOnlyBaseline.load(str(out), max_new_tokens=12)
    for story in load_vist_split(shapestories, "val").stories[:3]:
        continuation = baseline([frame.story_caption for frame in story.frames[:2]]).lower()
        assert continuation.startswith(CONNECTIVE_WORDS), continuation


# --------------------------------------------------------------------------------------------
# Referential (pronoun) accuracy
# --------------------------------------------------------------------------------------------


def test_named_characters_and_pronoun_captions():
    assert named_characters("A red circle and a blue square dance in a forest.") == {"Rosa", "Bruno"}
    assert named_characters("An orange hexagon sleeps on a sandy beach.") == {"Otto"}
    assert named_characters("A red square waves hello.") == set()  # colour and shape must go together
    assert is_pronoun_caption("Then she fell asleep.")
    assert is_pronoun_caption("After that, they went to the sandy beach and waved hello.")
    assert is_pronoun_caption("Later, he ran very fast.")
    assert not is_pronoun_caption("Then Rosa fell asleep.")
    assert not is_pronoun_caption("Then she and Bruno danced.")  # a name: not pronoun-only
    assert not is_pronoun_caption("Rosa waved hello in the green meadow.")
    assert not is_pronoun_caption("Then the rock fell.")


def test_referential_scores_count_exact_character_sets():
    rosa, both = {"characters": ["Rosa"]}, {"characters": ["Rosa", "Bruno"]}
    descriptions = [
        "A red circle falls asleep in a forest.",  # pronoun frame, right
        "A blue square spins around.",  # pronoun frame, wrong character
        "A red circle and a blue square dance.",  # pronoun frame ("they"), right
        "A red circle runs fast.",  # named frame, misses Bruno
        "A red circle waves hello.",  # not a ShapeStories label: skipped
    ]
    captions = [
        "Then she fell asleep.",
        "Next, she spun around.",
        "Later, they danced to the music.",
        "Then Rosa and Bruno ran very fast.",
        "Fred waved.",
    ]
    labels = [rosa, rosa, both, both, {"characters": ["fred"]}]
    scores = referential_scores(descriptions, captions, labels)
    assert scores == {"pronoun_resolution": pytest.approx(2 / 3), "pronoun_frames": 3,
                      "character_named": pytest.approx(2 / 4), "character_frames": 4}  # fmt: skip
    empty = referential_scores(["x"], ["Fred waved."], [None])
    assert empty["pronoun_resolution"] is None and empty["character_frames"] == 0
    with pytest.raises(ValueError, match="one of each per frame"):
        referential_scores(["a"], [], [])


# --------------------------------------------------------------------------------------------
# Memory-attention generator (its rows: tests/test_eval_rows.py)
# --------------------------------------------------------------------------------------------


def test_the_memory_generator_loads_with_memory_attention(tiny_sd):
    cfg = resolve_config(preset="tiny", overrides=[f"eval.memory_generator_model={tiny_sd}"])
    generator = wiring.load_memory_frame_generator(cfg, device="cpu")
    assert generator.model.context_kind == "memory" and generator.cfg.base_model == str(tiny_sd)
    assert generator.cfg.resolution == cfg.generator.resolution  # the generator section's other settings
    assert wiring.load_memory_frame_generator(resolve_config(preset="tiny")) is None


def test_described_labels_read_characters_and_place_from_a_description():
    assert described_labels("A red circle and a blue square dance to music on a snowy field.") == {
        "characters": ["Bruno", "Rosa"],
        "background": "snowy_field",
    }
    assert described_labels("An orange hexagon sleeps in a green meadow.") == {
        "characters": ["Otto"],
        "background": "meadow",
    }
    assert described_labels("A red circle waves hello.")["background"] is None  # no place named
    assert described_labels("she danced")["characters"] == []


class _FixedClassifier:
    """Predicts the same labels for every frame."""

    characters = ["Rosa", "Bruno"]

    def __init__(self, labels: dict) -> None:
        self.labels = labels

    def predict(self, images):
        return [dict(self.labels) for _ in images]


def test_autoregressive_frames_are_also_scored_against_the_story_the_pipeline_told(
    trained_clip, shapestories, tmp_path
):
    stories = load_vist_split(shapestories, "test").stories[:2]
    told = ["A red circle waves hello in a green meadow."] * 4
    records = [
        {
            "story_id": story.story_id,
            "images": {"ours_ar": [str(Path(frame.image_path).resolve()) for frame in story.frames[1:]]},
            "ar_descriptions": told if i == 0 else told[:3] + ["A blue square sleeps on a snowy field."],
        }
        for i, story in enumerate(stories)
    ]
    measures = Measures(
        sentence=None,
        clip=ClipSimilarity.load(trained_clip[0]),
        classifier=_FixedClassifier({"characters": ["Rosa"], "background": "meadow"}),
    )
    row = score_images(records, stories, measures, tmp_path)["ours_ar"]
    # Against its own story: every frame shows what the description named, but for the last frame.
    assert row["told_character_accuracy"] == pytest.approx(7 / 8)
    assert row["told_background_accuracy"] == pytest.approx(7 / 8)
    # Against the true story: the frames whose true labels are exactly Rosa in the meadow.
    truth = [frame.labels for story in stories for frame in story.frames[1:]]
    assert row["character_accuracy"] == pytest.approx(sum(t["characters"] == ["Rosa"] for t in truth) / 8)
    assert row["background_accuracy"] == pytest.approx(sum(t["background"] == "meadow" for t in truth) / 8)
