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

import functools
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from pipeline.config import RESOLVED_CONFIG_NAME, config_to_dict, load_config
from pipeline.errors import DataError, InputError, StorypipeError
from pipeline.io import load_rgb
from pipeline.orchestrator import FrameCallback, StoryEvents, StoryStart, StoryTeller, check_caption
from pipeline.story import STORY_JSON_NAME, Frame, Story, image_path
from pipeline.story_folder import StoryWriter, check_contained, open_for_writing, read_story_json
from pipeline.storyboard import STORYBOARD_HTML
from storypipe import preflight, wiring
from storypipe.config import DEFAULT_PRESET, StorypipeConfig, preset_path
from storypipe.many import BadLine, BadLines, ManyStories, StoryOutcome, StorySeed, read_seeds

if TYPE_CHECKING:
    from llava_ft.captioners import Captioners
    from storygen_ft.generator import FrameGenerator

logger = logging.getLogger("storypipe")


# The config sections that decide what a story holds: a story continues only with its own.
STORY_SECTIONS = ("captioner", "generator", "story")


def story_config_path(folder: str | Path) -> Path:
    """A story folder's ``config.yaml``: the resolved config it was told with."""
    check_contained(Path(folder))
    path = Path(folder) / RESOLVED_CONFIG_NAME
    if not (Path(folder) / STORY_JSON_NAME).exists():
        raise DataError(no_story_message(Path(folder)))
    if not path.is_file():
        raise DataError(f"{path} does not exist: is {folder} a story folder written by `storypipe generate`?")
    return path


def no_story_message(folder: Path) -> str:
    """Why a folder without ``story.json`` cannot be continued or edited, and what to do."""
    return (
        f"{folder / STORY_JSON_NAME} does not exist, so {folder} holds no story: its first write never finished "
        f"(then tell the story again with `storypipe generate --out {folder}`), or it is not a story folder"
    )


def in_runtime_threads(method: Callable) -> Callable:
    """Run a pipeline method with ``runtime.num_threads`` torch CPU threads, restored afterwards."""

    @functools.wraps(method)
    def run(self: StoryPipeline, *args: Any, **kwargs: Any) -> Any:
        from pipeline.training import cpu_threads

        with cpu_threads(self.config.runtime.cpu_thread_count()):
            return method(self, *args, **kwargs)

    return run


