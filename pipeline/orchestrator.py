"""The autoregressive story loop: seed -> story caption -> description -> image, frame by frame, in memory.

Written against two small interfaces, so it runs the same with the real models, the tiny ones, or test
fakes. For k = 1 .. n-1:

1. story caption k  <- captioner.next_story_captions(image k-1, caption k-1)   (repetition guard below)
2. description k    <- captioner.describe_batch(image k-1, caption k-1, caption k)
3. image k          <- illustrator.generate_batch(description k, frames max(0, k-K) .. k-1 with their descriptions)

Several stories advance together (:meth:`StoryTeller.continue_stories`): the stories at the same frame
count make one batch, so frame k of B stories is one batched call of each model; one story is a batch of
one. Every row of a batch draws from its own seed, so a story is the same whichever stories share its
batches (up to floating-point batching noise in the images).

Every random choice is seeded by :func:`pipeline.seeds.derive_seed` from the story seed, what is drawn
and the frame, so the same seed gives the same story, and continuing a story cut short gives the frames
an uninterrupted run would have. ``on_frame(frame)`` is called as each frame is finished: a UI streams
frames from it, and the app layer saves each one, so a crash loses at most the frame in progress.
"""

from __future__ import annotations

import difflib
import re
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from PIL import Image

from pipeline.config import StoryConfig
from pipeline.errors import InputError
from pipeline.seeds import derive_seed
from pipeline.story import MAX_FRAMES, MAX_SEED, MIN_FRAMES, Frame, Story, is_valid_seed


class StoryCaptioner(Protocol):
    """Row ``i`` of a batched call is sampled with ``seeds[i]``: its answer does not depend on the other rows."""

    def next_story_caption(self, image: Image.Image, caption: str, seed: int | None = None) -> str: ...

    def next_story_captions(
        self,
        images: Sequence[Image.Image],
        captions: Sequence[str],
        seeds: Sequence[int | None] | None = None,
    ) -> list[str]: ...

    def describe(
        self, image: Image.Image, current_caption: str, next_caption: str, seed: int | None = None
    ) -> str: ...

    def describe_batch(
        self,
        images: Sequence[Image.Image],
        current_captions: Sequence[str],
        next_captions: Sequence[str],
        seeds: Sequence[int | None] | None = None,
    ) -> list[str]: ...


class GeneratedImage(Protocol):
    image: Image.Image
    prompt_truncated: bool


@dataclass(frozen=True)
class FrameRequest:
    """One frame to draw: its description and the previous <= K frames (oldest first) it reads."""

    description: str
    context_images: Sequence[Image.Image] = ()
    context_descriptions: Sequence[str] = ()
    seed: int = 0


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

    def generate_batch(
        self, requests: Sequence[FrameRequest], on_step: Callable[[int, int], None] | None = None
    ) -> list[GeneratedImage]:
        """Several frames at once, each as ``generate`` would draw it from the same request (up to
        floating-point batching noise); every request reads the same number of previous frames."""
        ...


FrameCallback = Callable[[Frame], None]
StoryFrameCallback = Callable[[int, Frame], None]  # (the story's position in the list given, its new frame)


@dataclass(frozen=True)
class StoryStart:
    """A story's seed frame and settings, as :meth:`StoryTeller.begin` takes them (None: the config's)."""

    image: Image.Image
    caption: str
    description: str | None = None
    frames: int | None = None
    seed: int | None = None


@dataclass
class StoryEvents:
    """Callbacks for a progress display; every one is optional."""

    on_stage: Callable[[int, int, str], None] | None = None  # (frame index, frames in total, what)
    on_step: Callable[[int, int], None] | None = None  # denoising step, steps
    on_note: Callable[[str], None] | None = None  # a warning or remark for the user


def similarity(a: str, b: str, rule: str) -> float:
    """``token_overlap``: Jaccard overlap of lower-cased words; ``char_ratio``: difflib's ratio."""
    if rule == "char_ratio":
        return difflib.SequenceMatcher(None, a.lower(), b.lower()).ratio()
    words_a, words_b = set(re.findall(r"[a-z0-9']+", a.lower())), set(re.findall(r"[a-z0-9']+", b.lower()))
    return len(words_a & words_b) / max(1, len(words_a | words_b))


