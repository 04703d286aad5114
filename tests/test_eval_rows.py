"""The rows of the evaluation tables (eval/rows.py): each registered row is generated, scored and reported
as its record says, ``eval.rows`` leaves rows out, and the report follows the registry's order.

The systems under test are fakes that answer from the ground truth, so a row scored against the wrong
reference shows; the measuring models are a tiny random CLIP and an exact-match sentence similarity. The
fakes' identities (what storypipe.wiring.eval_identities gives a real system) are their settings.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import typing
from dataclasses import dataclass

import pytest
from PIL import Image

from eval.config import EvalConfig
from eval.image_metrics import ClipSimilarity
from eval.report import intrinsic_labels, results_markdown
from eval.rows import IMAGE_ROWS, ROW_KEYS, TEXT_ROWS, Model
from eval.runner import EvalModels, StoryFrames, evaluate, generate_story_outputs, select_stories
from eval.scoring import Measures
from pipeline.errors import ConfigError, DataError, StorypipeError
from pipeline.prompts import PromptTemplates
from pipeline.seeds import derive_seed
from storypipe.config import resolve_config
from storypipe.wiring import eval_identities
from toy.builders import build_tiny_clip

STORIES = 2
FRAMES = STORIES * 4  # frames 1..4 of each story are predicted or drawn


# --------------------------------------------------------------------------------------------
# Fake systems under test: each answers from the ground truth of the story it is shown
# --------------------------------------------------------------------------------------------


@dataclass
class _Drawn:
    image: Image.Image
    prompt_truncated: bool = False


class _RecordingIllustrator:
    """Draws a frame of its colour (one pixel set by the seed, so frames differ) and records each call as
    (prompt, number of references, reference prompts, seed)."""

    def __init__(self, colour: tuple[int, int, int], max_references: int = 3) -> None:
        self.colour, self.max_references, self.calls = colour, max_references, []

    def generate(self, description, context_images=(), context_descriptions=(), seed=0, **_):
        self.calls.append((description, len(context_images), list(context_descriptions), seed))
        image = Image.new("RGB", (8, 8), self.colour)
        image.putpixel((1 + seed % 7, 1 + seed // 7 % 7), (seed % 256, seed // 256 % 256, 0))  # frames differ
        return _Drawn(image)


class _TruthfulCaptioners:
    """Predicts exactly the next GT story caption, or the next GT description; records each call's seed."""

    def __init__(self, texts) -> None:
        self.next = {tuple(t.captions[:-1]): t.captions[1:] for t in texts}
        self.described = {tuple(t.captions[:-1]): t.descriptions[1:] for t in texts}
        self.calls = []

    def next_story_captions(self, images, captions, seeds=None):
        self.calls.append(seeds)
        return list(self.next[tuple(captions)])

    def describe_batch(self, images, current, upcoming, seeds=None):
        self.calls.append(seeds)
        return list(self.described[tuple(current)])


class _RecordingBaseline:
    """A baseline that gives ``answer(inputs)`` and records each call's inputs."""

    def __init__(self, answer) -> None:
        self.answer, self.calls = answer, []

    def __call__(self, inputs):
        self.calls.append(inputs)
        return self.answer(inputs)


@dataclass
class _Texts:
    captions: list[str]
    descriptions: list[str]


def _texts(story) -> _Texts:
    return _Texts([f.story_caption for f in story.frames], [f.description for f in story.frames])


class _RecordingTeller:
    """Tells the GT story (with plain frames) that starts with the seed caption; records the seed captions."""

    def __init__(self, texts) -> None:
        self.by_seed_caption, self.calls = {t.captions[0]: t for t in texts}, []

    def __call__(self, folder, seed_image, caption, frames, seed):
        self.calls.append(caption)
        truth = self.by_seed_caption[caption]
        images = [Image.new("RGB", (8, 8), (40 * k, 255 - 40 * k, 128)) for k in range(frames)]
        return StoryFrames(truth.captions, truth.descriptions, images)


def fake_models(stories, steps: int = 20) -> EvalModels:
    """Every model of EvalModels, each a fake that records or answers from the ground truth. The
    illustrator's frames depend on its setting ``steps``, as a real one's on its denoising steps."""
    texts = [_texts(story) for story, _ in stories]
    return EvalModels(
        captioners=_TruthfulCaptioners(texts),
        illustrator=_RecordingIllustrator((0, 0, steps)),
        memory_illustrator=_RecordingIllustrator((255, 0, 0), max_references=2),
        tell_story=_RecordingTeller(texts),
        caption_baseline=_RecordingBaseline(lambda images: ["a picture"] * len(images)),
        text_baseline=_RecordingBaseline(lambda captions: "and then it ended."),
    )