class StoryPipeline:
    """The captioners and the frame generator of one config, on one device.

    Each model loads on first use, after the call's inputs are checked, and stays loaded; a missing model
    is a clear error before anything is written. ``device`` defaults to ``runtime.device``.
    """

    def __init__(
        self,
        config: StorypipeConfig,
        captioners: Captioners | None = None,
        generator: FrameGenerator | None = None,
        *,
        device: str | None = None,
    ) -> None:
        self.config = config
        self.device = device or wiring.resolve_device(config)  # e.g. wiring.process_device under a launcher
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

    @in_runtime_threads
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
        frame first.

        With ``save_to``, the story folder is written as the frames finish, so a crash loses at most one
        frame and :meth:`resume` continues it. The folder must be new or empty; with ``overwrite`` it may
        also hold a story that storypipe wrote, which is replaced only once the new story is complete (a
        folder holding the seed image, or the current directory, is refused)."""
        # 1. Check every input before any model loads.
        caption, description, frames, seed = StoryTeller.check_begin(
            self.config.story, caption, description, frames, seed
        )
        events = events or StoryEvents()
        note = events.on_note or logger.warning
        seed_image = self._seed_image(image, note)
        with ExitStack() as stack:
            # 2. The story folder, locked for this call alone; what it holds decides how it is written.
            writer = None
            if save_to is not None:
                writer = stack.enter_context(open_for_writing(save_to, create=True))
                replacing = check_story_target(writer, overwrite, image)

            # 3. The models; a caption the text encoder cannot read whole gets a warning.
            teller = self._teller(events)
            self._note_long_texts((caption, description), note)

            # 4. The seed frame, then every generated frame, each saved as it finishes (a story being
            # replaced is written once it is complete, so the old one stays whole until then).
            story = teller.begin(seed_image, caption, description, frames=frames, seed=seed)
            story.config = config_to_dict(self.config)
            growing = writer if writer is not None and not replacing else None
            if growing is not None:
                growing.start(story)
            finished = self._frame_finished(story, growing, on_frame)
            finished(story.frames[0])
            teller.continue_story(story, finished)

            # 5. The storyboards, once the story is complete.
            if growing is not None:
                growing.finish(story)
            elif writer is not None:
                writer.replace(story)
        return story

    @in_runtime_threads
    def tell_many(
        self,
        seeds_file: str | Path,
        out: str | Path,
        *,
        batch_size: int = 8,
        skip_bad: bool = False,
        shard: tuple[int, int] = (0, 1),
        on_start: Callable[[int], None] | None = None,
        on_story: Callable[[StoryOutcome], None] | None = None,
        events: StoryEvents | None = None,
    ) -> ManyStories:
        """One story per line of ``seeds_file`` (JSON Lines, see :mod:`storypipe.many`), each into
        ``out/{id}/``: the same story folder :meth:`tell` with ``save_to`` writes for the same inputs and seed.

        ``batch_size`` stories advance together, frame k of all of them in one batched call of each model.
        A story already complete is skipped and one that was interrupted continues from its last frame, so
        a rerun finishes what a crash left. ``shard=(i, n)`` tells only every n-th story from the i-th
        (``accelerate launch``: :func:`storypipe.wiring.process_state`). ``on_start(count)`` is called once
        the lines are checked, with this process's number of stories; ``on_story(outcome)`` as each story
        is done (or skipped).

        Every line, and the folder it writes, is checked before any model loads: a bad line raises
        :class:`storypipe.many.BadLines` naming each one (``file:line``) and nothing is written; with
        ``skip_bad`` the other lines go ahead and the bad ones are in the result."""
        # 1. Check the arguments and every line (and what its folder holds) before any model loads.
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
        index, count = shard
        if not 0 <= index < count:
            raise InputError(
                f"shard must be (process, processes) with 0 <= process < processes, got {shard!r}"
            )
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise InputError(f"{out} is a file; --out takes a folder for the story folders")
        seeds, bad = read_seeds(Path(seeds_file), self.config.story)
        states: dict[str, str] = {}
        for seed in seeds:
            try:
                states[seed.id] = self._folder_state(seed, out / seed.id)
            except StorypipeError as exc:
                bad.append(BadLine(seed.where, str(exc)))
        if bad and not skip_bad:
            raise BadLines(bad)
        note = (events.on_note if events is not None else None) or logger.warning
        for line in bad if index == 0 else ():  # every process finds the same bad lines; one says so
            note(f"skipping {line}")
        mine = [seed for seed in seeds if seed.id in states][index::count]
        if on_start is not None:
            on_start(len(mine))

        # 2. Stories already complete are skipped; the rest are told (or continued), batch_size at a time.
        outcomes: dict[str, StoryOutcome] = {}
        todo = []
        for seed in mine:
            if states[seed.id] == "complete":
                frames = len(read_story_json(out / seed.id)["frames"])
                outcomes[seed.id] = StoryOutcome(seed, out / seed.id, "complete", frames)
                if on_story is not None:
                    on_story(outcomes[seed.id])
            else:
                todo.append(seed)
        if todo:
            teller = self._teller(events)
            for start in range(0, len(todo), batch_size):
                for outcome in self._tell_batch(teller, todo[start : start + batch_size], out, note):
                    outcomes[outcome.seed.id] = outcome
                    if on_story is not None:
                        on_story(outcome)
        return ManyStories([outcomes[seed.id] for seed in mine], bad, (index, count))

    @in_runtime_threads
    def resume(
        self,
        folder: str | Path,
        *,
        on_frame: FrameCallback | None = None,
        events: StoryEvents | None = None,
    ) -> Story:
        """Continue a story folder whose telling was interrupted, saving each new frame into it.

        The story continues with the settings it was told with: this pipeline's captioner, generator and
        story settings must be the folder's ``config.yaml`` ones (:meth:`from_story` gives such a pipeline).
        """
        folder = Path(folder)
        with open_for_writing(folder) as writer:
            if not writer.holds_story:
                raise DataError(no_story_message(folder))
            story = writer.load(complete_only=True)
            self._check_told_with_this_config(folder)
            self._teller(events).continue_story(story, self._frame_finished(story, writer, on_frame))
            writer.finish(story)
        return story

    @in_runtime_threads
    def edit(
        self,
        story: Story | str | Path,
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
        With ``propagate``, every later frame is regenerated from it.

        ``story`` in memory is left unchanged; saving the result over the story's folder keeps the replaced
        frames in ``history/``. A story folder (a path) is edited in place, under its lock: the old story
        stays whole until the new one is complete."""
        strength = self.config.generator.edit_strength if strength is None else strength
        if not isinstance(story, Story):
            return self._change_folder(
                story, lambda saved: self.edit(saved, frame, caption, strength=strength, propagate=propagate,
                                               on_frame=on_frame, events=events),
            )  # fmt: skip
        StoryTeller.check_edit(story, frame, caption, strength)
        return self._teller(events).edit(story, frame, caption, strength, propagate, on_frame)

    @in_runtime_threads
    def insert(
        self,
        story: Story | str | Path,
        after: int,
        caption: str,
        *,
        on_frame: FrameCallback | None = None,
        events: StoryEvents | None = None,
    ) -> Story:
        """A new story with a panel between frames ``after`` and ``after + 1``, conditioned on the frames up
        to ``after``; the later frames move up one place. A story folder (a path) is changed in place, as
        :meth:`edit` does."""
        if not isinstance(story, Story):
            return self._change_folder(
                story, lambda saved: self.insert(saved, after, caption, on_frame=on_frame, events=events)
            )
        StoryTeller.check_insert(story, after, caption)
        return self._teller(events).insert(story, after, caption, on_frame)

    @in_runtime_threads
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
        self._require_models("caption")
        if next_caption is None:
            next_caption = self.captioners.next_story_caption(picture, caption, seed=seed)
        return next_caption, self.captioners.describe(picture, caption, next_caption, seed=seed)

    # ----------------------------------------------------------------------------------------

    def _folder_state(self, seed: StorySeed, folder: Path) -> str:
        """``new``, ``resume`` or ``complete``: what telling ``seed`` into ``folder`` means; an error when the
        folder holds something else (files not storypipe's, another story, a story of another config)."""
        if not folder.exists():
            return "new"
        if folder.is_symlink() or not folder.is_dir():
            raise InputError(f"{folder} is not a folder; remove it or give the line another id")
        check_contained(folder)
        writer = StoryWriter(folder)  # read only: the folder's state, no writes
        if not writer.holds_story:
            writer.check_no_unknown_entries()
            return "new"
        data = read_story_json(folder)
        first, metadata = data["frames"][0], data["metadata"]
        told = (first["story_caption"], metadata.get("seed"), metadata.get("frames_requested"))
        if told != (seed.caption, seed.seed, seed.frames) or (
            seed.description is not None and first["description"] != seed.description
        ):
            raise InputError(
                f"{folder} holds another story (seed caption {told[0]!r}, seed {told[1]}, {told[2]} frames); "
                "remove it, or give the line another id"
            )
        self._check_told_with_this_config(folder)
        done = len(data["frames"]) == seed.frames and all(
            (folder / image_path(frame)).is_file() for frame in data["frames"]
        )
        return "complete" if done and (folder / STORYBOARD_HTML).is_file() else "resume"

    def _tell_batch(
        self, teller: StoryTeller, batch: list[StorySeed], out: Path, note: Callable[[str], None]
    ) -> list[StoryOutcome]:
        """Tell (or continue) the stories of ``batch`` together, each saved into its folder as each frame
        is finished, under the folders' locks."""
        started = time.perf_counter()
        with ExitStack() as stack:
            writers = [stack.enter_context(open_for_writing(out / seed.id, create=True)) for seed in batch]
            # 1. The interrupted stories as far as they got; the new ones begun (seed descriptions batched).
            stories: list[Story | None] = [
                writer.load(complete_only=True) if writer.holds_story else None for writer in writers
            ]
            new = [i for i, story in enumerate(stories) if story is None]
            starts = []
            for i in new:
                writers[i].check_no_unknown_entries()
                seed = batch[i]
                self._note_long_texts((seed.caption, seed.description), note)
                image = self._seed_image(
                    seed.image, lambda message, seed=seed: note(f"{seed.where}: {message}")
                )
                starts.append(StoryStart(image, seed.caption, seed.description, seed.frames, seed.seed))
            for i, story in zip(new, teller.begin_stories(starts), strict=True):
                story.config = config_to_dict(self.config)
                writers[i].start(story)
                stories[i] = story
            resumed_at = [len(story.frames) for story in stories]

            # 2. Every story to its end, frame k of all of them at once; each frame saved as it is finished.
            teller.continue_stories(
                stories, lambda position, frame: writers[position].append(stories[position])
            )

            # 3. The storyboards.
            for writer, story in zip(writers, stories, strict=True):
                writer.finish(story)
        seconds = time.perf_counter() - started
        return [
            StoryOutcome(seed, out / seed.id, "told" if i in new else "resumed", len(story.frames),
                         None if i in new else resumed_at[i], seconds)
            for i, (seed, story) in enumerate(zip(batch, stories, strict=True))
        ]  # fmt: skip

    def _note_long_texts(self, texts: Sequence[str | None], note: Callable[[str], None]) -> None:
        """A note for each text the generator's text encoder cannot read whole."""
        for text in texts:
            if text is not None and self.generator.exceeds_prompt_limit(text):
                note(f"{text!r} is longer than the text encoder reads; it will be truncated")

    def _require_models(self, purpose: str) -> None:
        """Before the first model loads: every model ``purpose`` needs is there, or one error names each
        missing one (:func:`storypipe.preflight.require`)."""
        if self._captioners is None or self._generator is None:
            preflight.require(self.config, purpose)

    def _teller(self, events: StoryEvents | None) -> StoryTeller:
        self._require_models("generate")
        return StoryTeller(
            self.captioners, self.generator, self.config.story, self.config.generator.max_references, events
        )

    @staticmethod
    def _change_folder(folder: str | Path, change: Callable[[Story], Story]) -> Story:
        """``change`` the story in ``folder`` and save the result there, all under the folder's lock."""
        with open_for_writing(Path(folder)) as writer:
            changed = change(writer.load())
            writer.save(changed)
        return changed

    def _check_told_with_this_config(self, folder: Path) -> None:
        """Refuse to continue a story with other settings than it was told with (a mixed story)."""
        told = config_to_dict(load_config(StorypipeConfig, story_config_path(folder)))
        mine = config_to_dict(self.config)
        differ = [
            f"{section}.{key} is {mine[section].get(key)!r} here, {told[section].get(key)!r} there"
            for section in STORY_SECTIONS
            for key in sorted(set(told[section]) | set(mine[section]))
            if told[section].get(key) != mine[section].get(key)
        ]
        if differ:
            raise InputError(
                f"{folder} was told with other settings than this pipeline's ({'; '.join(differ)}), and continuing "
                f"it so would mix two stories. Continue it with its own config: "
                f"StoryPipeline.from_story({str(folder)!r}), or `storypipe generate --resume {folder}`."
            )

    @staticmethod
    def _frame_finished(
        story: Story, writer: StoryWriter | None, on_frame: FrameCallback | None
    ) -> Callable[[Frame], None]:
        """What happens as each frame is finished: saved (when telling into a folder), then announced."""

        def finished(frame: Frame) -> None:
            if writer is not None and frame.index > 0:  # the seed frame is saved when the folder is started
                writer.append(story)
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
        if path.is_dir():
            raise InputError(f"the image {path} is a directory, not an image file")
        if path.exists() and not path.is_file():
            raise InputError(f"the image {path} is not a regular file")
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


