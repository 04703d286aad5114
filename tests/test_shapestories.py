"""ShapeStories: determinism, the VIST loader round trip, labels against pixels, captions, world rules."""

from __future__ import annotations

import dataclasses
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import ToyDataConfig
from pipeline.data.shapestories import (
    ACTIONS,
    BACKGROUNDS,
    BLACK,
    CHARACTERS,
    CONNECTIVES,
    DECORATION_COLOURS,
    GREY,
    STORY_LENGTH,
    TREE_LEAVES,
    WHITE,
    FramePlan,
    generate_shapestories,
    render_frame,
)
from pipeline.data.vist import SPLITS, VistFrame, dii_path, load_vist_split, sis_path
from pipeline.io import load_rgb

CFG = ToyDataConfig(stories=30, seed=3, image_size=64)
MIN_ACTOR_PIXELS = 25  # a squashed two-actor triangle or diamond at 64x64 still covers ~50 pixels
MIN_GROUND_FRACTION = 0.1  # the ground band is ~30% of the image; actors and props cover little of it
PRONOUNS = {"she", "he", "they"}
CHARACTER_BY_NAME = {c.name: c for c in CHARACTERS}
BACKGROUND_BY_NAME = {b.name: b for b in BACKGROUNDS}
ACTION_BY_NAME = {a.name: a for a in ACTIONS}
# A colour each action's decorations always draw (backgrounds never use these; tested below).
ACTION_SIGNATURE = {
    "jump": GREY,
    "spin": GREY,
    "run": WHITE,
    "sleep": WHITE,
    "wave": BLACK,
    "dance": BLACK,
    "sit": TREE_LEAVES,
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int], list[int]]:
    """One generated dataset shared by the read-only tests: (root, stories per split, progress calls)."""
    root = tmp_path_factory.mktemp("shapestories")
    calls: list[int] = []
    counts = generate_shapestories(root, CFG, progress=calls.append)
    return root, counts, calls


@pytest.fixture(scope="module")
def frames(dataset: tuple[Path, dict[str, int], list[int]]) -> list[list[VistFrame]]:
    """Every story of every split as loaded by the VIST loader: a list of 5 VistFrames per story."""
    root = dataset[0]
    return [list(story.frames) for split in SPLITS for story in load_vist_split(root, split).stories]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _count(pixels: np.ndarray, rgb: tuple[int, int, int]) -> int:
    """Pixels of exactly ``rgb`` in an (H, W, 3) uint8 array."""
    return int((pixels == np.array(rgb, dtype=np.uint8)).all(axis=-1).sum())


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z]+", text)


# --------------------------------------------------------------------------------------------
# 1. Determinism
# --------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_files(dataset, tmp_path: Path) -> None:
    root = dataset[0]
    generate_shapestories(tmp_path / "again", CFG)
    first, second = _files(root), _files(tmp_path / "again")
    assert len(first) == 6 + CFG.stories * STORY_LENGTH  # 3 SIS + 3 DII + one PNG per frame
    assert sorted(first) == sorted(second)
    differing = [name for name in first if first[name] != second[name]]
    assert differing == []


def test_different_seed_gives_different_stories(dataset, tmp_path: Path) -> None:
    root = dataset[0]
    generate_shapestories(tmp_path, dataclasses.replace(CFG, seed=CFG.seed + 1))
    for split in ("train", "test"):
        texts = [
            [a[0]["original_text"] for a in json.loads(sis_path(r, split).read_text())["annotations"]]
            for r in (root, tmp_path)
        ]
        assert texts[0] != texts[1]


def test_progress_and_split_sizes(dataset) -> None:
    _, counts, calls = dataset
    assert sum(calls) == CFG.stories
    assert len(calls) == CFG.stories  # one call per finished story
    assert counts == {"train": 24, "val": 3, "test": 3}


def test_a_single_story_leaves_empty_splits_loadable(tmp_path: Path) -> None:
    counts = generate_shapestories(tmp_path, ToyDataConfig(stories=1, seed=0))
    assert counts == {"train": 1, "val": 0, "test": 0}
    assert [len(load_vist_split(tmp_path, split).stories) for split in SPLITS] == [1, 0, 0]


# --------------------------------------------------------------------------------------------
# 2. The VIST loader reads it unchanged
# --------------------------------------------------------------------------------------------