# Characters that show nothing although Unicode does not class them as format characters or spaces.
INVISIBLE_LETTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")  # Hangul fillers, the Braille blank
ALLOWED_CONTROLS = frozenset("\n\t")


def check_caption(caption: object, what: str = "caption") -> str:
    """The caption without surrounding whitespace; an :class:`InputError` when it is not a string, shows
    nothing (only spaces, zero-width or direction marks...), or holds a control character (an escape
    sequence for the terminal, a NUL) or half of a surrogate pair (bytes that were not UTF-8)."""
    if not isinstance(caption, str):
        raise InputError(f"the {what} must be a string, got {type(caption).__name__}")
    for position, character in enumerate(caption):
        category = unicodedata.category(character)
        if (category == "Cc" and character not in ALLOWED_CONTROLS) or category == "Cs":
            raise InputError(
                f"the {what} holds the control character U+{ord(character):04X} at position {position}; "
                "remove it"
            )
    if not any(_is_visible(character) for character in caption):
        raise InputError(
            f"the {what} is empty" + (" (it holds only invisible characters)" if caption else "")
        )
    return caption.strip()


def _is_visible(character: str) -> bool:
    category = unicodedata.category(character)
    return not (character.isspace() or category in ("Cc", "Cf", "Cn", "Co", "Zs", "Zl", "Zp")
                or character in INVISIBLE_LETTERS)  # fmt: skip


def check_seed(seed: object) -> int:
    """A story seed: an integer in 0..MAX_SEED (every seed drawn in the story derives from it)."""
    if not is_valid_seed(seed):
        raise InputError(f"seed must be an integer in 0..{MAX_SEED}, got {seed!r}")
    return seed


def check_frame_count(frames: object) -> int:
    if isinstance(frames, bool) or not isinstance(frames, int) or not MIN_FRAMES <= frames <= MAX_FRAMES:
        raise InputError(f"frames must be in {MIN_FRAMES}..{MAX_FRAMES} (the seed included), got {frames!r}")
    return frames


def check_frame_number(number: object, story: Story, what: str) -> int:
    """A frame number of ``story`` (0 is the seed); ``what`` names it in the error (``frame``, ``after``)."""
    count = len(story.frames)
    if isinstance(number, bool) or not isinstance(number, int) or not 0 <= number < count:
        raise InputError(f"{what} {number!r} is out of range: the story has frames 0..{count - 1}")
    return number