def fake_identities(steps: int = 20) -> dict[str, object]:
    """What determines each fake's outputs: its settings (the illustrator's steps), else just its name."""
    return {name: name for name in typing.get_args(Model)} | {"illustrator": {"steps": steps}}


def calls(models: EvalModels) -> dict[str, int]:
    """How often each fake of ``models`` was called."""
    return {field.name: len(getattr(models, field.name).calls) for field in dataclasses.fields(EvalModels)}


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stories(toy_stories):
    chosen = select_stories(toy_stories, EvalConfig(split="train", max_stories=STORIES), story_length=5)
    # The description and the story caption of every scored frame differ, so a row scored against the
    # wrong reference cannot match it.
    assert all(f.description != f.story_caption for story, _ in chosen for f in story.frames[1:])
    return chosen


@pytest.fixture(scope="module")
def measures(tmp_path_factory):
    clip = ClipSimilarity.load(build_tiny_clip(tmp_path_factory.mktemp("models") / "clip"))

    def exact(predictions, references):  # sentence similarity 1 for an exact match, else 0
        return [float(p == r) for p, r in zip(predictions, references, strict=True)]

    return Measures(sentence=exact, clip=clip)


@pytest.fixture(scope="module")
def every_row(stories, measures, toy_stories, tmp_path_factory):
    """One evaluation with every model: (results, models, out)."""
    out = tmp_path_factory.mktemp("eval-rows") / "all"
    models = fake_models(stories)
    cfg = EvalConfig(split="train", max_stories=STORIES)
    return (
        evaluate(stories, toy_stories, out, cfg, models, measures, identities=fake_identities()),
        models,
        out,
    )


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------


def test_the_registry_is_consistent():
    fields = {field.name for field in dataclasses.fields(EvalModels)}
    assert set(typing.get_args(Model)) == fields  # every row's model is a field of EvalModels
    for rows in (TEXT_ROWS, IMAGE_ROWS):
        keys = [row.key for row in rows]
        assert len(set(keys)) == len(keys)
        assert len({row.label for row in rows}) == len(keys)
        assert all(row.autoregressive == (row.model == "tell_story") for row in rows)
    assert set(ROW_KEYS) == {row.key for row in (*TEXT_ROWS, *IMAGE_ROWS)}
    assert [row.key for row in IMAGE_ROWS if row.ground_truth] == ["gt"]


# --------------------------------------------------------------------------------------------
# Generated, scored, reported
# --------------------------------------------------------------------------------------------


def test_every_row_is_generated_and_scored_when_its_models_are_present(every_row, stories):
    results, models, out = every_row
    assert list(results["text"]) == [row.key for row in TEXT_ROWS]
    assert list(results["images"]) == [row.key for row in IMAGE_ROWS]
    assert list(results["intrinsic"]) == list(intrinsic_labels())
    assert all(results["text"][row.key]["samples"] == FRAMES for row in TEXT_ROWS)
    for row in IMAGE_ROWS:
        scores = results["images"][row.key]
        assert scores["frames"] == FRAMES, row.key
        assert (scores["gt_image"] is None) == row.ground_truth, row.key
        assert ("fid" in scores) == (not row.ground_truth), row.key
        if not row.ground_truth:
            assert len(list((out / "images" / row.key).iterdir())) == FRAMES, row.key
    # Each frame generator drew 4 frames per story for each of its rows, and the pipeline told each story once.
    drawn_by = {
        model: sum(row.model == model for row in IMAGE_ROWS)
        for model in ("illustrator", "memory_illustrator")
    }
    assert len(models.illustrator.calls) == drawn_by["illustrator"] * FRAMES
    assert len(models.memory_illustrator.calls) == drawn_by["memory_illustrator"] * FRAMES
    assert len(models.tell_story.calls) == STORIES


def test_the_description_row_is_scored_against_dii_and_the_others_against_sis(every_row):
    text = every_row[0]["text"]
    # The fakes predict exactly the GT text each row should predict: a perfect score against the right one.
    for key in ("ours_story_next", "ours_description", "ours_ar"):
        assert text[key]["sentence_similarity"] == 1.0, key
    assert [row.key for row in TEXT_ROWS if row.reference == "dii"] == ["ours_description"]
    assert text["ours_description"]["character_frames"] == FRAMES  # referential scores: DII rows only
    assert "character_frames" not in text["ours_story_next"]
    assert text["caption_baseline"]["sentence_similarity"] == 0.0


