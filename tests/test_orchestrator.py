"""The story loop with fake captioners and a fake generator: what each stage receives, determinism,
the repetition guard, resume after a crash, editing and insertion."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import pytest
from PIL import Image

from pipeline.config import StoryConfig
from pipeline.errors import StorypipeError
from pipeline.orchestrator import StoryTeller, frame_seed, similarity
from pipeline.story import Story


def colour_of(text: str) -> tuple[int, int, int]:
    digest = hashlib.sha256(text.encode()).digest()
    return digest[0], digest[1], digest[2]


class FakeCaptioner:
    """Captions depend only on their inputs and seed; ``scripted`` answers come first when given."""

    def __init__(self, scripted: list[str] | None = None) -> None:
        self.scripted = list(scripted or [])
        self.story_calls: list[tuple[tuple, str, int]] = []
        self.describe_calls: list[tuple[tuple, str, str]] = []

    def next_story_caption(self, image, caption, seed=None):
        self.story_calls.append((image.getpixel((0, 0)), caption, seed))
        return (
            self.scripted.pop(0)
            if self.scripted
            else f"Then thing {(seed + colour_of(caption)[0]) % 9973} happened."
        )

    def describe(self, image, current_caption, next_caption, seed=None):
        self.describe_calls.append((image.getpixel((0, 0)), current_caption, next_caption))
        return f"A picture of: {next_caption}"


@dataclass
class FakeResult:
    image: Image.Image
    prompt_truncated: bool = False


class FakeIllustrator:
    """Each image is one flat colour derived from its description and seed, so frames are traceable."""

    def __init__(self, fail_at_call: int | None = None) -> None:
        self.calls: list[dict] = []
        self.fail_at_call = fail_at_call

    def generate(
        self,
        description,
        context_images=(),
        context_descriptions=(),
        seed=0,
        init_image=None,
        strength=None,
        on_step=None,
    ):
        if self.fail_at_call is not None and len(self.calls) == self.fail_at_call:
            raise RuntimeError("simulated crash")
        self.calls.append({
            "description": description,
            "context": [image.getpixel((0, 0)) for image in context_images],
            "context_descriptions": list(context_descriptions),
            "init": init_image.getpixel((0, 0)) if init_image is not None else None,
            "strength": strength,
        })  # fmt: skip
        return FakeResult(Image.new("RGB", (16, 16), colour_of(f"{description}|{seed}")))


SEED_IMAGE = Image.new("RGB", (16, 16), (9, 9, 9))


def tell(folder, frames=6, captioner=None, illustrator=None, seed=0, **story):
    teller = StoryTeller(
        captioner or FakeCaptioner(),
        illustrator or FakeIllustrator(),
        StoryConfig(frames=frames, seed=seed, **story),
        context_frames=3,
    )
    return teller.tell(folder, SEED_IMAGE, "We went to the fair.")


def pixels(folder, story):
    return [Image.open(folder / frame.image).getpixel((0, 0)) for frame in story.frames]


def test_each_frame_gets_the_previous_three_frames_in_order_with_their_descriptions(tmp_path):
    illustrator = FakeIllustrator()
    story = tell(tmp_path, frames=6, illustrator=illustrator)
    colours = pixels(tmp_path, story)
    assert len(illustrator.calls) == 5
    for k, call in enumerate(illustrator.calls, start=1):
        window = range(max(0, k - 3), k)
        assert call["context"] == [colours[i] for i in window]
        assert call["context_descriptions"] == [story.frames[i].description for i in window]
        assert call["description"] == story.frames[k].description


def test_captioners_see_the_previous_frame_and_captions(tmp_path):
    captioner = FakeCaptioner()
    story = tell(tmp_path, frames=4, captioner=captioner)
    colours = pixels(tmp_path, story)
    # The seed description comes from the description captioner, given the seed image and caption.
    assert captioner.describe_calls[0] == (colours[0], "We went to the fair.", "We went to the fair.")
    for k in range(1, 4):
        assert captioner.story_calls[k - 1][:2] == (colours[k - 1], story.frames[k - 1].story_caption)
        assert captioner.describe_calls[k] == (
            colours[k - 1],
            story.frames[k - 1].story_caption,
            story.frames[k].story_caption,
        )
    assert [f.source for f in story.frames] == ["seed", "generated", "generated", "generated"]


def test_same_seed_same_story_and_another_seed_another(tmp_path):
    first, second, other = (tell(tmp_path / name, seed=seed) for name, seed in (("a", 1), ("b", 1), ("c", 2)))
    assert first.to_json()["frames"] == second.to_json()["frames"]
    assert pixels(tmp_path / "a", first) == pixels(tmp_path / "b", second)
    assert [f.story_caption for f in first.frames] != [f.story_caption for f in other.frames]


def test_the_repetition_guard_resamples_near_repeats(tmp_path):
    captioner = FakeCaptioner(scripted=["The crowd was getting excited.", "The crowd was getting more excited.",
                                        "The crowd was getting excited!", "They all went home."])  # fmt: skip
    story = tell(tmp_path, frames=3, captioner=captioner, repetition_retries=3, repetition_threshold=0.7)
    assert story.frames[1].story_caption == "The crowd was getting excited."
    assert story.frames[2].story_caption == "They all went home."
    assert story.metadata["repetition_resamples"] == {"1": 0, "2": 2}
    seeds = [seed for _, _, seed in captioner.story_calls]
    assert seeds[1:] == [frame_seed(0, 2, attempt) for attempt in range(3)]  # a new seed per resample


def test_similarity_rules():
    assert (
        similarity("The crowd was getting excited", "the crowd was getting more excited", "token_overlap")
        > 0.8
    )
    assert similarity("The crowd was excited", "We went home", "token_overlap") == 0
    assert similarity("abcd", "abce", "char_ratio") == pytest.approx(0.75)


def test_resume_after_a_crash_gives_the_uninterrupted_story(tmp_path):
    straight = tell(tmp_path / "straight", frames=6)
    with pytest.raises(RuntimeError, match="simulated crash"):
        tell(tmp_path / "crashed", frames=6, illustrator=FakeIllustrator(fail_at_call=3))
    saved = Story.load(tmp_path / "crashed")
    assert len(saved.frames) == 4  # frames 0..3 were complete when frame 4 crashed
    teller = StoryTeller(FakeCaptioner(), FakeIllustrator(), StoryConfig(frames=6), context_frames=3)
    resumed = teller.continue_story(tmp_path / "crashed", StoryTeller.complete_frames(tmp_path / "crashed"))
    assert resumed.to_json()["frames"] == straight.to_json()["frames"]
    assert pixels(tmp_path / "crashed", resumed) == pixels(tmp_path / "straight", straight)


def test_resume_drops_a_frame_whose_image_is_missing(tmp_path):
    tell(tmp_path, frames=4)
    (tmp_path / "frames" / "frame_03.png").unlink()
    assert len(StoryTeller.complete_frames(tmp_path).frames) == 3


def test_edit_keeps_history_and_regenerates_from_the_current_frame(tmp_path):
    story = tell(tmp_path, frames=5)
    before = pixels(tmp_path, story)
    illustrator = FakeIllustrator()
    teller = StoryTeller(FakeCaptioner(), illustrator, StoryConfig(frames=5), context_frames=3)
    edited = teller.edit(tmp_path, 2, "She rode the carousel.", strength=0.5, propagate=False)

    assert edited.frames[2].story_caption == "She rode the carousel." and edited.frames[2].source == "edited"
    assert edited.frames[2].description == "A picture of: She rode the carousel."
    assert illustrator.calls[0]["init"] == before[2] and illustrator.calls[0]["strength"] == 0.5
    assert illustrator.calls[0]["context"] == before[:2]
    after = pixels(tmp_path, edited)
    assert after[:2] == before[:2] and after[3:] == before[3:] and after[2] != before[2]
    history = sorted((tmp_path / "history").iterdir())
    assert [h.name for h in history] == ["001-edit-frame-02"]
    assert Image.open(history[0] / "frames" / "frame_02.png").getpixel((0, 0)) == before[2]
    assert (
        json.loads((history[0] / "story.json").read_text())["frames"][2]["story_caption"]
        == story.frames[2].story_caption
    )


def test_edit_with_propagate_regenerates_the_later_frames(tmp_path):
    story = tell(tmp_path, frames=5)
    teller = StoryTeller(FakeCaptioner(), FakeIllustrator(), StoryConfig(frames=5), context_frames=3)
    edited = teller.edit(tmp_path, 1, "It started to rain.", strength=1.0, propagate=True)
    assert len(edited.frames) == 5
    assert [f.source for f in edited.frames] == ["seed", "edited", "generated", "generated", "generated"]
    assert edited.frames[2].story_caption != story.frames[2].story_caption  # follows the edited caption
    history = next((tmp_path / "history").iterdir())
    assert sorted(p.name for p in (history / "frames").iterdir()) == [f"frame_0{i}.png" for i in range(1, 5)]


def test_insert_renumbers_and_keeps_history(tmp_path):
    story = tell(tmp_path, frames=4)
    before = pixels(tmp_path, story)
    illustrator = FakeIllustrator()
    teller = StoryTeller(FakeCaptioner(), illustrator, StoryConfig(frames=4), context_frames=3)
    inserted = teller.insert(tmp_path, 1, "Suddenly a clown appeared.")

    assert [f.index for f in inserted.frames] == [0, 1, 2, 3, 4]
    assert [f.image for f in inserted.frames] == [f"frames/frame_0{i}.png" for i in range(5)]
    assert (
        inserted.frames[2].story_caption == "Suddenly a clown appeared."
        and inserted.frames[2].source == "inserted"
    )
    after = pixels(tmp_path, inserted)
    assert after[:2] == before[:2] and after[3:] == before[2:]  # later frames moved up one place
    assert illustrator.calls[0]["context"] == before[:2]  # conditioned on frames <= 1
    assert sorted(p.name for p in (tmp_path / "frames").iterdir()) == [f"frame_0{i}.png" for i in range(5)]
    assert Story.load(tmp_path) == inserted
    assert (tmp_path / "history" / "001-insert-after-01" / "story.json").is_file()
    html = (tmp_path / "storyboard.html").read_text()
    assert (
        all(f'href="frames/frame_0{i}.png"' in html for i in range(5))
        and "Suddenly a clown appeared." in html
    )


def test_edit_and_insert_reject_bad_positions_and_empty_captions(tmp_path):
    tell(tmp_path, frames=3)
    teller = StoryTeller(FakeCaptioner(), FakeIllustrator(), StoryConfig(frames=3), context_frames=3)
    with pytest.raises(StorypipeError, match="--frame 5 is out of range"):
        teller.edit(tmp_path, 5, "x", strength=0.5, propagate=False)
    with pytest.raises(StorypipeError, match="caption is empty"):
        teller.insert(tmp_path, 0, "  ")
    assert not (tmp_path / "history").exists()  # nothing was changed
