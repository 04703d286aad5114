"""The autoregressive story loop: seed -> story caption -> description -> image, frame by frame.

Written against two small interfaces, so it runs the same with the real models, the tiny ones, or test
fakes. For k = 1 .. n-1:

1. story caption k  <- captioner.next_story_caption(image k-1, caption k-1)   (repetition guard below)
2. description k    <- captioner.describe(image k-1, caption k-1, caption k)
3. image k          <- illustrator.generate(description k, frames max(0, k-K) .. k-1 with their descriptions)

Every random choice is seeded from (story seed, frame, attempt), so the same seed gives the same story,
and resuming after a crash gives the story an uninterrupted run would have. After each frame the image
and ``story.json`` are written atomically: a crash loses at most the frame in progress.
"""

from __future__ import annotations

import difflib
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from PIL import Image

from pipeline.config import MAX_FRAMES, StoryConfig
from pipeline.errors import StorypipeError
from pipeline.story import Frame, Story
from pipeline.story_folder import (
    load_frame_image,
    renumber_frames,
    save_frame_image,
    save_staged_image,
    snapshot,
    write_storyboard,
)


class StoryCaptioner(Protocol):
    def next_story_caption(self, image: Image.Image, caption: str, seed: int | None = None) -> str: ...

    def describe(
        self, image: Image.Image, current_caption: str, next_caption: str, seed: int | None = None
    ) -> str: ...


class GeneratedImage(Protocol):
    image: Image.Image
    prompt_truncated: bool


class FrameIllustrator(Protocol):
    max_references: int  # K: the most previous frames it reads

    def generate(
        self,
        description: str,
        context_images: Sequence[Image.Image] = (),
        context_descriptions: Sequence[str] = (),
        seed: int = 0,
        init_image: Image.Image | None = None,
        strength: float | None = None,
        on_step: Callable[[int, int], None] | None = None,
    ) -> GeneratedImage: ...


@dataclass
class Progress:
    """Callbacks for a progress display; every one is optional."""

    on_frame: Callable[[int, int, str], None] | None = None  # (frame index, frames in total, what)
    on_step: Callable[[int, int], None] | None = None  # denoising step, steps
    on_note: Callable[[str], None] | None = None  # a warning or remark for the user


def frame_seed(story_seed: int, frame: int, attempt: int = 0) -> int:
    """Seed of one sampling call: depends only on the story seed, the frame and the attempt."""
    return story_seed * 100_003 + frame * 101 + attempt


def similarity(a: str, b: str, rule: str) -> float:
    """``token_overlap``: Jaccard overlap of lower-cased words; ``char_ratio``: difflib's ratio."""
    if rule == "char_ratio":
        return difflib.SequenceMatcher(None, a.lower(), b.lower()).ratio()
    words_a, words_b = set(re.findall(r"[a-z0-9']+", a.lower())), set(re.findall(r"[a-z0-9']+", b.lower()))
    return len(words_a & words_b) / max(1, len(words_a | words_b))