class StoryTeller:
    def __init__(
        self,
        captioner: StoryCaptioner,
        illustrator: FrameIllustrator,
        cfg: StoryConfig,
        context_frames: int,
        events: StoryEvents | None = None,
    ) -> None:
        self.captioner = captioner
        self.illustrator = illustrator
        self.cfg = cfg
        self.context_frames = context_frames  # K: how many previous frames the illustrator reads
        self.events = events or StoryEvents()

    # ----------------------------------------------------------------------------------------
    # Input checks: no model needed, so callers run them before loading any
    # ----------------------------------------------------------------------------------------

    @staticmethod
    def check_begin(
        cfg: StoryConfig, caption: str, description: str | None, frames: int | None, seed: int | None
    ) -> tuple[str, str | None, int, int]:
        """``(caption, description, frames, seed)`` checked, with ``cfg``'s defaults filled in."""
        caption = check_caption(caption)
        if description is not None:
            description = check_caption(description, "description")
        frames = check_frame_count(cfg.frames if frames is None else frames)
        seed = check_seed(cfg.seed if seed is None else seed)
        return caption, description, frames, seed

    @staticmethod
    def check_edit(story: Story, index: int, caption: str, strength: float) -> str:
        check_frame_number(index, story, "frame")
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
            raise InputError(f"strength must be in (0, 1], got {strength!r}")
        return check_caption(caption)

    @staticmethod
    def check_insert(story: Story, after: int, caption: str) -> str:
        check_frame_number(after, story, "after")
        if len(story.frames) >= MAX_FRAMES:
            raise InputError(f"the story already has {MAX_FRAMES} frames, the most storypipe makes")
        return check_caption(caption)

    # ----------------------------------------------------------------------------------------
    # New stories
    # ----------------------------------------------------------------------------------------

    def begin(
        self,
        seed_image: Image.Image,
        seed_caption: str,
        seed_description: str | None = None,
        frames: int | None = None,
        seed: int | None = None,
    ) -> Story:
        """A story of one frame, the seed (described by the description captioner unless given), that
        :meth:`continue_story` extends to ``frames`` frames (default ``story.frames``)."""
        return self.begin_stories([StoryStart(seed_image, seed_caption, seed_description, frames, seed)])[0]

    def begin_stories(self, starts: Sequence[StoryStart]) -> list[Story]:
        """:meth:`begin` for several stories; the seed frames without a description are described in one
        batched call."""
        checked = [
            self.check_begin(self.cfg, start.caption, start.description, start.frames, start.seed)
            for start in starts
        ]
        if not starts:
            return []
        started = time.perf_counter()
        images = [start.image.convert("RGB") for start in starts]
        undescribed = [i for i, (_, description, _, _) in enumerate(checked) if description is None]
        descriptions = [description for _, description, _, _ in checked]
        if undescribed:
            described = self.captioner.describe_batch(
                [images[i] for i in undescribed],
                [checked[i][0] for i in undescribed],
                [checked[i][0] for i in undescribed],
                seeds=[derive_seed(checked[i][3], "description", 0) for i in undescribed],
            )
            for i, description in zip(undescribed, described, strict=True):
                descriptions[i] = description
        share = (time.perf_counter() - started) / len(starts)  # each story's share of the batch
        return [
            Story(
                [Frame(0, caption, description, image, "seed")],
                {"seed": seed, "frames_requested": frames, "timings_s": {"0": {"description": share}}},
            )
            for (caption, _, frames, seed), description, image in zip(
                checked, descriptions, images, strict=True
            )
        ]

    def tell(
        self,
        seed_image: Image.Image,
        seed_caption: str,
        seed_description: str | None = None,
        frames: int | None = None,
        seed: int | None = None,
        on_frame: FrameCallback | None = None,
    ) -> Story:
        """The whole story from its seed frame."""
        story = self.begin(seed_image, seed_caption, seed_description, frames, seed)
        if on_frame is not None:
            on_frame(story.frames[0])
        return self.continue_story(story, on_frame)

    def continue_story(self, story: Story, on_frame: FrameCallback | None = None) -> Story:
        """Extend ``story`` (in place, and returned) with generated frames up to its ``frames_requested``."""
        announce = None if on_frame is None else lambda _position, frame: on_frame(frame)
        return self.continue_stories([story], announce)[0]

    def continue_stories(
        self, stories: Sequence[Story], on_frame: StoryFrameCallback | None = None
    ) -> list[Story]:
        """Extend every story (in place; the list is returned) up to its ``frames_requested``, together:
        each round, the stories with the fewest frames make the next frame in one batch, so stories that
        start level stay level and one that is behind (resumed) catches up before it joins them.
        ``on_frame(position, frame)`` is called as each frame is finished. Each story gets exactly the
        frames :meth:`continue_story` would give it alone: every draw is seeded by its own seed."""
        targets = [
            check_frame_count(story.metadata.get("frames_requested", self.cfg.frames)) for story in stories
        ]
        seeds = [check_seed(story.metadata.get("seed", self.cfg.seed)) for story in stories]
        while True:
            behind = [i for i, story in enumerate(stories) if len(story.frames) < targets[i]]
            if not behind:
                break
            fewest = min(len(stories[i].frames) for i in behind)
            batch = [i for i in behind if len(stories[i].frames) == fewest]
            frames = self._next_frames(
                [stories[i] for i in batch], [seeds[i] for i in batch], max(targets[i] for i in batch)
            )
            for i, frame in zip(batch, frames, strict=True):
                stories[i].frames.append(frame)
                if on_frame is not None:
                    on_frame(i, frame)
        if stories:
            self._stage(max(len(story.frames) for story in stories), max(targets), "done")
        return list(stories)

    # ----------------------------------------------------------------------------------------
    # Editing and insertion: each returns a new story and leaves the one given unchanged
    # ----------------------------------------------------------------------------------------

    def edit(
        self,
        story: Story,
        index: int,
        caption: str,
        strength: float,
        propagate: bool = False,
        on_frame: FrameCallback | None = None,
    ) -> Story:
        """Replace frame ``index``'s story caption, then regenerate its description and (img2img) image;
        with ``propagate``, regenerate every later frame from it."""
        caption = self.check_edit(story, index, caption, strength)
        edited = story.copy()
        seed = check_seed(edited.metadata.get("seed", self.cfg.seed))
        current = edited.frames[index]
        # The description reads the previous frame; the seed frame has none and is described from itself.
        if index > 0:
            read_image, read_caption = edited.frames[index - 1].image, edited.frames[index - 1].story_caption
        else:
            read_image, read_caption = current.image, caption
        description = self.captioner.describe(
            read_image, read_caption, caption, seed=derive_seed(seed, "description", index)
        )
        self._stage(index, len(edited.frames), "edit")
        image = self._illustrate(
            edited.frames[:index], description, derive_seed(seed, "edit", index), current.image, strength
        )
        edited.frames[index] = Frame(index, caption, description, image, "edited")
        edited.metadata.setdefault("changes", []).append(
            {
                "change": "edit",
                "frame": index,
                "caption": caption,
                "strength": strength,
                "propagate": propagate,
            }
        )
        if on_frame is not None:
            on_frame(edited.frames[index])
        if propagate:
            del edited.frames[index + 1 :]
            self.continue_story(edited, on_frame)
        return edited

    def insert(self, story: Story, after: int, caption: str, on_frame: FrameCallback | None = None) -> Story:
        """A new panel between frames ``after`` and ``after + 1``, conditioned on the frames up to ``after``;
        the later frames move up one place."""
        caption = self.check_insert(story, after, caption)
        seed = check_seed(story.metadata.get("seed", self.cfg.seed))
        previous = story.frames[after]
        description = self.captioner.describe(
            previous.image,
            previous.story_caption,
            caption,
            seed=derive_seed(seed, "insert-description", after),
        )
        self._stage(after + 1, len(story.frames) + 1, "insert")
        image = self._illustrate(story.frames[: after + 1], description, derive_seed(seed, "insert", after))

        inserted = story.copy()
        new = Frame(after + 1, caption, description, image, "inserted")
        frames = inserted.frames[: after + 1] + [new] + inserted.frames[after + 1 :]
        for position, frame in enumerate(frames):
            frame.index = position
        inserted.frames = frames
        inserted.metadata["frames_requested"] = len(frames)
        inserted.metadata.setdefault("changes", []).append(
            {"change": "insert", "after": after, "caption": caption}
        )
        if on_frame is not None:
            on_frame(new)
        return inserted

    # ----------------------------------------------------------------------------------------

    def _next_frames(self, stories: list[Story], seeds: list[int], target: int) -> list[Frame]:
        """The next frame of each story, all at the same frame count: one batched call per model (the
        repetition guard adds one more). Each story's timings are its share of each batched call."""
        index = len(stories[0].frames)
        previous = [story.frames[-1] for story in stories]
        images = [frame.image for frame in previous]
        captions = [frame.story_caption for frame in previous]
        timings: dict[str, float] = {}

        # 1. The next story captions, resampled (in one batch) where one nearly repeats an earlier one.
        self._stage(index, target, "story caption")
        started = time.perf_counter()
        chosen = self._story_captions(stories, seeds, index)
        new_captions = [caption.strip() or before for caption, before in zip(chosen, captions, strict=True)]
        timings["story_caption"] = time.perf_counter() - started

        # 2. The literal descriptions of the new frames.
        self._stage(index, target, "description")
        started = time.perf_counter()
        descriptions = self.captioner.describe_batch(
            images, captions, new_captions, seeds=[derive_seed(seed, "description", index) for seed in seeds]
        )
        timings["description"] = time.perf_counter() - started

        # 3. The images, each conditioned on its story's previous <= K frames.
        self._stage(index, target, "image")
        started = time.perf_counter()
        requests = [
            self._frame_request(story.frames, description, derive_seed(seed, "image", index))
            for story, description, seed in zip(stories, descriptions, seeds, strict=True)
        ]
        results = self.illustrator.generate_batch(requests, on_step=self.events.on_step)
        for result, request in zip(results, requests, strict=True):
            self._note_truncation(result, request.description)
        timings["image"] = time.perf_counter() - started

        share = {stage: seconds / len(stories) for stage, seconds in timings.items()}
        for story in stories:
            story.metadata.setdefault("timings_s", {})[str(index)] = dict(share)
        return [
            Frame(index, caption, description, result.image, "generated")
            for caption, description, result in zip(new_captions, descriptions, results, strict=True)
        ]

    def _story_captions(self, stories: list[Story], seeds: list[int], index: int) -> list[str]:
        """Each story's next caption: its first sample (attempt 0), unless that nearly repeats an earlier
        caption of its story; then attempts 1..``repetition_retries`` of every such story are drawn in one
        batch, and the first in attempt order that does not repeat is taken (the last if all do). An empty
        caption is taken as it is (the caller keeps the previous caption then). Each attempt has its own
        seed, so this gives what drawing the attempts one at a time until one does not repeat would."""
        images = [story.frames[-1].image for story in stories]
        captions = [story.frames[-1].story_caption for story in stories]
        chosen = self.captioner.next_story_captions(
            images, captions, seeds=[derive_seed(seed, "caption", index, 0) for seed in seeds]
        )
        attempts = [0] * len(stories)
        retries = range(1, self.cfg.repetition_retries + 1)
        repeating = [i for i, story in enumerate(stories) if self._repeats(chosen[i], story)]
        if repeating and retries:
            resampled = self.captioner.next_story_captions(
                [images[i] for i in repeating for _ in retries],
                [captions[i] for i in repeating for _ in retries],
                seeds=[
                    derive_seed(seeds[i], "caption", index, attempt) for i in repeating for attempt in retries
                ],
            )
            for row, i in enumerate(repeating):
                samples = resampled[row * len(retries) : (row + 1) * len(retries)]
                for attempt, caption in zip(retries, samples, strict=True):  # the first that does not repeat
                    attempts[i], chosen[i] = attempt, caption
                    if not self._repeats(caption, stories[i]):
                        break
        for i, story in enumerate(stories):
            story.metadata.setdefault("repetition_resamples", {})[str(index)] = attempts[i]
            if self._repeats(chosen[i], story):
                self._note(
                    f"frame {index}: the story caption still nearly repeats an earlier one after "
                    f"{attempts[i]} resamples"
                )
        return chosen

    def _repeats(self, caption: str, story: Story) -> bool:
        """Whether a non-empty ``caption`` nearly repeats one of ``story``'s captions (``repetition_threshold``)."""
        if not caption.strip():
            return False
        rule, threshold = self.cfg.repetition_rule, self.cfg.repetition_threshold
        return any(similarity(caption, frame.story_caption, rule) >= threshold for frame in story.frames)

    def _frame_request(self, before: list[Frame], description: str, seed: int) -> FrameRequest:
        """What the illustrator draws a frame from: its description and the previous <= K frames."""
        context = before[-self.context_frames :] if self.context_frames else []
        return FrameRequest(
            description,
            [frame.image for frame in context],
            [frame.description or frame.story_caption for frame in context],
            seed,
        )

    def _illustrate(
        self,
        before: list[Frame],
        description: str,
        seed: int,
        init: Image.Image | None = None,
        strength: float | None = None,
    ) -> Image.Image:
        request = self._frame_request(before, description, seed)
        result = self.illustrator.generate(
            request.description,
            request.context_images,
            request.context_descriptions,
            seed=request.seed,
            init_image=init,
            strength=strength,
            on_step=self.events.on_step,
        )
        self._note_truncation(result, description)
        return result.image

    def _note_truncation(self, result: GeneratedImage, description: str) -> None:
        if getattr(result, "prompt_truncated", False):
            self._note(
                f"the description was longer than the text encoder reads and was truncated: {description!r}"
            )

    def _stage(self, index: int, total: int, what: str) -> None:
        if self.events.on_stage is not None:
            self.events.on_stage(index, total, what)

    def _note(self, message: str) -> None:
        if self.events.on_note is not None:
            self.events.on_note(message)