def check_story_target(writer: StoryWriter, overwrite: bool, seed_image: object) -> bool:
    """Whether telling a story into ``writer``'s folder replaces a story there (``overwrite``); an
    :class:`InputError` when the folder may not take a new story.

    A new story goes into a folder that is empty, or that an unfinished first write of storypipe's left;
    with ``overwrite``, also over a story that storypipe wrote, unless the folder holds the seed image or
    the current directory. Anything else in a folder is never deleted.
    """
    folder = writer.folder
    if not writer.holds_story:
        writer.check_no_unknown_entries()
        return False
    if not overwrite:
        raise InputError(
            f"{folder} holds a story: overwrite it (--overwrite), or continue it (--resume {folder})"
        )
    try:
        read_story_json(folder)
    except DataError as exc:
        raise InputError(
            f"{exc}. --overwrite replaces only a story that storypipe wrote; choose another folder"
        ) from exc
    root = folder.resolve()
    if isinstance(seed_image, (str, Path)) and Path(seed_image).resolve().is_relative_to(root):
        raise InputError(
            f"the seed image {seed_image} is inside {folder}, which --overwrite would replace; copy the image "
            "out of it first, or choose another folder"
        )
    if Path(os.getcwd()).resolve().is_relative_to(root):
        raise InputError(f"{folder} holds the current directory; --overwrite will not replace it")
    return True
