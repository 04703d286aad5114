"""Make-A-Story's character/background metrics and the frame classifier that feeds them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sklearn.metrics import f1_score

from eval.classification_metrics import background_scores, character_scores
from eval.classifier import CONFIG_FILE, WEIGHTS_FILE, FrameClassifier, images_to_uint8, normalize
from pipeline.config import ToyDataConfig
from pipeline.data.shapestories import generate_shapestories
from pipeline.data.vist import sis_path
from pipeline.errors import ConfigError, DataError, StorypipeError
from pipeline.io import load_rgb
from pipeline.training import LOG_FILE, read_log
from toy.classifier import evaluate_classifier, load_labelled_frames, train_classifier
from toy.config import ClassifierTrainConfig

# --------------------------------------------------------------------------------------------
# Metrics on hand-made examples
# --------------------------------------------------------------------------------------------


def test_character_accuracy_is_exact_match_of_sets_and_f1_gives_partial_credit():
    true = [["Rosa", "Bruno"], ["Bruno"], ["Gala", "Rosa"]]
    predicted = [["Rosa"], ["Bruno"], ["Rosa", "Gala"]]  # partial, exact, exact in another order
    scores = character_scores(true, predicted, labels=["Bruno", "Gala", "Rosa"])
    assert scores["accuracy"] == pytest.approx(2 / 3)
    assert scores["frames"] == 3
    # By hand: Bruno P=1 R=1/2 F1=2/3 (support 2), Gala F1=1 (1), Rosa F1=1 (2): (4/3 + 1 + 2) / 5.
    assert scores["f1"] == pytest.approx((4 / 3 + 1 + 2) / 5)


def test_character_f1_matches_sklearn_weighted_f1_on_the_indicator_matrix():
    labels = ["Rosa", "Bruno", "Gala", "Yuri"]
    true = [["Rosa"], ["Rosa", "Bruno"], ["Gala"], [], ["Yuri", "Gala"], ["Bruno"]]
    predicted = [["Rosa", "Gala"], ["Bruno"], ["Gala"], ["Yuri"], ["Yuri", "Gala"], []]
    matrix = [[[int(name in names) for name in labels] for names in rows] for rows in (true, predicted)]
    expected = f1_score(matrix[0], matrix[1], average="weighted", zero_division=0)
    scores = character_scores(true, predicted, labels)
    assert scores["f1"] == pytest.approx(expected)
    assert scores["accuracy"] == pytest.approx(2 / 6)


def test_character_names_outside_the_vocabulary_still_count():
    # A predicted name the vocabulary lacks makes the frame wrong; a true one lowers F1 by its support.
    assert character_scores([["Rosa"]], [["Rosa", "Zed"]], labels=["Rosa"])["accuracy"] == 0.0
    scores = character_scores([["Rosa"], ["Zed"]], [["Rosa"], []], labels=["Rosa"])
    assert scores["accuracy"] == 0.5
    assert scores["f1"] == pytest.approx(0.5)  # Rosa F1 1 (support 1), Zed F1 0 (support 1)


def test_background_scores_skip_frames_without_a_true_background():
    true = ["meadow", None, "beach", "beach"]
    predicted = ["meadow", "beach", "meadow", "beach"]
    scores = background_scores(true, predicted)
    assert scores is not None
    assert scores["frames"] == 3
    assert scores["accuracy"] == pytest.approx(2 / 3)
    expected = f1_score(["meadow", "beach", "beach"], ["meadow", "meadow", "beach"], average="weighted")
    assert scores["f1"] == pytest.approx(expected)
    assert scores["f1"] == pytest.approx(2 / 3)  # by hand: both labels have F1 2/3
    assert background_scores([None, None], ["meadow", None]) is None
    assert background_scores(["meadow", "beach"], [None, "beach"])["accuracy"] == 0.5  # None is wrong


def test_metrics_refuse_mismatched_or_empty_inputs():
    with pytest.raises(ValueError, match="2 true labels but 1 predictions"):
        character_scores([["Rosa"], []], [["Rosa"]], labels=["Rosa"])
    with pytest.raises(ValueError, match="no frames"):
        background_scores([], [])


# --------------------------------------------------------------------------------------------
# The classifier
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    """Tiny convolutions gain nothing from more threads, and on a busy machine OpenMP threads spinning
    against other processes made training several times slower; restored after this module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory) -> Path:
    """200 ShapeStories at 32 px: 800 train frames, 100 val, 100 test."""
    out = tmp_path_factory.mktemp("shapes")
    generate_shapestories(out, ToyDataConfig(stories=200, seed=7, image_size=32))
    return out