class StoryTeller:
    def __init__(
        self,
        captioner: StoryCaptioner,
        illustrator: FrameIllustrator,
        cfg: StoryConfig,
        context_frames: int,
        progress: Progress | None = None,
    ) -> None:
        self.captioner = captioner
        self.illustrator = illustrator
        self.cfg = cfg
        self.context_frames = context_frames  # K: how many previous frames the illustrator reads
        self.progress = progress or Progress()

    # ----------------------------------------------------------------------------------------
    # New stories and resuming
    # ----------------------------------------------------------------------------------------

    def tell(
        self, folder: Path, seed_image: Image.Image, seed_caption: str, seed_description: str | None = None
    ) -> Story:
        """Write frame 0 from the seed, then continue to ``cfg.frames`` frames."""
        started = time.perf_counter()
        seed_image = seed_image.convert("RGB")
        if seed_description is None:  # the description captioner, given the seed image and caption
            seed_description = self.captioner.describe(
                seed_image, seed_caption, seed_caption, seed=frame_seed(self.cfg.seed, 0)
            )
        frame = Frame(0, seed_caption, seed_description, save_frame_image(folder, 0, seed_image), "seed")
        metadata = {
            "seed": self.cfg.seed,
            "frames_requested": self.cfg.frames,
            "timings_s": {"0": {"description": time.perf_counter() - started}},
        }
        story = Story(frames=[frame], metadata=metadata)
        story.save(folder)
        return self.continue_story(folder, story)

    def continue_story(self, folder: Path, story: Story | None = None) -> Story:
        """Generate frames until ``frames_requested``; reads ``story.json`` when ``story`` is not given."""
        story = story or Story.load(folder)
        target = int(story.metadata.get("frames_requested", self.cfg.frames))
        seed = int(story.metadata.get("seed", self.cfg.seed))
        while len(story.frames) < target:
            self._append_generated_frame(folder, story, seed, target)
        self._note_progress(len(story.frames), target, "done")
        write_storyboard(folder, story)
        return story

    @staticmethod
    def complete_frames(folder: Path) -> Story:
        """The story as saved, without frames whose image is missing (a crash between the two writes)."""
        story = Story.load(folder)
        complete = []
        for frame in story.frames:
            if not (folder / frame.image).is_file():
                break
            complete.append(frame)
        story.frames = complete
        if not complete:
            raise StorypipeError(
                f"{folder}: the seed frame's image is missing; start a new story instead of resuming"
            )
        return story

    # ----------------------------------------------------------------------------------------
    # Editing and insertion
    # ----------------------------------------------------------------------------------------

    def edit(self, folder: Path, index: int, caption: str, strength: float, propagate: bool) -> Story:
        """Replace frame ``index``'s story caption, then regenerate its description and (img2img) image."""
        story = Story.load(folder)
        _check_index(index, len(story.frames), "--frame")
        _check_caption(caption)
        replaced = [f.image for f in story.frames[index:]] if propagate else [story.frames[index].image]
        snapshot(folder, f"edit-frame-{index:02d}", replaced)
        seed = int(story.metadata.get("seed", self.cfg.seed))
        target = len(story.frames)

        frame = story.frames[index]
        current = load_frame_image(folder, frame.image)
        if index == 0:
            description = self.captioner.describe(current, caption, caption, seed=frame_seed(seed, 0))
        else:
            previous = story.frames[index - 1]
            previous_image = load_frame_image(folder, previous.image)
            description = self.captioner.describe(
                previous_image, previous.story_caption, caption, seed=frame_seed(seed, index)
            )
        self._note_progress(index, target, "edit")
        image = self._illustrate(
            folder,
            story.frames[:index],
            description,
            frame_seed(seed, index, 1),
            init=current,
            strength=strength,
        )
        story.frames[index] = Frame(
            index, caption, description, save_frame_image(folder, index, image), "edited"
        )
        if propagate:
            del story.frames[index + 1 :]
            story.save(folder)
            return self.continue_story(folder, story)
        story.save(folder)
        write_storyboard(folder, story)
        return story

    def insert(self, folder: Path, after: int, caption: str) -> Story:
        """A new panel between ``after`` and ``after + 1``, conditioned on frames <= ``after``."""
        story = Story.load(folder)
        _check_index(after, len(story.frames), "--after")
        _check_caption(caption)
        if len(story.frames) >= MAX_FRAMES:
            raise StorypipeError(f"the story already has {MAX_FRAMES} frames, the most storypipe makes")
        snapshot(folder, f"insert-after-{after:02d}", [])
        seed = int(story.metadata.get("seed", self.cfg.seed))
        previous = story.frames[after]
        previous_image = load_frame_image(folder, previous.image)
        description = self.captioner.describe(
            previous_image, previous.story_caption, caption, seed=frame_seed(seed, after + 1, 7)
        )
        self._note_progress(after + 1, len(story.frames) + 1, "insert")
        image = self._illustrate(
            folder, story.frames[: after + 1], description, frame_seed(seed, after + 1, 7)
        )

        # Later frames move up one place; the new image waits under a staging name until renumbering.
        new = Frame(after + 1, caption, description, save_staged_image(folder, image), "inserted")
        frames = story.frames[: after + 1] + [new] + story.frames[after + 1 :]
        for position, frame in enumerate(frames):
            frame.index = position
        story.frames = frames
        renumber_frames(folder, story)
        story.metadata["frames_requested"] = len(frames)
        story.save(folder)
        write_storyboard(folder, story)
        return story

    # ----------------------------------------------------------------------------------------

    def _append_generated_frame(self, folder: Path, story: Story, seed: int, target: int) -> None:
        index = len(story.frames)
        previous = story.frames[-1]
        previous_image = load_frame_image(folder, previous.image)
        timings: dict[str, float] = {}

        # 1. The next story caption, resampled while it nearly repeats an earlier one.
        self._note_progress(index, target, "story caption")
        started = time.perf_counter()
        earlier = [frame.story_caption for frame in story.frames]
        for attempt in range(self.cfg.repetition_retries + 1):
            caption = self.captioner.next_story_caption(
                previous_image, previous.story_caption, seed=frame_seed(seed, index, attempt)
            )
            repeated = max(
                (similarity(caption, other, self.cfg.repetition_rule) for other in earlier), default=0.0
            )
            if repeated < self.cfg.repetition_threshold or not caption.strip():
                break
            if attempt == self.cfg.repetition_retries:
                self._note(
                    f"frame {index}: the story caption still nearly repeats an earlier one after {attempt} resamples"
                )
        story.metadata.setdefault("repetition_resamples", {})[str(index)] = attempt
        caption = caption.strip() or previous.story_caption
        timings["story_caption"] = time.perf_counter() - started

        # 2. The literal description of the new frame.
        self._note_progress(index, target, "description")
        started = time.perf_counter()
        description = self.captioner.describe(
            previous_image, previous.story_caption, caption, seed=frame_seed(seed, index)
        )
        timings["description"] = time.perf_counter() - started

        # 3. The image, conditioned on the previous <= K frames.
        self._note_progress(index, target, "image")
        started = time.perf_counter()
        image = self._illustrate(folder, story.frames, description, frame_seed(seed, index))
        timings["image"] = time.perf_counter() - started

        story.frames.append(
            Frame(index, caption, description, save_frame_image(folder, index, image), "generated")
        )
        story.metadata.setdefault("timings_s", {})[str(index)] = timings
        story.save(folder)

    def _illustrate(
        self, folder: Path, before: list[Frame], description: str, seed: int, init=None, strength=None
    ) -> Image.Image:
        context = before[-self.context_frames :] if self.context_frames else []
        result = self.illustrator.generate(
            description,
            [load_frame_image(folder, frame.image) for frame in context],
            [frame.description or frame.story_caption for frame in context],
            seed=seed,
            init_image=init,
            strength=strength,
            on_step=self.progress.on_step,
        )
        if getattr(result, "prompt_truncated", False):
            self._note(
                f"the description was longer than the text encoder reads and was truncated: {description!r}"
            )
        return result.image

    def _note_progress(self, index: int, total: int, what: str) -> None:
        if self.progress.on_frame is not None:
            self.progress.on_frame(index, total, what)

    def _note(self, message: str) -> None:
        if self.progress.on_note is not None:
            self.progress.on_note(message)


def _check_index(index: int, count: int, option: str) -> None:
    if not 0 <= index < count:
        raise StorypipeError(f"{option} {index} is out of range: the story has frames 0..{count - 1}")


def _check_caption(caption: str) -> None:
    if not caption or not caption.strip():
        raise StorypipeError("the caption is empty")