def test_the_report_follows_the_registry_order(every_row):
    results = every_row[0]
    shuffled = {**results, "text": dict(reversed(results["text"].items())),
                "images": dict(reversed(results["images"].items()))}  # fmt: skip
    markdown = results_markdown(shuffled)

    for heading, labels in (("## Text", [row.label for row in TEXT_ROWS]),
                            ("## Images", [row.label for row in IMAGE_ROWS]),
                            ("## Intrinsic", list(intrinsic_labels().values()))):  # fmt: skip
        table = markdown[markdown.index(heading) :]
        positions = [table.index(f"| {label} |") for label in labels]
        assert positions == sorted(positions), heading


def test_frame_generator_rows_share_frame_seeds_and_stories_do_not(every_row, stories):
    models = every_row[1]
    story_ids = [story.story_id for story, _ in stories]
    seeds = {call[3] for call in models.illustrator.calls + models.memory_illustrator.calls}
    assert seeds == {derive_seed(0, "frame", story_id, k) for story_id in story_ids for k in range(1, 5)}


# --------------------------------------------------------------------------------------------
# eval.rows
# --------------------------------------------------------------------------------------------


def test_rows_left_out_are_neither_generated_nor_reported_and_a_rerun_adds_them(
    stories, measures, toy_stories, tmp_path
):
    out = tmp_path / "run"
    models = fake_models(stories)
    chosen = ["gt", "ours_description", "memory_non_ar"]
    cfg = EvalConfig(split="train", max_stories=STORIES, rows=chosen)
    results = evaluate(stories, toy_stories, out, cfg, models, measures, identities=fake_identities())
    assert list(results["text"]) == ["ours_description"]
    assert list(results["images"]) == ["gt", "memory_non_ar"]
    assert list(results["intrinsic"]) == ["sis"]
    assert "fid" in results["images"]["memory_non_ar"]
    assert models.illustrator.calls == [] and models.tell_story.calls == []
    assert len(models.memory_illustrator.calls) == FRAMES
    assert sorted(p.name for p in (out / "images").iterdir()) == ["memory_non_ar"]
    markdown = (out / "results.md").read_text()
    for row in (*TEXT_ROWS, *IMAGE_ROWS):
        assert (f"| {row.label} |" in markdown) == (row.key in chosen), row.key

    # Every row now: the cached stories get only the rows they lack.
    models = fake_models(stories)
    results = evaluate(
        stories, toy_stories, out, dataclasses.replace(cfg, rows=None), models, measures,
        identities=fake_identities(),
    )  # fmt: skip
    assert list(results["images"]) == [row.key for row in IMAGE_ROWS]
    assert len(models.memory_illustrator.calls) == FRAMES  # memory_story_captions_refs only
    assert {call[0] for call in models.memory_illustrator.calls} <= {
        f.story_caption for story, _ in stories for f in story.frames
    }
    assert len(models.tell_story.calls) == STORIES

    # Nothing is lacking any more: nothing is generated.
    models = fake_models(stories)
    evaluate(
        stories, toy_stories, out, dataclasses.replace(cfg, rows=None), models, measures,
        identities=fake_identities(),
    )  # fmt: skip
    assert models.memory_illustrator.calls == models.illustrator.calls == models.tell_story.calls == []


def test_an_unknown_or_empty_row_list_is_a_config_error_naming_the_rows():
    with pytest.raises(
        ConfigError, match=r"eval\.rows must be null .* 'ours_non_ar'.*got \['gt', 'ours_nonar'\]"
    ):
        resolve_config(preset="tiny", overrides=["eval.rows=[gt, ours_nonar]"])
    with pytest.raises(ConfigError, match=r"eval\.rows must be null"):
        resolve_config(preset="tiny", overrides=["eval.rows=[]"])
    assert resolve_config(preset="tiny", overrides=["eval.rows=[gt, ours_ar]"]).eval.rows == ["gt", "ours_ar"]