@pytest.fixture(scope="module")
def trained(shapes_data, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("runs") / "classifier"
    scores = train_classifier(shapes_data, out, ClassifierTrainConfig(image_size=32, epochs=12, seed=0))
    assert read_log(out / LOG_FILE)[-1]["step"] == 300  # 800 frames / 32 per batch x 12 epochs
    return out, scores


def test_the_classifier_reaches_high_accuracy_on_easy_labelled_frames(trained, shapes_data):
    out, val_scores = trained
    assert val_scores["validation"] == "the val split"
    assert val_scores["train_frames"] == 800
    model = FrameClassifier.from_pretrained(out)
    test_scores = evaluate_classifier(model, load_labelled_frames(shapes_data, "test"))
    assert test_scores["frames"] == 100
    assert test_scores["character_accuracy"] >= 0.9, test_scores
    assert test_scores["character_f1"] >= 0.9, test_scores
    assert test_scores["background_accuracy"] >= 0.9, test_scores
    assert test_scores["background_f1"] >= 0.9, test_scores

    log = read_log(out / LOG_FILE)
    assert [record["step"] for record in log[:-1]] == list(range(1, 301))
    assert log[-1]["character_accuracy"] == val_scores["character_accuracy"]
    assert sum(r["loss"] for r in log[-11:-1]) < sum(r["loss"] for r in log[:10]) / 5  # it learned


def test_save_then_load_gives_identical_predictions(trained, shapes_data, tmp_path):
    out, _ = trained
    model = FrameClassifier.from_pretrained(out)
    model.save_pretrained(tmp_path / "copy")
    copy = FrameClassifier.from_pretrained(tmp_path / "copy")
    settings = json.loads((tmp_path / "copy" / CONFIG_FILE).read_text())
    assert settings["image_size"] == 32 and settings["channels"] == [16, 32, 64]
    assert settings["characters"] == ["Bruno", "Gala", "Otto", "Pia", "Rosa", "Yuri"]
    assert len(settings["backgrounds"]) == 6

    images = [load_rgb(frame.image_file) for frame in load_labelled_frames(shapes_data, "test")[:20]]
    assert copy.predict(images) == model.predict(images)
    pixels = normalize(images_to_uint8(images, 32))  # (20, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(model(pixels), copy(pixels), strict=True):
            assert torch.equal(a, b)
    # Any image size goes in: a 64 px frame is resized to the model's 32 px.
    big = images[0].resize((64, 64))
    assert model.predict([big])[0]["background"] == model.predict(images[:1])[0]["background"]


def test_a_folder_without_labels_is_a_data_error(tmp_path):
    generate_shapestories(tmp_path, ToyDataConfig(stories=5, seed=0, image_size=32))
    sis_file = sis_path(tmp_path, "train")
    document = json.loads(sis_file.read_text())
    for entry in document["images"]:
        del entry["labels"]
    sis_file.write_text(json.dumps(document))
    with pytest.raises(DataError, match="has labels") as error:
        train_classifier(tmp_path, tmp_path / "out", ClassifierTrainConfig(max_steps=1))
    assert str(tmp_path) in str(error.value)
    assert not (tmp_path / "out").exists()


def test_frames_without_backgrounds_train_a_character_only_classifier(tmp_path):
    """PororoSV-style labels (``"background": null``): no background head, no background scores."""
    generate_shapestories(tmp_path, ToyDataConfig(stories=5, seed=0, image_size=32))
    for split in ("train", "val", "test"):
        sis_file = sis_path(tmp_path, split)
        document = json.loads(sis_file.read_text())
        for entry in document["images"]:
            entry["labels"]["background"] = None
        sis_file.write_text(json.dumps(document))
    scores = train_classifier(tmp_path, tmp_path / "out", ClassifierTrainConfig(max_steps=2))
    assert scores["background_accuracy"] is None and scores["background_f1"] is None
    assert scores["validation"] == "2 held-out frames of train"  # the val split is empty at 5 stories
    model = FrameClassifier.from_pretrained(tmp_path / "out")
    assert model.background_head is None and model.backgrounds == []
    prediction = model.predict([load_rgb(load_labelled_frames(tmp_path, "train")[0].image_file)])[0]
    assert prediction["background"] is None and isinstance(prediction["characters"], list)


def test_a_second_run_into_the_same_folder_is_refused(shapes_data, trained):
    out, _ = trained
    with pytest.raises(StorypipeError, match="already holds a classifier run"):
        train_classifier(shapes_data, out, ClassifierTrainConfig(max_steps=1))


def test_from_pretrained_names_a_folder_that_is_not_a_classifier(tmp_path):
    with pytest.raises(StorypipeError, match="is not a frame classifier"):
        FrameClassifier.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "override",
    [
        {"image_size": 4},
        {"epochs": 0},
        {"max_steps": 0},
        {"batch_size": 0},
        {"learning_rate": 0.0},
        {"val_fraction": 1.0},
        {"channels": ()},
        {"channels": (8, 8, 8, 8, 8), "image_size": 16},
    ],
)
def test_train_config_is_validated(override):
    with pytest.raises(ConfigError, match=f"ClassifierTrainConfig.{next(iter(override))} "):
        ClassifierTrainConfig(**override)


def test_training_is_reproducible_from_the_seed_and_overwrite_starts_a_fresh_log(tmp_path):
    data = tmp_path / "data"
    generate_shapestories(data, ToyDataConfig(stories=5, seed=3, image_size=32))
    cfg = ClassifierTrainConfig(image_size=32, max_steps=4, batch_size=8, seed=5)
    train_classifier(data, tmp_path / "a", cfg)
    train_classifier(data, tmp_path / "b", cfg)
    weights = [load_file(str(tmp_path / run / WEIGHTS_FILE)) for run in ("a", "b")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])

    other = ClassifierTrainConfig(image_size=32, max_steps=3, batch_size=8, seed=6)
    train_classifier(data, tmp_path / "a", other, overwrite=True)
    reseeded = load_file(str(tmp_path / "a" / WEIGHTS_FILE))
    assert not all(torch.equal(reseeded[name], weights[1][name]) for name in reseeded)
    assert [record["step"] for record in read_log(tmp_path / "a" / LOG_FILE)] == [1, 2, 3, 3]
