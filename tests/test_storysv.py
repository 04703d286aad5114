"""FlintstonesSV / PororoSV -> VIST conversion, on tiny synthetic copies of the published layouts,
and Make-A-Story's referential text transform.

The fixtures write exactly what the published downloads hold (file names, pickles, .npy dtypes and
shapes, how ``following_cache4`` is built), with 32x32 frames whose colour encodes clip and frame
index, so the tests can tell which frame the converter picked.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.referential import (
    FLINTSTONES_ALIASES,
    FLINTSTONES_PRONOUNS,
    PORORO_PRONOUNS,
    referential_captions,
)
from pipeline.data.storysv import convert_storysv
from pipeline.data.vist import SPLITS, VistSplit, dii_path, load_vist_split, sis_path
from pipeline.errors import DataError, InputError
from pipeline.io import load_rgb

SIZE = 32  # frame side in pixels
FRAMES_PER_CLIP = 5  # FlintstonesSV video_frames_sampled clips hold 5 frames
FRAMES_PER_STRIP = 3  # our PororoSV strips stack 3 frames
MIN_LEN = 4  # following_cache4
# The label orders of the published label arrays (VLCStoryGan's unique_characters; StoryDALL-E's
# PororoSV character list), lower-cased as our labels write them.
FLINTSTONES_ORDER = ["wilma", "fred", "betty", "barney", "dino", "pebbles", "slate"]
PORORO_ORDER = ["pororo", "loopy", "crong", "eddy", "poby", "petty", "tongtong", "rody", "harry"]


def frame_colour(clip: int, frame: int) -> tuple[int, int, int]:
    """A distinct colour per (clip, frame)."""
    return (10 + 7 * clip, 20 + 40 * frame, 200 - 5 * clip)


def numpy1_pickle(obj: object) -> bytes:
    """``obj`` pickled as Python 2 / numpy 1.x wrote the published files: protocol 2, ``numpy.core`` paths."""
    return pickle.dumps(obj, protocol=2).replace(b"cnumpy._core.", b"cnumpy.core.")


def save_npy_numpy1(path: Path, array: np.ndarray) -> None:
    """``np.save`` of an object array as numpy 1.x wrote it (format 1.0 header, then the pickle)."""
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, np.lib.format.header_data_from_array_1_0(array))
        handle.write(numpy1_pickle(array))


def object_array(item: object) -> np.ndarray:
    """A 0-d object array holding ``item``, as ``np.save(path, a_dict)`` stores a dict."""
    array = np.empty((), dtype=object)
    array[()] = item
    return array


@dataclass(frozen=True)
class Clip:
    key: str  # published id
    caption: str
    characters: tuple[str, ...]
    setting: str | None = None


@dataclass(frozen=True)
class Fixture:
    root: Path
    clips: dict[str, Clip]
    clip_index: dict[str, int]  # key -> colour index
    stories: dict[str, list[tuple[str, list[str]]]]  # split -> [(story_id, frame keys)], in converter order
    photo_ids: dict[str, str]  # key -> photo id in the VIST layout


# --------------------------------------------------------------------------------------------
# FlintstonesSV fixture: flintstones_annotations_v1-0.json, train-val-test_split.json,
# following_cache4.pkl, labels.pkl, video_frames_sampled/{globalID}.npy
# --------------------------------------------------------------------------------------------

FLINTSTONES_EPISODES = {
    "s_01_e_01": [
        ("Fred is in the living room.", ("fred",), "living room"),
        ("Fred talks to Wilma on the couch.", ("fred", "wilma"), "living room"),
        ("Wilma's hat falls and Fred laughs.", ("fred", "wilma"), "living room"),
        ("Barney waves at Fred in the yard.", ("barney", "fred"), "yard"),
        ("Then Barney and Fred\tdrive away.\n", ("barney", "fred"), "road"),
        ("Mr. Slate shouts at the quarry.", ("slate",), "quarry"),
        ("Mr Slate is angry.", ("slate",), "quarry"),
        ("Dino runs after Pebbles.", ("dino", "pebbles"), ""),
    ],
    "s_02_e_03": [
        ("Betty is in the kitchen.", ("betty",), "kitchen"),
        ("Betty's cake burns.", ("betty",), "kitchen"),
        ("Barney and Betty eat.", ("barney", "betty"), "kitchen"),
        ("Betty and Barney talk.", ("barney", "betty"), "kitchen"),
        ("Wilma arrives.", ("wilma",), "kitchen"),
        ("Wilma and Betty laugh.", ("betty", "wilma"), "kitchen"),
    ],
}


def write_flintstones(root: Path) -> Fixture:
    root.mkdir(parents=True, exist_ok=True)
    (root / "video_frames_sampled").mkdir()
    clips: dict[str, Clip] = {}
    clip_index: dict[str, int] = {}
    annotations = []
    labels = {}
    for episode, rows in FLINTSTONES_EPISODES.items():
        for shot, (caption, characters, setting) in enumerate(rows):
            key = f"{episode}_shot_{shot * 75:06d}_{shot * 75 + 74:06d}"
            clips[key] = Clip(key, caption, characters, setting or None)
            clip_index[key] = len(clip_index)
            annotations.append(
                {
                    "globalID": key,
                    "keyFrames": [f"{key}_10.png", f"{key}_40.png", f"{key}_70.png"],
                    "characters": [{"entityLabel": c, "labelNPC": c.title()} for c in characters],
                    "objects": [],
                    "setting": setting,
                    "description": caption,
                }
            )
            flags = [1 if name in characters else 0 for name in FLINTSTONES_ORDER]
            labels[key] = np.array(flags) if episode == "s_01_e_01" else flags  # arrays and lists both occur
            frames = np.stack(
                [
                    np.full((SIZE, SIZE, 3), frame_colour(clip_index[key], f), np.uint8)
                    for f in range(FRAMES_PER_CLIP)
                ]
            )
            np.save(root / "video_frames_sampled" / f"{key}.npy", frames)

    # following_cache4 as the published loaders build it: the next MIN_LEN clips of the sorted list,
    # kept when they are all in the same episode (shorter at the very end of the list).
    all_clips = sorted(clips)
    followings = {}
    for index, clip in enumerate(all_clips):
        following = all_clips[index + 1 : index + MIN_LEN + 1]
        if all(
            c.split("_")[1] == clip.split("_")[1] and c.split("_")[3] == clip.split("_")[3] for c in following
        ):
            followings[clip] = following
    ep1 = [k for k in all_clips if k.startswith("s_01_e_01")]
    ep2 = [k for k in all_clips if k.startswith("s_02_e_03")]
    splits = {"train": [ep1[2], ep1[0], ep1[1], ep1[6]], "val": [ep1[3], ep1[7]], "test": ep2}

    with open(root / "flintstones_annotations_v1-0.json", "w") as handle:
        json.dump(annotations, handle)
    with open(root / "train-val-test_split.json", "w") as handle:
        json.dump(splits, handle)
    with open(root / "following_cache4.pkl", "wb") as handle:
        pickle.dump(followings, handle)
    (root / "labels.pkl").write_bytes(numpy1_pickle(labels))

    stories = {
        split: [
            (first, [first, *followings[first]]) for first in ids if len(followings.get(first, [])) == MIN_LEN
        ]
        for split, ids in splits.items()
    }
    return Fixture(root, clips, clip_index, stories, {key: key for key in clips})


# --------------------------------------------------------------------------------------------
# PororoSV fixture: descriptions.npy, img_cache4.npy, following_cache4.npy, labels.npy,
# train_seen_unseen_ids.npy, {episode}/{frame}.png
# --------------------------------------------------------------------------------------------

PORORO_EPISODES = {
    "Pororo_ENGLISH1_1_ep1": [
        ("Pororo is on the snowy hill.", ("pororo",)),
        ("Pororo meets Crong.", ("crong", "pororo")),
        ("Crong's ball rolls away.", ("crong",)),
        ("Loopy bakes cookies.", ("loopy",)),
        ("Loopy gives pororo a cookie.", ("loopy", "pororo")),
        ("Eddy builds a machine.", ("eddy",)),
        ("Eddy and Poby test it.", ("eddy", "poby")),
    ],
    "Pororo_ENGLISH1_2_ep2": [
        ("Petty skates on the ice.", ("petty",)),
        ("Harry sings to Petty.", ("harry", "petty")),
        ("Petty laughs at Harry.", ("harry", "petty")),
        ("Rody and Tongtong play.", ("rody", "tongtong")),
        ("Tongtong casts a spell.", ("tongtong",)),
        ("Everyone cheers.", ()),
    ],
}


def write_pororo(root: Path) -> Fixture:
    root.mkdir(parents=True, exist_ok=True)
    clips: dict[str, Clip] = {}
    clip_index: dict[str, int] = {}
    descriptions = {}
    labels = {}
    first_frames: list[str] = []
    followings: list[list[str]] = []
    for episode, rows in PORORO_EPISODES.items():
        (root / episode).mkdir()
        for frame, (caption, characters) in enumerate(rows):
            key = f"{episode}/{frame}"
            clips[key] = Clip(key, caption, characters)
            clip_index[key] = len(clip_index)
            descriptions[key] = [caption, f"A second caption of frame {frame}."]
            labels[key] = np.array([1.0 if name in characters else 0.0 for name in PORORO_ORDER])
            strip = np.concatenate(
                [
                    np.full((SIZE, SIZE, 3), frame_colour(clip_index[key], f), np.uint8)
                    for f in range(FRAMES_PER_STRIP)
                ]
            )
            Image.fromarray(strip).save(root / episode / f"{frame}.png")
            # img_cache4 / following_cache4: every frame with MIN_LEN frames after it in its episode.
            if frame + MIN_LEN < len(rows):
                first_frames.append(f"{episode}/{frame}.png")
                followings.append([f"{episode}/{frame + i + 1}.png" for i in range(MIN_LEN)])

    save_npy_numpy1(root / "descriptions.npy", object_array(descriptions))
    save_npy_numpy1(root / "labels.npy", object_array(labels))
    np.save(root / "img_cache4.npy", np.array(first_frames, dtype="S"))
    np.save(root / "following_cache4.npy", np.array(followings, dtype="S"))
    # (train, seen, unseen) story indices, unsorted and ragged: an object array, as numpy 1.x saved it.
    split_ids = np.empty(3, dtype=object)
    split_ids[0], split_ids[1], split_ids[2] = [3, 0, 1], [2], [4]
    save_npy_numpy1(root / "train_seen_unseen_ids.npy", split_ids)

    stories = {
        split: [
            (str(i), [first_frames[i].removesuffix(".png"), *(f.removesuffix(".png") for f in followings[i])])
            for i in sorted(ids)
        ]
        for split, ids in zip(SPLITS, split_ids, strict=True)
    }
    return Fixture(root, clips, clip_index, stories, {key: key.replace("/", "__") for key in clips})


WRITERS = {"flintstones": write_flintstones, "pororo": write_pororo}
FRAMES_PER_SOURCE = {"flintstones": FRAMES_PER_CLIP, "pororo": FRAMES_PER_STRIP}
ORDERS = {"flintstones": FLINTSTONES_ORDER, "pororo": PORORO_ORDER}


@pytest.fixture(scope="module", params=["flintstones", "pororo"])
def converted(request, tmp_path_factory) -> tuple[str, Fixture, Path, dict[str, int], list[int]]:
    """(dataset, source fixture, converted root, returned counts, progress calls), literal captions."""
    dataset = request.param
    fixture = WRITERS[dataset](tmp_path_factory.mktemp(f"{dataset}-src"))
    out = tmp_path_factory.mktemp(f"{dataset}-vist")
    calls: list[int] = []
    counts = convert_storysv(dataset, fixture.root, out, progress=calls.append)
    return dataset, fixture, out, counts, calls


def load_all(root: Path) -> dict[str, VistSplit]:
    return {split: load_vist_split(root, split) for split in SPLITS}


def test_every_split_loads_with_no_drops(converted):
    dataset, fixture, out, counts, calls = converted
    assert counts == {split: len(fixture.stories[split]) for split in SPLITS}
    assert all(counts.values()), "the fixture should give every split at least one story"
    assert sum(calls) == sum(counts.values())
    for split, loaded in load_all(out).items():
        assert loaded.total_stories == counts[split]
        assert len(loaded.stories) == counts[split], loaded.drop_report()
        assert len(list(loaded.iter_usable())) == counts[split]
        assert not any(loaded.drop_counts().values()), loaded.drop_report()


def test_stories_follow_the_following_cache(converted):
    dataset, fixture, out, _, _ = converted
    for split, loaded in load_all(out).items():
        expected = {
            story_id: [fixture.photo_ids[key] for key in keys] for story_id, keys in fixture.stories[split]
        }
        got = {story.story_id: [frame.photo_id for frame in story.frames] for story in loaded.stories}
        assert got == expected


def test_captions_and_descriptions_match_the_source(converted):
    dataset, fixture, out, _, _ = converted
    by_photo = {fixture.photo_ids[key]: clip for key, clip in fixture.clips.items()}
    for loaded in load_all(out).values():
        for story in loaded.stories:
            for frame in story.frames:
                source = " ".join(by_photo[frame.photo_id].caption.split())
                assert frame.story_caption == source
                assert frame.description == source


def test_labels_match_the_source_label_arrays(converted):
    dataset, fixture, out, _, _ = converted
    by_photo = {fixture.photo_ids[key]: clip for key, clip in fixture.clips.items()}
    for split in SPLITS:
        sis = json.loads(sis_path(out, split).read_text())
        dii = json.loads(dii_path(out, split).read_text())
        assert sis["images"] == dii["images"]
        for story in load_vist_split(out, split).stories:
            for frame in story.frames:
                clip = by_photo[frame.photo_id]
                assert frame.labels == {"characters": sorted(clip.characters), "background": clip.setting}
                assert set(frame.labels["characters"]) <= set(ORDERS[dataset])


def test_images_are_the_middle_frame_as_rgb_png(converted):
    dataset, fixture, out, _, _ = converted
    by_photo = {fixture.photo_ids[key]: key for key in fixture.clips}
    middle = FRAMES_PER_SOURCE[dataset] // 2
    for loaded in load_all(out).values():
        for story in loaded.stories:
            for frame in story.frames:
                assert frame.image_path.suffix == ".png"
                with Image.open(frame.image_path) as image:
                    assert (image.mode, image.size) == ("RGB", (SIZE, SIZE))
                pixels = np.asarray(load_rgb(frame.image_path))
                colour = frame_colour(fixture.clip_index[by_photo[frame.photo_id]], middle)
                assert (pixels == colour).all()


def test_referential_conversion_uses_pronouns_for_repeated_characters(tmp_path):
    fixture = write_flintstones(tmp_path / "src")
    convert_storysv("flintstones", fixture.root, tmp_path / "vist", referential=True)
    stories = {story.story_id: story for story in load_vist_split(tmp_path / "vist", "train").stories}
    # train story from clip 0: Fred / Fred+Wilma / Fred+Wilma / Barney+Fred / Barney+Fred.
    first = stories[sorted(fixture.clips)[0]]
    assert [frame.story_caption for frame in first.frames] == [
        "Fred is in the living room.",  # the first frame keeps every name
        "He talks to Wilma on the couch.",  # Fred was in frame 0; Wilma was not and keeps her name
        "Her hat falls and Fred laughs.",  # one replacement per caption; possessive
        "Barney waves at him in the yard.",  # Barney is new; Fred, mid-sentence object
        "Then they drive away.",  # both were in the previous frame: a pair
    ]
    # DII stays literal.
    assert [frame.description for frame in first.frames][1] == "Fred talks to Wilma on the couch."
    test_story = load_vist_split(tmp_path / "vist", "test").stories[0]
    assert test_story.frames[1].story_caption == "Her cake burns."


def test_referential_pororo(tmp_path):
    fixture = write_pororo(tmp_path / "src")
    convert_storysv("pororo", fixture.root, tmp_path / "vist", referential=True)
    story = next(s for s in load_vist_split(tmp_path / "vist", "train").stories if s.story_id == "0")
    assert [frame.story_caption for frame in story.frames] == [
        "Pororo is on the snowy hill.",
        "He meets Crong.",
        "His ball rolls away.",
        "Loopy bakes cookies.",  # Loopy was not in the previous frame
        "She gives pororo a cookie.",
    ]


@pytest.mark.parametrize("dataset", ["flintstones", "pororo"])
def test_conversion_is_deterministic(dataset, tmp_path):
    fixture = WRITERS[dataset](tmp_path / "src")
    first, second = tmp_path / "a", tmp_path / "b"
    convert_storysv(dataset, fixture.root, first, referential=True)
    convert_storysv(dataset, fixture.root, second, referential=True)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    assert any(p.suffix == ".png" for p in files)
    for relative in files:
        assert (first / relative).read_bytes() == (second / relative).read_bytes(), relative


@pytest.mark.parametrize(
    ("dataset", "name"),
    [
        ("flintstones", "flintstones_annotations_v1-0.json"),
        ("flintstones", "train-val-test_split.json"),
        ("flintstones", "following_cache4.pkl"),
        ("flintstones", "labels.pkl"),
        ("pororo", "descriptions.npy"),
        ("pororo", "img_cache4.npy"),
        ("pororo", "following_cache4.npy"),
        ("pororo", "labels.npy"),
        ("pororo", "train_seen_unseen_ids.npy"),
    ],
)
def test_missing_file_is_a_data_error_naming_it(dataset, name, tmp_path):
    fixture = WRITERS[dataset](tmp_path / "src")
    (fixture.root / name).unlink()
    with pytest.raises(DataError, match=name) as caught:
        convert_storysv(dataset, fixture.root, tmp_path / "vist")
    assert "folder holds" in str(caught.value)  # says what the folder should contain
    assert not (tmp_path / "vist").exists()  # nothing half-written


@pytest.mark.parametrize("dataset", ["flintstones", "pororo"])
def test_missing_frame_file_is_a_data_error_naming_it(dataset, tmp_path):
    fixture = WRITERS[dataset](tmp_path / "src")
    key = fixture.stories["train"][0][1][2]
    path = fixture.root / ("video_frames_sampled" if dataset == "flintstones" else "") / key
    frame_file = path.with_name(path.name + (".npy" if dataset == "flintstones" else ".png"))
    frame_file.unlink()
    with pytest.raises(DataError, match=frame_file.name):
        convert_storysv(dataset, fixture.root, tmp_path / "vist")


@dataclass(frozen=True)
class _Exploit:
    """Unpickling this with a plain unpickler creates ``folder``."""

    folder: str

    def __reduce__(self):
        return (os.mkdir, (self.folder,))


def test_pickles_cannot_run_code(tmp_path):
    fixture = write_flintstones(tmp_path / "src")
    sentinel = tmp_path / "created-by-the-pickle"
    with open(fixture.root / "labels.pkl", "wb") as handle:
        pickle.dump({"x": _Exploit(str(sentinel))}, handle)
    with pytest.raises(DataError, match="labels.pkl.*refusing"):
        convert_storysv("flintstones", fixture.root, tmp_path / "vist")
    assert not sentinel.exists()


# --------------------------------------------------------------------------------------------
# referential_captions on known sentences
# --------------------------------------------------------------------------------------------


def refer(
    previous: set[str], caption: str, pronouns=FLINTSTONES_PRONOUNS, aliases=FLINTSTONES_ALIASES
) -> str:
    """The referential version of ``caption`` when the frame before it shows ``previous``."""
    return referential_captions(["(frame 0)", caption], [previous, set()], pronouns, aliases)[1]


@pytest.mark.parametrize(
    ("previous", "caption", "expected"),
    [
        ({"fred"}, "Fred sits down.", "He sits down."),  # sentence start: capitalised
        ({"fred"}, "Then fred sits down.", "Then he sits down."),  # mid-sentence, lower-case name
        ({"fred"}, "It is dark. Fred sits.", "It is dark. He sits."),  # start of a later sentence
        ({"fred"}, "Later, Fred sits.", "Later, he sits."),
        ({"wilma"}, "Wilma's hat falls.", "Her hat falls."),  # possessive
        ({"fred"}, "Barney waves at Fred's car.", "Barney waves at his car."),
        ({"fred"}, "Fred's going home.", "He's going home."),  # "Fred is", not a possessive
        ({"fred"}, "Barney waves at Fred.", "Barney waves at him."),  # object
        ({"barney"}, "Fred talks.", "Fred talks."),  # not in the previous frame: keeps its name
        ({"fred", "barney"}, "Fred and Barney talk.", "They talk."),  # two characters: a pair
        ({"fred", "barney"}, "Fred and Barney's car is red.", "Their car is red."),
        ({"fred", "barney"}, "Barney talks to Fred.", "He talks to Fred."),  # only the first mention
        ({"barney"}, "Fred talks to Barney.", "Fred talks to him."),  # the first *repeated* mention
        ({"fred"}, "Fred sits. Fred eats.", "He sits. Fred eats."),
        ({"fred"}, "Frederick and Fred walk.", "Frederick and he walk."),  # whole words only
        ({"slate"}, "Mr. Slate shouts.", "He shouts."),  # alias
        ({"slate"}, "Fred sees Mr Slate.", "Fred sees him."),
        ({"pebbles"}, "Pebbles plays.", "She plays."),
        (set(), "Fred sits.", "Fred sits."),
    ],
)
def test_referential_captions_known_sentences(previous, caption, expected):
    assert refer(previous, caption) == expected


def test_referential_first_caption_and_frame_chain():
    captions = ["Eddy builds a kite.", "Eddy flies it.", "Poby and Eddy watch.", "Poby and Eddy cheer."]
    frames = [{"eddy"}, {"eddy"}, {"eddy", "poby"}, {"eddy", "poby"}]
    assert referential_captions(captions, frames, PORORO_PRONOUNS) == [
        "Eddy builds a kite.",
        "He flies it.",
        "Poby and he watch.",  # Poby is new; Eddy, after "and", a subject
        "They cheer.",
    ]


def test_referential_its_and_unknown_characters():
    assert refer({"robo"}, "Robo's arm moves.", {"robo": "it"}, {}) == "Its arm moves."
    assert refer({"gazoo"}, "Gazoo floats.") == "Gazoo floats."  # no pronoun in the table


def test_referential_rejects_mismatched_lengths_and_unknown_pronouns():
    with pytest.raises(ValueError, match="one character set per caption"):
        referential_captions(["a", "b"], [set()], FLINTSTONES_PRONOUNS)
    with pytest.raises(ValueError, match="unknown pronoun"):
        referential_captions(["a"], [set()], {"fred": "xe"})


# --------------------------------------------------------------------------------------------
# Hostile inputs: each is one DataError naming the file, raised before anything is written
# --------------------------------------------------------------------------------------------

NINE_TIB = (9 << 40,)  # elements of int8: 9 TiB


@dataclass(frozen=True)
class _Reduce:
    """Pickles as ``function(*args)``, then ``__setstate__(state)`` when a state is given."""

    function: object
    args: tuple
    state: object = None

    def __reduce__(self):
        return (self.function, self.args) if self.state is None else (self.function, self.args, self.state)


def _reconstruct():
    return np.zeros(1).__reduce__()[0]  # numpy's _reconstruct, under its own module name


HOSTILE_PICKLES = {
    # numpy allocates _reconstruct's shape, then __setstate__'s, before it compares either with the data
    "9 TiB _reconstruct": (_Reduce(_reconstruct(), (np.ndarray, NINE_TIB, b"b")), "would take 9,216 GiB"),
    "9 TiB object state": (
        _Reduce(_reconstruct(), (np.ndarray, (0,), b"b"), (1, NINE_TIB, np.dtype("O"), False, [1])),
        "would take",
    ),
    # numpy reads past an object list shorter than the shape (a crash for longer shapes)
    "short object list": (
        _Reduce(_reconstruct(), (np.ndarray, (0,), b"b"), (1, (2,), np.dtype("O"), False, [1])),
        "does not match its shape",
    ),
    # a record dtype whose field lies 1000 bytes past its 8: numpy does not check a pickled dtype
    "field out of bounds": (
        _Reduce(
            _reconstruct(),
            (np.ndarray, (0,), b"b"),
            (
                1,
                (1,),
                _Reduce(
                    np.dtype,
                    ("V8", False, True),
                    (3, "|", None, ("a",), {"a": (np.dtype("f8"), 1000)}, 8, 1, 16),
                ),
                False,
                b"12345678",
            ),
        ),
        "refusing dtype",
    ),
    # ndarray(shape, dtype, buffer, offset, strides) reads any memory
    "ndarray over any memory": (
        _Reduce(np.ndarray, ((4,), "f8", b"12345678", 0, (-(1 << 20),))),
        "refusing|only numpy arrays",
    ),
    "other codecs": (_Reduce(__import__("codecs").encode, (b"x", "zlib")), "only latin-1"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_PICKLES))
def test_a_hostile_pickle_is_refused_before_numpy_allocates_or_reads(case, tmp_path):
    payload, expected = HOSTILE_PICKLES[case]
    fixture = write_flintstones(tmp_path / "src")
    (fixture.root / "labels.pkl").write_bytes(pickle.dumps({"x": payload}, protocol=2))
    with pytest.raises(DataError, match=f"labels.pkl could not be loaded as data .*({expected})"):
        convert_storysv("flintstones", fixture.root, tmp_path / "vist")
    assert not (tmp_path / "vist").exists()


def _npy_header(descr: str, shape: str) -> bytes:
    """A .npy format 1.0 header, as written by hand: it can claim anything."""
    text = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}"
    text += " " * (63 - (10 + len(text)) % 64) + "\n"
    return np.lib.format.magic(1, 0) + len(text).to_bytes(2, "little") + text.encode("latin1")


def _first_clip(root: Path) -> Path:
    return sorted((root / "video_frames_sampled").iterdir())[0]


def _last_clip(root: Path) -> Path:
    return sorted((root / "video_frames_sampled").iterdir())[-1]


HOSTILE_FILES = {
    # (dataset, file to replace, its new content or a function of the source root, message)
    "npy header claims 9 TiB": (
        "pororo",
        "img_cache4.npy",
        _npy_header("|S40", "(250000000000,)"),
        "would take",
    ),
    "npy shorter than its header": (
        "pororo",
        "img_cache4.npy",
        _npy_header("|S40", "(5,)") + b"x" * 10,
        "the file is truncated",
    ),
    "npy negative shape": ("pororo", "img_cache4.npy", _npy_header("|S40", "(-5,)"), "not a tuple of sizes"),
    "object clip": ("flintstones", _first_clip, None, "expected RGB frames"),
    "truncated clip": ("flintstones", _last_clip, b"", "not a readable .npy file"),
    "clip of no frames": ("flintstones", _last_clip, "empty clip", "expected RGB frames"),
    "labels that are text": ("flintstones", "labels.pkl", "text labels", "should be 7 zeros or ones"),
    "followings that are a number": (
        "flintstones",
        "following_cache4.pkl",
        "number followings",
        "should be a list of globalIDs",
    ),
    "split ids of dicts": (
        "flintstones",
        "train-val-test_split.json",
        b'{"train": [{}], "val": [], "test": []}',
        "lists of globalIDs",
    ),
    "deeply nested split file": (
        "flintstones",
        "train-val-test_split.json",
        b"[" * 100_000 + b"]" * 100_000,
        "nested too deeply",
    ),
    "binary annotations": (
        "flintstones",
        "flintstones_annotations_v1-0.json",
        bytes(range(128, 256)),
        "is not valid JSON",
    ),
    "a description that is not text": (
        "flintstones",
        "flintstones_annotations_v1-0.json",
        "dict descriptions",
        "should have text",
    ),
    "split ids that are text": (
        "pororo",
        "train_seen_unseen_ids.npy",
        "text split ids",
        "list of story indices",
    ),
    "no captions": ("pororo", "descriptions.npy", "empty captions", "should be a list of texts"),
    "frame names that are numbers": (
        "pororo",
        "img_cache4.npy",
        "number frame names",
        "expected frame names",
    ),
}


def _hostile_content(kind: str, path: Path) -> None:
    """Rewrite ``path`` (a file of the fixture) into the hostile ``kind``."""
    if kind == "empty clip":
        np.save(path, np.zeros((0, SIZE, SIZE, 3), np.uint8))
    elif kind == "text labels":
        path.write_bytes(
            pickle.dumps({key: "yes" for key in pickle.loads(path.read_bytes(), encoding="latin1")})
        )
    elif kind == "number followings":
        path.write_bytes(pickle.dumps({key: 4 for key in pickle.loads(path.read_bytes())}))
    elif kind == "dict descriptions":
        entries = json.loads(path.read_text())
        path.write_text(json.dumps([dict(entry, description={"text": "x"}) for entry in entries]))
    elif kind == "text split ids":
        split_ids = np.empty(3, dtype=object)
        split_ids[0], split_ids[1], split_ids[2] = ["0"], ["1"], ["2"]
        save_npy_numpy1(path, split_ids)
    elif kind == "empty captions":
        captions = np.load(path, allow_pickle=True).item()
        save_npy_numpy1(path, object_array({key: [] for key in captions}))
    elif kind == "number frame names":
        np.save(path, np.arange(len(np.load(path))))


@pytest.mark.parametrize("case", sorted(HOSTILE_FILES))
def test_a_hostile_input_file_is_a_data_error_before_anything_is_written(case, tmp_path):
    dataset, target, content, expected = HOSTILE_FILES[case]
    fixture = WRITERS[dataset](tmp_path / "src")
    path = target(fixture.root) if callable(target) else fixture.root / target
    if content is None:
        save_npy_numpy1(path, object_array({"not": "frames"}))
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        _hostile_content(content, path)
    with pytest.raises(DataError, match=expected) as caught:
        convert_storysv(dataset, fixture.root, tmp_path / "vist")
    assert path.name in str(caught.value) and len(str(caught.value).splitlines()) == 1
    assert not (tmp_path / "vist").exists()  # nothing created before the inputs are validated


def test_a_frame_that_fails_halfway_leaves_the_earlier_conversion_as_it_was(tmp_path):
    fixture = write_flintstones(tmp_path / "src")
    out = tmp_path / "vist"
    convert_storysv("flintstones", fixture.root, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    np.save(_last_clip(fixture.root), np.full((FRAMES_PER_CLIP, SIZE, SIZE, 3), 1000.0))  # found on reading
    with pytest.raises(DataError, match="frame values should lie in 0..255"):
        convert_storysv("flintstones", fixture.root, out)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "vist"]  # no staging folder left


def test_an_output_folder_of_other_files_is_refused_and_left_alone(tmp_path):
    fixture = write_pororo(tmp_path / "src")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="mine holds other files than a converted dataset .*notes.txt"):
        convert_storysv("pororo", fixture.root, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    (out / "notes.txt").unlink()
    out.rmdir()
    out.write_text("a file")
    with pytest.raises(InputError, match="is a file"):
        convert_storysv("pororo", fixture.root, out)


def test_a_source_that_is_a_file_is_a_data_error(tmp_path):
    src = tmp_path / "src.zip"
    src.write_bytes(b"PK")
    with pytest.raises(DataError, match="src.zip is not a folder: a PororoSV folder holds"):
        convert_storysv("pororo", src, tmp_path / "vist")
