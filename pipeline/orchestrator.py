"""The autoregressive story loop: seed -> story caption -> description -> image, frame by frame, in memory.

Written against two small interfaces, so it runs the same with the real models, the tiny ones, or test
fakes. For k = 1 .. n-1:

1. story caption k  <- captioner.next_story_caption(image k-1, caption k-1)   (repetition guard below)
2. description k    <- captioner.describe(image k-1, caption k-1, caption k)
3. image k          <- illustrator.generate(description k, frames max(0, k-K) .. k-1 with their descriptions)

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
    def next_story_caption(self, image: Image.Image, caption: str, seed: int | None = None) -> str: ...

    def describe(
        self, image: Image.Image, current_caption: str, next_caption: str, seed: int | None = None
    ) -> str: ...


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
        caption, seed_description, frames, seed = self.check_begin(
            self.cfg, seed_caption, seed_description, frames, seed
        )
        started = time.perf_counter()
        seed_image = seed_image.convert("RGB")
        if seed_description is None:
            seed_description = self.captioner.describe(
                seed_image, caption, caption, seed=derive_seed(seed, "description", 0)
            )
        metadata = {
            "seed": seed,
            "frames_requested": frames,
            "timings_s": {"0": {"description": time.perf_counter() - started}},
        }
        return Story([Frame(0, caption, seed_description, seed_image, "seed")], metadata)

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
        target = check_frame_count(story.metadata.get("frames_requested", self.cfg.frames))
        seed = check_seed(story.metadata.get("seed", self.cfg.seed))
        while len(story.frames) < target:
            frame = self._next_frame(story, seed, target)
            story.frames.append(frame)
            if on_frame is not None:
                on_frame(frame)
        self._stage(len(story.frames), target, "done")
        return story

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

    def _next_frame(self, story: Story, seed: int, target: int) -> Frame:
        index = len(story.frames)
        previous = story.frames[-1]
        timings: dict[str, float] = {}

        # 1. The next story caption, resampled while it nearly repeats an earlier one.
        self._stage(index, target, "story caption")
        started = time.perf_counter()
        earlier = [frame.story_caption for frame in story.frames]
        for attempt in range(self.cfg.repetition_retries + 1):
            caption = self.captioner.next_story_caption(
                previous.image, previous.story_caption, seed=derive_seed(seed, "caption", index, attempt)
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
        self._stage(index, target, "description")
        started = time.perf_counter()
        description = self.captioner.describe(
            previous.image, previous.story_caption, caption, seed=derive_seed(seed, "description", index)
        )
        timings["description"] = time.perf_counter() - started

        # 3. The image, conditioned on the previous <= K frames.
        self._stage(index, target, "image")
        started = time.perf_counter()
        image = self._illustrate(story.frames, description, derive_seed(seed, "image", index))
        timings["image"] = time.perf_counter() - started

        story.metadata.setdefault("timings_s", {})[str(index)] = timings
        return Frame(index, caption, description, image, "generated")

    def _illustrate(
        self,
        before: list[Frame],
        description: str,
        seed: int,
        init: Image.Image | None = None,
        strength: float | None = None,
    ) -> Image.Image:
        context = before[-self.context_frames :] if self.context_frames else []
        result = self.illustrator.generate(
            description,
            [frame.image for frame in context],
            [frame.description or frame.story_caption for frame in context],
            seed=seed,
            init_image=init,
            strength=strength,
            on_step=self.events.on_step,
        )
        if getattr(result, "prompt_truncated", False):
            self._note(
                f"the description was longer than the text encoder reads and was truncated: {description!r}"
            )
        return result.image

    def _stage(self, index: int, total: int, what: str) -> None:
        if self.events.on_stage is not None:
            self.events.on_stage(index, total, what)

    def _note(self, message: str) -> None:
        if self.events.on_note is not None:
            self.events.on_note(message)
