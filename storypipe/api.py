"""The Python API: tell, continue, edit and extend stories with one set of loaded models.

::

    from storypipe import StoryPipeline

    pipe = StoryPipeline.from_preset("toy")      # or .from_config("my.yaml", overrides=["generator.num_inference_steps=30"])
    story = pipe.tell("seed.png", "Rosa waved hello in the green meadow.", frames=5, seed=1,
                      on_frame=lambda frame: print(frame.index, frame.story_caption))
    story.frames[2].image                        # a PIL image, in memory
    story.save("stories/demo")                   # the same story folder the CLI writes
    story = pipe.edit(story, frame=2, caption="Then it rained.", strength=0.5)
    story = pipe.insert(story, after=1, caption="A clown appeared.")

Frames are numbered from 0, the seed frame. Bad arguments raise :class:`pipeline.errors.InputError` (a
``ValueError``) with the message the CLI shows. ``storypipe generate``, ``edit`` and ``insert`` are thin
calls of these methods.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from pipeline.config import RESOLVED_CONFIG_NAME, config_to_dict, load_config
from pipeline.errors import DataError, InputError
from pipeline.io import load_rgb
from pipeline.orchestrator import FrameCallback, StoryEvents, StoryTeller, check_caption
from pipeline.story import Frame, Story
from pipeline.story_folder import append_frame, load_story, write_storyboard
from storypipe import wiring
from storypipe.config import DEFAULT_PRESET, StorypipeConfig, preset_path

if TYPE_CHECKING:
    from llava_ft.captioners import Captioners
    from storygen_ft.generator import FrameGenerator

logger = logging.getLogger("storypipe")


def story_config_path(folder: str | Path) -> Path:
    """A story folder's ``config.yaml``: the resolved config it was told with."""
    path = Path(folder) / RESOLVED_CONFIG_NAME
    if not path.is_file():
        raise DataError(f"{path} does not exist: is {folder} a story folder written by `storypipe generate`?")
    return path


