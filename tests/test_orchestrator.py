"""The story loop with fake captioners and a fake generator: what each stage receives, determinism,
the repetition guard, continuing a story cut short, editing and insertion, and the story folder."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from pipeline.config import StoryConfig
from pipeline.errors import DataError, InputError
from pipeline.orchestrator import StoryEvents, StoryStart, StoryTeller, similarity
from pipeline.seeds import derive_seed
from pipeline.story import Story
from pipeline.story_folder import load_story, open_for_writing
from tests.fakes import FakeCaptioner, FakeIllustrator

SEED_IMAGE = Image.new("RGB", (16, 16), (9, 9, 9))


def teller(captioner=None, illustrator=None, frames=6, **story) -> StoryTeller:
    return StoryTeller(
        captioner or FakeCaptioner(), illustrator or FakeIllustrator(), StoryConfig(frames=frames, **story), 3
    )


def tell(frames=6, captioner=None, illustrator=None, seed=0, on_frame=None, **story) -> Story:
    return teller(captioner, illustrator, frames, **story).tell(
        SEED_IMAGE, "We went to the fair.", seed=seed, on_frame=on_frame
    )


def pixels(story: Story) -> list[tuple]:
    return [frame.image.getpixel((0, 0)) for frame in story.frames]


def test_each_frame_gets_the_previous_three_frames_in_order_with_their_descriptions():
    illustrator = FakeIllustrator()
    story = tell(frames=6, illustrator=illustrator)
    colours = pixels(story)
    assert len(illustrator.calls) == 5
    for k, call in enumerate(illustrator.calls, start=1):
        window = range(max(0, k - 3), k)
        assert call["context"] == [colours[i] for i in window]
        assert call["context_descriptions"] == [story.frames[i].description for i in window]
        assert call["description"] == story.frames[k].description


def test_captioners_see_the_previous_frame_and_captions():
    captioner = FakeCaptioner()
    story = tell(frames=4, captioner=captioner)
    colours = pixels(story)
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


def test_on_frame_streams_each_frame_as_it_is_finished():
    seen = []
    story = tell(
        frames=4, on_frame=lambda frame: seen.append((frame.index, frame.story_caption, frame.image))
    )
    assert [index for index, _, _ in seen] == [0, 1, 2, 3]
    assert [(caption, image) for _, caption, image in seen] == [
        (f.story_caption, f.image) for f in story.frames
    ]


def test_same_seed_same_story_and_another_seed_another():
    first, second, other = tell(seed=1), tell(seed=1), tell(seed=2)
    assert first.to_json()["frames"] == second.to_json()["frames"] and pixels(first) == pixels(second)
    assert [f.story_caption for f in first.frames] != [f.story_caption for f in other.frames]


def test_the_repetition_guard_resamples_near_repeats():
    captioner = FakeCaptioner(scripted=["The crowd was getting excited.", "The crowd was getting more excited.",
                                        "The crowd was getting excited!", "They all went home."])  # fmt: skip
    story = tell(frames=3, captioner=captioner, repetition_retries=3, repetition_threshold=0.7)
    assert story.frames[1].story_caption == "The crowd was getting excited."
    assert story.frames[2].story_caption == "They all went home."
    assert story.metadata["repetition_resamples"] == {"1": 0, "2": 2}
    seeds = [seed for _, _, seed in captioner.story_calls]
    # a new seed per resample; the resamples are drawn in one batch, after the first sample repeated
    assert seeds[1:] == [derive_seed(0, "caption", 2, attempt) for attempt in range(4)]
    assert [size for task, size in captioner.batches if task == "story"] == [1, 1, 3]


def test_similarity_rules():
    assert (
        similarity("The crowd was getting excited", "the crowd was getting more excited", "token_overlap")
        > 0.8
    )
    assert similarity("The crowd was excited", "We went home", "token_overlap") == 0
    assert similarity("abcd", "abce", "char_ratio") == pytest.approx(0.75)


def test_a_story_cut_short_continues_into_the_uninterrupted_story(tmp_path):
    straight = tell(frames=6)
    # Tell into a folder frame by frame, as the app layer does, until frame 4 crashes.
    crashed = teller(illustrator=FakeIllustrator(fail_at_call=3), frames=6)
    story = crashed.begin(SEED_IMAGE, "We went to the fair.")
    with pytest.raises(RuntimeError, match="simulated crash"), open_for_writing(tmp_path) as writer:
        writer.start(story)
        crashed.continue_story(story, on_frame=lambda frame: writer.append(story))
    saved = load_story(tmp_path, complete_only=True)
    assert len(saved.frames) == 4  # frames 0..3 were complete when frame 4 crashed

    resumed = teller(frames=6).continue_story(saved)
    assert resumed.to_json()["frames"] == straight.to_json()["frames"] and pixels(resumed) == pixels(straight)


def test_continuing_stops_before_a_frame_whose_image_is_missing(tmp_path):
    tell(frames=4).save(tmp_path)
    (tmp_path / "frames" / "frame_03.png").unlink()
    assert len(load_story(tmp_path, complete_only=True).frames) == 3
    with pytest.raises(DataError, match="frame 3.*is missing"):
        load_story(tmp_path)


def test_edit_regenerates_one_frame_and_leaves_the_story_given_unchanged():
    story = tell(frames=5)
    before = pixels(story)
    illustrator = FakeIllustrator()
    edited = teller(illustrator=illustrator, frames=5).edit(story, 2, "She rode the carousel.", strength=0.5)

    assert edited.frames[2].story_caption == "She rode the carousel." and edited.frames[2].source == "edited"
    assert edited.frames[2].description == "A picture of: She rode the carousel."
    assert illustrator.calls[0]["init"] == before[2] and illustrator.calls[0]["strength"] == 0.5
    assert illustrator.calls[0]["context"] == before[:2]
    after = pixels(edited)
    assert after[:2] == before[:2] and after[3:] == before[3:] and after[2] != before[2]
    assert pixels(story) == before and story.frames[2].source == "generated"  # the original is untouched
    assert edited.metadata["changes"] == [
        {
            "change": "edit",
            "frame": 2,
            "caption": "She rode the carousel.",
            "strength": 0.5,
            "propagate": False,
        }
    ]


def test_saving_an_edit_over_its_folder_keeps_the_replaced_frame_in_history(tmp_path):
    story = tell(frames=5)
    story.save(tmp_path)
    edited = teller(frames=5).edit(story, 2, "She rode the carousel.", strength=0.5)
    edited.save(tmp_path)

    history = sorted((tmp_path / "history").iterdir())
    assert [h.name for h in history] == ["001-edit-frame-02"]
    assert sorted(p.name for p in (history[0] / "frames").iterdir()) == ["frame_02.png"]
    assert Image.open(history[0] / "frames" / "frame_02.png").getpixel((0, 0)) == pixels(story)[2]
    old = json.loads((history[0] / "story.json").read_text())
    assert old["frames"][2]["story_caption"] == story.frames[2].story_caption
    assert Story.load(tmp_path) == edited
    edited.save(tmp_path)  # saving the same story again records nothing new
    assert len(list((tmp_path / "history").iterdir())) == 1


def test_edit_with_propagate_regenerates_the_later_frames(tmp_path):
    story = tell(frames=5)
    story.save(tmp_path)
    edited = teller(frames=5).edit(story, 1, "It started to rain.", strength=1.0, propagate=True)
    assert len(edited.frames) == 5
    assert [f.source for f in edited.frames] == ["seed", "edited", "generated", "generated", "generated"]
    assert edited.frames[2].story_caption != story.frames[2].story_caption  # follows the edited caption
    edited.save(tmp_path)
    history = next((tmp_path / "history").iterdir())
    assert sorted(p.name for p in (history / "frames").iterdir()) == [f"frame_0{i}.png" for i in range(1, 5)]


def test_insert_renumbers_and_its_folder_keeps_history(tmp_path):
    story = tell(frames=4)
    story.save(tmp_path)
    before = pixels(story)
    illustrator = FakeIllustrator()
    inserted = teller(illustrator=illustrator, frames=4).insert(story, 1, "Suddenly a clown appeared.")

    assert [f.index for f in inserted.frames] == [0, 1, 2, 3, 4] and len(story.frames) == 4
    assert (
        inserted.frames[2].story_caption == "Suddenly a clown appeared."
        and inserted.frames[2].source == "inserted"
    )
    after = pixels(inserted)
    assert after[:2] == before[:2] and after[3:] == before[2:]  # later frames moved up one place
    assert illustrator.calls[0]["context"] == before[:2]  # conditioned on frames <= 1

    inserted.save(tmp_path)
    assert sorted(p.name for p in (tmp_path / "frames").iterdir()) == [f"frame_0{i}.png" for i in range(5)]
    assert Story.load(tmp_path) == inserted
    snapshot = tmp_path / "history" / "001-insert-after-01"
    assert (snapshot / "story.json").is_file() and not list(
        (snapshot / "frames").iterdir()
    )  # no frame was lost
    html = (tmp_path / "storyboard.html").read_text()
    assert (
        all(f'href="frames/frame_0{i}.png"' in html for i in range(5))
        and "Suddenly a clown appeared." in html
    )


def test_edit_and_insert_reject_bad_positions_and_empty_captions():
    story = tell(frames=3)
    fake = teller(frames=3)
    with pytest.raises(InputError, match="frame 5 is out of range: the story has frames 0..2"):
        fake.edit(story, 5, "x", strength=0.5)
    with pytest.raises(InputError, match="strength must be in"):
        fake.edit(story, 1, "x", strength=1.5)
    with pytest.raises(InputError, match="caption is empty"):
        fake.insert(story, 0, "  ")
    with pytest.raises(InputError, match="after -1 is out of range"):
        fake.insert(story, -1, "x")
    assert fake.illustrator.calls == []  # nothing ran


def test_frames_are_numbered_from_zero_everywhere(tmp_path):
    """One numbering: the seed is frame 0 in story.json, the file names, both storyboards and `frame=`."""
    story = tell(frames=3)
    story.save(tmp_path)
    data = json.loads((tmp_path / "story.json").read_text())
    assert [f["index"] for f in data["frames"]] == [0, 1, 2]
    assert [f["image"] for f in data["frames"]] == [f"frames/frame_0{i}.png" for i in range(3)]
    html = (tmp_path / "storyboard.html").read_text()
    assert [html.count(f'<span class="index">{i}</span>') for i in range(4)] == [1, 1, 1, 0]
    edited = teller(frames=3).edit(story, 1, "Then it rained.", strength=0.5)
    assert edited.frames[1].story_caption == "Then it rained." and edited.frames[1].index == 1


# --------------------------------------------------------------------------------------------
# Several stories together
# --------------------------------------------------------------------------------------------

CAPTIONS = ["We went to the fair.", "Bruno lost his hat.", "It rained all day.", "Gala found a shell."]


class FewWordsCaptioner(FakeCaptioner):
    """Captions drawn by seed from a few sentences, so they often repeat and the guard resamples."""

    SENTENCES = ("The fair was fun.", "The fair was fun!", "A dog barked.", "", "We ate cake at the fair.")

    def next_story_captions(self, images, captions, seeds=None):
        super().next_story_captions(images, captions, seeds)
        return [self.SENTENCES[seed % len(self.SENTENCES)] for seed in seeds]


def sequential_caption(captioner, story, index, seed, cfg, notes) -> tuple[str, int]:
    """The repetition guard as it drew its resamples before batching: one at a time, until one does not
    repeat (the reference the batched guard must match)."""
    earlier = [frame.story_caption for frame in story.frames]
    previous = story.frames[-1]
    for attempt in range(cfg.repetition_retries + 1):
        caption = captioner.next_story_caption(
            previous.image, previous.story_caption, seed=derive_seed(seed, "caption", index, attempt)
        )
        repeated = max((similarity(caption, other, cfg.repetition_rule) for other in earlier), default=0.0)
        if repeated < cfg.repetition_threshold or not caption.strip():
            break
        if attempt == cfg.repetition_retries:
            notes.append(
                f"frame {index}: the story caption still nearly repeats an earlier one after {attempt} resamples"
            )
    return caption, attempt


@pytest.mark.parametrize("retries", [0, 1, 3])
def test_the_batched_repetition_guard_chooses_what_the_sequential_loop_chose(retries):
    cfg = StoryConfig(frames=5, repetition_retries=retries, repetition_threshold=0.6)
    notes, expected_notes = [], []
    events = StoryEvents(on_note=notes.append)
    told = StoryTeller(FewWordsCaptioner(), FakeIllustrator(), cfg, 3, events)
    starts = [StoryStart(SEED_IMAGE, caption, seed=seed) for seed, caption in enumerate(CAPTIONS)]
    stories = told.continue_stories(told.begin_stories(starts))

    reference = FewWordsCaptioner()
    for seed, story in enumerate(stories):
        partial = Story(story.frames[:1], {})
        for index in range(1, 5):
            caption, attempt = sequential_caption(reference, partial, index, seed, cfg, expected_notes)
            assert story.frames[index].story_caption == (caption.strip() or partial.frames[-1].story_caption)
            assert story.metadata["repetition_resamples"][str(index)] == attempt
            partial.frames.append(story.frames[index])
    assert sorted(notes) == sorted(expected_notes)
    # The case is not trivial: the guard resampled, and some frame ran out of resamples (a note).
    resamples = sum(sum(story.metadata["repetition_resamples"].values()) for story in stories)
    assert notes and (resamples > 0 or retries == 0)


def test_stories_told_together_equal_each_story_told_alone_and_share_each_call():
    captioner, illustrator = FakeCaptioner(), FakeIllustrator()
    together = teller(captioner, illustrator, frames=4)
    starts = [StoryStart(SEED_IMAGE, caption, frames=4, seed=seed) for seed, caption in enumerate(CAPTIONS)]
    seen = []
    stories = together.continue_stories(
        together.begin_stories(starts), lambda position, frame: seen.append((position, frame.index))
    )
    for seed, (story, caption) in enumerate(zip(stories, CAPTIONS, strict=True)):
        alone = teller(frames=4).tell(SEED_IMAGE, caption, seed=seed)
        assert story.to_json()["frames"] == alone.to_json()["frames"] and pixels(story) == pixels(alone)
        assert story.metadata["repetition_resamples"] == alone.metadata["repetition_resamples"]
    # One batched call per model and frame: the seed descriptions, then frames 1..3 of the four stories.
    assert captioner.batches == [("description", 4)] + [("story", 4), ("description", 4)] * 3
    assert illustrator.batches == [4, 4, 4]
    assert seen == [(position, index) for index in (1, 2, 3) for position in range(4)]


def test_a_story_that_is_behind_catches_up_before_it_joins_the_batch():
    starts = [
        StoryStart(SEED_IMAGE, caption, frames=5, seed=seed) for seed, caption in enumerate(CAPTIONS[:3])
    ]
    alone = [teller(frames=5).tell(SEED_IMAGE, s.caption, frames=5, seed=s.seed) for s in starts]
    ahead = [Story(story.frames[:3], dict(story.metadata)) for story in alone[:2]]  # frames 0..2 done
    behind = Story(alone[2].frames[:1], dict(alone[2].metadata))  # only its seed frame
    illustrator = FakeIllustrator()  # refuses a batch whose requests read different numbers of frames
    stories = teller(illustrator=illustrator, frames=5).continue_stories([*ahead, behind])
    assert illustrator.batches == [1, 1, 3, 3]  # frames 1 and 2 of the story behind, then all three
    for story, expected in zip(stories, alone, strict=True):
        assert story.to_json()["frames"] == expected.to_json()["frames"] and pixels(story) == pixels(expected)