def test_memory_rows_use_the_memory_illustrator_with_gt_references(stories, tmp_path):
    story, images = stories[0]
    plain, memory = _RecordingIllustrator((0, 0, 0)), _RecordingIllustrator((255, 0, 0), max_references=2)
    record = generate_story_outputs(
        story, images, EvalModels(illustrator=plain, memory_illustrator=memory), EvalConfig(), tmp_path
    )
    captions = [f.story_caption for f in story.frames]
    descriptions = [f.description for f in story.frames]
    assert len(plain.calls) == 4 * 4 and len(memory.calls) == 2 * 4
    # story captions + references, then descriptions + references, at most 2 references each
    expected = [(captions[k], min(k, 2), captions[max(0, k - 2) : k]) for k in range(1, 5)]
    expected += [(descriptions[k], min(k, 2), descriptions[max(0, k - 2) : k]) for k in range(1, 5)]
    assert [call[:3] for call in memory.calls] == expected
    for key in ("memory_story_captions_refs", "memory_non_ar"):
        assert len(record["images"][key]) == 4
        assert Image.open(tmp_path / record["images"][key][0]).getpixel((0, 0)) == (255, 0, 0)
    without = generate_story_outputs(story, images, EvalModels(illustrator=plain), EvalConfig(), tmp_path)
    assert "memory_non_ar" not in without["images"]


# --------------------------------------------------------------------------------------------
# The cache: keyed by what determines each row's outputs
# --------------------------------------------------------------------------------------------


def test_a_rerun_regenerates_the_rows_whose_settings_changed_and_reuses_the_others(
    stories, measures, toy_stories, tmp_path
):
    out, cfg = tmp_path / "run", EvalConfig(split="train", max_stories=STORIES)
    first = evaluate(
        stories, toy_stories, out, cfg, fake_models(stories), measures, identities=fake_identities()
    )
    frame = out / "images" / "sd_no_context" / f"{stories[0][0].story_id}_1.png"
    assert Image.open(frame).getpixel((0, 0)) == (0, 0, 20)
    nothing = dict.fromkeys(calls(fake_models(stories)), 0)

    # The same settings: every row is reused.
    models = fake_models(stories)
    again = evaluate(stories, toy_stories, out, cfg, models, measures, identities=fake_identities())
    assert calls(models) == nothing and again == first

    # Another illustrator setting (3 steps): its rows are drawn again, with its new frames; no other row.
    illustrator_rows = sum(row.model == "illustrator" for row in IMAGE_ROWS)
    models = fake_models(stories, steps=3)
    results = evaluate(stories, toy_stories, out, cfg, models, measures, identities=fake_identities(steps=3))
    assert calls(models) == nothing | {"illustrator": illustrator_rows * FRAMES}
    assert Image.open(frame).getpixel((0, 0)) == (0, 0, 3)
    assert results["images"]["sd_no_context"] != first["images"]["sd_no_context"]
    assert results["text"] == first["text"]

    # Another seed (7): every row of a system given a seed, with seed-7 seeds; not the greedy baselines.
    models = fake_models(stories, steps=3)
    evaluate(stories, toy_stories, out, dataclasses.replace(cfg, seed=7), models, measures,
             identities=fake_identities(steps=3))  # fmt: skip
    assert calls(models) == {
        "captioners": 2 * STORIES, "illustrator": illustrator_rows * FRAMES, "memory_illustrator": 2 * FRAMES,
        "tell_story": STORIES, "caption_baseline": 0, "text_baseline": 0,
    }  # fmt: skip
    assert {call[3] for call in models.illustrator.calls} == {
        derive_seed(7, "frame", story.story_id, k) for story, _ in stories for k in range(1, 5)
    }


def test_a_row_whose_model_is_no_longer_configured_is_not_reported_from_the_cache(
    stories, measures, toy_stories, tmp_path
):
    out, cfg = tmp_path / "run", EvalConfig(split="train", max_stories=STORIES)
    evaluate(stories, toy_stories, out, cfg, fake_models(stories), measures, identities=fake_identities())
    models = dataclasses.replace(fake_models(stories), memory_illustrator=None)
    results = evaluate(stories, toy_stories, out, cfg, models, measures, identities=fake_identities())
    assert "memory_non_ar" not in results["images"] and "sd_no_context" in results["images"]
    # Still cached under its own key: configured again, it is reused.
    models = fake_models(stories)
    results = evaluate(stories, toy_stories, out, cfg, models, measures, identities=fake_identities())
    assert "memory_non_ar" in results["images"] and models.memory_illustrator.calls == []


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda text: text[: len(text) // 2], ""),  # truncated, as by a full disk
        (lambda text: b"\xff" + text.encode(), "can't decode byte 0xff"),  # not UTF-8
        (lambda text: "[]", "it holds a list, not an object"),
        (lambda text: text.replace('"story_id": "', '"story_id": "x'), "its story_id is 'x"),
        (lambda text: json.dumps({**json.loads(text), "text": {"ours_ar": ["only one"]}}),
         '"text" must map each row to a list of 4 strings'),
        (lambda text: json.dumps({**json.loads(text), "keys": []}), '"keys" must hold an object for "text"'),
    ],
)  # fmt: skip
def test_a_corrupt_cache_file_is_a_clear_error_naming_it(
    every_row, stories, measures, toy_stories, tmp_path, damage, problem
):
    out = tmp_path / "copy"
    shutil.copytree(every_row[2], out)
    path = out / "cache" / f"{stories[0][0].story_id}.json"
    damaged = damage(path.read_text())
    path.write_bytes(damaged if isinstance(damaged, bytes) else damaged.encode())
    cfg = EvalConfig(split="train", max_stories=STORIES)
    with pytest.raises(
        DataError, match=rf"{re.escape(str(path))} is not a valid eval cache file.*{re.escape(problem)}"
    ):
        evaluate(stories, toy_stories, out, cfg, fake_models(stories), measures, identities=fake_identities())