class StoryPipeline:
    """The captioners and the frame generator of one config, on one device.

    Each model loads on first use, after the call's inputs are checked, and stays loaded; a missing model
    is a clear error before anything is written.
    """

    def __init__(
        self,
        config: StorypipeConfig,
        captioners: Captioners | None = None,
        generator: FrameGenerator | None = None,
    ) -> None:
        self.config = config
        self.device = wiring.resolve_device(config)
        self._captioners = captioners
        self._generator = generator

    # ----------------------------------------------------------------------------------------
    # Loading
    # ----------------------------------------------------------------------------------------

    @classmethod
    def from_preset(
        cls,
        name: str = DEFAULT_PRESET,
        overrides: Sequence[str] = (),
        values: Mapping[str, Any] | None = None,
    ) -> StoryPipeline:
        """A shipped preset (``toy``, ``tiny``, ``vist``), with ``section.key=value`` overrides."""
        return cls.from_config(preset_path(name), overrides, values)

    @classmethod
    def from_config(
        cls, path: str | Path, overrides: Sequence[str] = (), values: Mapping[str, Any] | None = None
    ) -> StoryPipeline:
        """A YAML config file, with ``section.key=value`` overrides and typed ``values``
        (``{"generator.num_inference_steps": 30}``)."""
        return cls(load_config(StorypipeConfig, Path(path), overrides, values))

    @classmethod
    def from_story(
        cls, folder: str | Path, overrides: Sequence[str] = (), values: Mapping[str, Any] | None = None
    ) -> StoryPipeline:
        """The models a story folder was told with (its ``config.yaml``)."""
        return cls.from_config(story_config_path(folder), overrides, values)

    @property
    def captioners(self) -> Captioners:
        """Both captioners on one LLaVA base."""
        if self._captioners is None:
            self._captioners = wiring.load_captioners(self.config, self.device)
        return self._captioners

    @property
    def generator(self) -> FrameGenerator:
        """The frame generator."""
        if self._generator is None:
            self._generator = wiring.load_frame_generator(self.config, self.device)
        return self._generator

    @property
    def zero_shot_tasks(self) -> tuple[str, ...]:
        """Captioner tasks with no adapter configured: the bare base answers them."""
        return self.captioners.zero_shot_tasks

    # ----------------------------------------------------------------------------------------
    # Stories
    # ----------------------------------------------------------------------------------------

    def tell(
        self,
        image: Image.Image | str | Path,
        caption: str,
        *,
        description: str | None = None,
        frames: int | None = None,
        seed: int | None = None,
        on_frame: FrameCallback | None = None,
        events: StoryEvents | None = None,
        save_to: str | Path | None = None,
        overwrite: bool = False,
    ) -> Story:
        """A story of ``frames`` frames (default ``story.frames``; the seed counts) from a seed image (PIL, or
        a file) and its story caption. ``on_frame(frame)`` is called as each frame is finished, the seed
        frame first. With ``save_to``, the story folder is written as the frames finish, so a crash loses at
        most one frame and :meth:`resume` continues it; a folder that is not empty is refused unless
        ``overwrite`` (which replaces it)."""
        # 1. Check every input before any model loads.
        caption, description, frames, seed = StoryTeller.check_begin(
            self.config.story, caption, description, frames, seed
        )
        folder = Path(save_to) if save_to is not None else None
        if folder is not None and folder.exists() and any(folder.iterdir()) and not overwrite:
            raise InputError(
                f"{folder} is not empty: overwrite it (--overwrite), or continue it (--resume {folder})"
            )
        events = events or StoryEvents()
        note = events.on_note or logger.warning
        seed_image = self._seed_image(image, note)

        # 2. The models; a caption the text encoder cannot read whole gets a warning.
        teller = self._teller(events)
        for text in (caption, description):
            if text is not None and self.generator.exceeds_prompt_limit(text):
                note(f"{text!r} is longer than the text encoder reads; it will be truncated")

        # 3. The seed frame, then every generated frame, saved as it finishes.
        story = teller.begin(seed_image, caption, description, frames=frames, seed=seed)
        story.config = config_to_dict(self.config)
        if folder is not None:
            if overwrite and folder.exists():
                shutil.rmtree(folder)
            story.save(folder)
        finished = self._frame_finished(story, folder, on_frame)
        finished(story.frames[0])
        teller.continue_story(story, finished)

        # 4. The storyboards, once the story is complete (each frame and story.json are saved already).
        if folder is not None:
            write_storyboard(folder, story)
        return story

    def resume(
        self,
        folder: str | Path,
        *,
        on_frame: FrameCallback | None = None,
        events: StoryEvents | None = None,
    ) -> Story:
        """Continue a story folder whose telling was interrupted, saving each new frame into it."""
        folder = Path(folder)
        story = load_story(folder, complete_only=True)
        self._teller(events).continue_story(story, self._frame_finished(story, folder, on_frame))
        write_storyboard(folder, story)  # once the story is complete; each frame is saved already
        return story

    def edit(
        self,
        story: Story,
        frame: int,
        caption: str,
        *,
        strength: float | None = None,
        propagate: bool = False,
        on_frame: FrameCallback | None = None,
        events: StoryEvents | None = None,
    ) -> Story:
        """A new story whose frame ``frame`` has a new story caption, with its description and image
        regenerated (img2img at ``strength``, default ``generator.edit_strength``; 1.0 redraws it fully).
        With ``propagate``, every later frame is regenerated from it. ``story`` is left unchanged; saving
        the result over the story's folder keeps the replaced frames in ``history/``."""
        strength = self.config.generator.edit_strength if strength is None else strength
        StoryTeller.check_edit(story, frame, caption, strength)
        return self._teller(events).edit(story, frame, caption, strength, propagate, on_frame)

    def insert(
        self,
        story: Story,
        after: int,
        caption: str,
        *,
        on_frame: FrameCallback | None = None,
        events: StoryEvents | None = None,
    ) -> Story:
        """A new story with a panel between frames ``after`` and ``after + 1``, conditioned on the frames up
        to ``after``; the later frames move up one place."""
        StoryTeller.check_insert(story, after, caption)
        return self._teller(events).insert(story, after, caption, on_frame)

    def caption(
        self,
        image: Image.Image | str | Path,
        caption: str,
        next_caption: str | None = None,
        seed: int | None = None,
    ) -> tuple[str, str]:
        """``(next story caption, description of the next frame)`` for one image and its story caption;
        ``next_caption``, when given, is used instead of the story captioner's."""
        caption = check_caption(caption)
        if next_caption is not None:
            next_caption = check_caption(next_caption, "next caption")
        picture = self._image(image)
        if next_caption is None:
            next_caption = self.captioners.next_story_caption(picture, caption, seed=seed)
        return next_caption, self.captioners.describe(picture, caption, next_caption, seed=seed)

    # ----------------------------------------------------------------------------------------

    def _teller(self, events: StoryEvents | None) -> StoryTeller:
        return StoryTeller(
            self.captioners, self.generator, self.config.story, self.config.generator.max_references, events
        )

    @staticmethod
    def _frame_finished(
        story: Story, folder: Path | None, on_frame: FrameCallback | None
    ) -> Callable[[Frame], None]:
        """What happens as each frame is finished: saved (when telling into a folder), then announced."""

        def finished(frame: Frame) -> None:
            if folder is not None and frame.index > 0:  # the seed frame is saved with the folder itself
                append_frame(folder, story)
            if on_frame is not None:
                on_frame(frame)

        return finished

    @staticmethod
    def _image(image: Image.Image | str | Path) -> Image.Image:
        if isinstance(image, Image.Image):
            return image.convert("RGB")
        if not isinstance(image, (str, Path)):
            raise InputError(f"the image must be a PIL image or a file path, got {type(image).__name__}")
        path = Path(image)
        if not path.is_file():
            raise InputError(f"the image {path} does not exist")
        return load_rgb(path)  # any mode -> RGB; a file that is not an image is a clear error

    def _seed_image(self, image: Image.Image | str | Path, note: Callable[[str], None]) -> Image.Image:
        """The seed image as RGB, resized (with a note) when its sides are outside ``story.min/max_seed_side``."""
        picture = self._image(image)
        cfg = self.config.story
        shorter, longer = min(picture.size), max(picture.size)
        scale = 1.0
        if shorter < cfg.min_seed_side:
            scale = cfg.min_seed_side / shorter
        elif longer > cfg.max_seed_side:
            scale = cfg.max_seed_side / longer
        if scale == 1.0:
            return picture
        size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
        note(f"the seed image is {picture.width}x{picture.height}; resized to {size[0]}x{size[1]}")
        return picture.resize(size, Image.Resampling.BICUBIC)