def test_loader_round_trip(dataset) -> None:
    root, counts, _ = dataset
    assert sum(counts.values()) == CFG.stories
    story_ids: list[str] = []
    photo_ids: list[str] = []
    for split in SPLITS:
        loaded = load_vist_split(root, split)
        assert loaded.dropped == {}
        assert len(loaded.stories) == loaded.total_stories == counts[split]
        for story in loaded.stories:
            assert len(story.frames) == STORY_LENGTH
            assert all(
                frame.labels and set(frame.labels) == {"characters", "background", "action"}
                for frame in story.frames
            )
            story_ids.append(story.story_id)
            photo_ids.extend(frame.photo_id for frame in story.frames)
        usable = list(loaded.iter_usable())
        assert len(usable) == counts[split]
        assert loaded.dropped == {}
        for _, images in usable:
            assert [(image.mode, image.size) for image in images] == [
                ("RGB", (CFG.image_size, CFG.image_size))
            ] * STORY_LENGTH
    for ids in (story_ids, photo_ids):
        assert all(i.isdigit() for i in ids)
        assert len(set(ids)) == len(ids)  # unique across splits


def test_labels_and_albums_in_both_files(dataset) -> None:
    root = dataset[0]
    for split in SPLITS:
        sis = json.loads(sis_path(root, split).read_text())
        dii = json.loads(dii_path(root, split).read_text())
        assert sis["images"] == dii["images"]
        labelled = {entry["id"]: entry for entry in sis["images"]}
        album_ids = {album["id"] for album in sis["albums"]}
        assert {album["id"] for album in dii["albums"]} == album_ids
        for document in (sis, dii):
            for (annotation,) in document["annotations"]:
                entry = labelled[annotation["photo_flickr_id"]]
                assert entry["album_id"] == annotation["album_id"]
                assert annotation["album_id"] in album_ids
                assert entry["labels"]["characters"]


# --------------------------------------------------------------------------------------------
# 3. Labels agree with pixels
# --------------------------------------------------------------------------------------------


def test_labels_agree_with_pixels(frames) -> None:
    for story in frames:
        for frame in story:
            pixels = np.asarray(load_rgb(frame.image_path))
            labels = frame.labels
            for character in CHARACTERS:
                count = _count(pixels, character.rgb)
                if character.name in labels["characters"]:
                    assert count >= MIN_ACTOR_PIXELS, (frame.photo_id, character.name, count)
                else:
                    assert count == 0, (frame.photo_id, character.name, count)
            for background in BACKGROUNDS:
                count = _count(pixels, background.ground)
                if background.name == labels["background"]:
                    assert count >= MIN_GROUND_FRACTION * pixels.shape[0] * pixels.shape[1], frame.photo_id
                else:
                    assert count == 0, (frame.photo_id, background.name)
            assert _count(pixels, ACTION_SIGNATURE[labels["action"]]) > 0, (frame.photo_id, labels["action"])


@pytest.mark.parametrize("size", [32, 64, 96])
def test_every_action_draws_every_actor_in_its_exact_colour(size: int) -> None:
    rng = random.Random(size)
    for action in ACTIONS:
        for index, character in enumerate(CHARACTERS):
            pair = (character, CHARACTERS[(index + 1) % len(CHARACTERS)])
            for actors in ((character,), tuple(sorted(pair, key=CHARACTERS.index))):
                background = rng.choice(BACKGROUNDS)
                plan = FramePlan(actors, background, action, tuple((0.0, 0.0) for _ in actors), "")
                pixels = np.asarray(render_frame(plan, size))
                assert pixels.shape == (size, size, 3)
                counts = {c.name: _count(pixels, c.rgb) for c in CHARACTERS}
                minimum = MIN_ACTOR_PIXELS * (size / 64) ** 2
                assert {n for n, k in counts.items() if k > 0} == {c.name for c in actors}, (
                    action.name,
                    counts,
                )
                assert all(counts[c.name] >= minimum for c in actors), (action.name, counts)


# --------------------------------------------------------------------------------------------
# 4. Captions
# --------------------------------------------------------------------------------------------