def test_a_model_folder_with_other_weights_gives_its_systems_another_identity(tmp_path):
    folder = tmp_path / "sd"
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"0" * 64)
    cfg = resolve_config(preset="tiny", overrides=[f"generator.base_model={folder}"])
    prompts = PromptTemplates.load()
    before = eval_identities(cfg, prompts, "cpu")
    assert eval_identities(cfg, prompts, "cpu") == before  # nothing changed, nothing to regenerate

    # Retrained weights of the same size, written later (set explicitly: a file system's clock may be
    # coarser than this test): the generator's systems change, the captioners and baselines do not.
    stamp = weights.stat().st_mtime_ns + 10**9
    weights.write_bytes(b"1" * 64)
    os.utime(weights, ns=(stamp, stamp))
    after = eval_identities(cfg, prompts, "cpu")
    assert {name for name in before if after[name] != before[name]} == {"illustrator", "tell_story"}
    (folder / "unet" / "extra.safetensors").write_bytes(b"")  # a file more
    assert eval_identities(cfg, prompts, "cpu")["illustrator"] != after["illustrator"]
    # Another generator setting, and another device type (CUDA decodes in bf16), change them too.
    steps = resolve_config(
        preset="tiny", overrides=[f"generator.base_model={folder}", "generator.num_inference_steps=3"]
    )
    assert (
        eval_identities(steps, prompts, "cpu")["illustrator"]
        != eval_identities(cfg, prompts, "cpu")["illustrator"]
    )
    assert eval_identities(cfg, prompts, "cuda")["captioners"] != before["captioners"]
    # A hub id is its own fingerprint; an unset model has no identity (its rows are skipped).
    assert before["caption_baseline"]["model"] == cfg.eval.caption_baseline_model
    assert before["memory_illustrator"] is None


def test_sharded_processes_share_the_keys_and_the_merge_refuses_a_share_made_otherwise(
    stories, measures, toy_stories, tmp_path, every_row
):
    cfg = EvalConfig(split="train", max_stories=STORIES)

    def process(out, index, identities):  # one process of two (the main one merges and scores)
        return evaluate(stories, toy_stories, out, cfg, fake_models(stories), measures, index, 2,
                        identities=identities)  # fmt: skip

    assert process(tmp_path / "run", 1, fake_identities()) is None
    assert process(tmp_path / "run", 0, fake_identities()) == every_row[0]  # as one process would score
    # The other process ran with another illustrator setting: its story is not merged under this run's.
    assert process(tmp_path / "mixed", 1, fake_identities(steps=3)) is None
    with pytest.raises(StorypipeError, match=rf"{stories[1][0].story_id}\.json lacks rows .*sd_no_context"):
        process(tmp_path / "mixed", 0, fake_identities())


@pytest.mark.parametrize("story_id", ["../../outside", ".hidden", "a/b", ""])
def test_a_story_id_that_would_name_a_path_outside_out_is_refused(tmp_path, toy_stories, story_id):
    data = tmp_path / "data"
    shutil.copytree(toy_stories, data)
    path = data / "sis" / "train.story-in-sequence.json"
    document = json.loads(path.read_text())
    first = document["annotations"][0][0]["story_id"]
    for (annotation,) in document["annotations"]:
        if annotation["story_id"] == first:
            annotation["story_id"] = story_id
    path.write_text(json.dumps(document))
    with pytest.raises(DataError, match="is not a plain name"):
        select_stories(data, EvalConfig(split="train"), story_length=5)