def test_story_captions_name_first_then_refer(frames) -> None:
    pronoun_captions = two_name_captions = 0
    for story in frames:
        mentioned: set[str] = set()
        previous = None
        for frame in story:
            caption, labels = frame.story_caption, frame.labels
            actors = labels["characters"]
            words = _words(caption)
            lower = {w.lower() for w in words}
            named = {w for w in words if w in CHARACTER_BY_NAME}
            pronoun = lower & PRONOUNS
            assert caption[0].isupper() and caption.endswith("."), caption
            background = BACKGROUND_BY_NAME[labels["background"]]
            if previous is None:
                assert background.sis_location in caption, caption
                assert not pronoun, caption
            else:
                assert caption.startswith(CONNECTIVES), caption
                changed = labels["background"] != previous.labels["background"]
                assert (f"went to {background.sis_name}" in caption) == changed, caption
            # A pronoun exactly when the actors are the previous frame's (who were named by then).
            same_actors = previous is not None and actors == previous.labels["characters"]
            assert bool(pronoun) == same_actors, (caption, actors)
            if same_actors:
                expected = "they" if len(actors) == 2 else CHARACTER_BY_NAME[actors[0]].pronoun
                assert pronoun == {expected} and not named, caption
                assert set(actors) <= mentioned
                pronoun_captions += 1
            else:
                assert named == set(actors), (caption, actors)  # first mention (and re-entries) by name
                two_name_captions += len(named) == 2
            assert ACTION_BY_NAME[labels["action"]].sis_past in caption, caption
            mentioned.update(actors)
            previous = frame
    assert pronoun_captions > 0 and two_name_captions > 0  # the sample exercises both rules


def test_descriptions_are_literal(frames) -> None:
    for story in frames:
        for frame in story:
            description, labels = frame.description, frame.labels
            for character in CHARACTERS:
                phrase = f"{character.colour} {character.shape}"
                assert (phrase in description) == (character.name in labels["characters"]), description
                assert character.name not in description
            action = ACTION_BY_NAME[labels["action"]]
            verb = action.dii_singular if len(labels["characters"]) == 1 else action.dii_plural
            background = BACKGROUND_BY_NAME[labels["background"]]
            assert description.endswith(f" {verb} {background.dii_phrase}."), description
            assert description[0].isupper()
            assert not re.search(r"\ba [aeiou]", description), description  # "an orange hexagon"


# --------------------------------------------------------------------------------------------
# 5. World constraints
# --------------------------------------------------------------------------------------------


def test_tables_are_immutable_and_distinct() -> None:
    assert 5 <= len(CHARACTERS) <= 7
    assert 5 <= len(BACKGROUNDS) <= 8
    assert len(ACTIONS) >= 4
    for table in (CHARACTERS, BACKGROUNDS, ACTIONS):
        assert isinstance(table, tuple)
        with pytest.raises(dataclasses.FrozenInstanceError):
            table[0].name = "changed"  # type: ignore[misc]
        assert len({entry.name for entry in table}) == len(table)
    assert len({c.rgb for c in CHARACTERS}) == len(CHARACTERS)
    assert len({c.shape for c in CHARACTERS}) == len(CHARACTERS)
    assert {c.pronoun for c in CHARACTERS} == {"she", "he"}
    scenery = {rgb for b in BACKGROUNDS for rgb in b.colours} | set(DECORATION_COLOURS)
    assert not {c.rgb for c in CHARACTERS} & scenery
    for background in BACKGROUNDS:
        others = {rgb for b in BACKGROUNDS if b != background for rgb in b.colours} | set(DECORATION_COLOURS)
        assert background.ground not in others
        assert not set(background.colours) & set(DECORATION_COLOURS)
    # Saturated characters, muted scenery: a wide vs narrow channel spread.
    assert all(max(c.rgb) - min(c.rgb) >= 150 for c in CHARACTERS)
    assert all(max(rgb) - min(rgb) <= 100 for b in BACKGROUNDS for rgb in b.colours)


def test_story_structure(frames) -> None:
    casts = []
    changes = []
    for story in frames:
        assert len(story) == STORY_LENGTH
        cast = set()
        for frame in story:
            actors = frame.labels["characters"]
            assert 1 <= len(actors) <= 2
            assert actors == sorted(actors, key=lambda name: CHARACTERS.index(CHARACTER_BY_NAME[name]))
            cast.update(actors)
        backgrounds = [frame.labels["background"] for frame in story]
        change_count = sum(a != b for a, b in zip(backgrounds[:-1], backgrounds[1:], strict=True))
        assert change_count <= 1, backgrounds
        assert 1 <= len(cast) <= 2
        casts.append(len(cast))
        changes.append(change_count)
    assert set(casts) == {1, 2}  # both kinds of story occur in 30
    assert set(changes) == {0, 1}
