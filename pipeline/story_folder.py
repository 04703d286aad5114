"""A story folder a person can open, and the rules that keep it trustworthy::

    story.json            # the story (see pipeline.story), with the seed, timings and changes in its metadata
    config.yaml           # the resolved config it was told with
    frames/frame_00.png   # one image per frame; frame 0 is the seed
    storyboard.html       # every frame with its story caption and description; opens with no server
    storyboard.png        # a contact sheet
    history/NNN-.../      # after an edit or an insertion: the story.json and the frames it replaced

- **Containment.** Every path read from ``story.json`` or found in the folder must resolve, after following
  symbolic links, inside the folder, and ``frames/`` and ``history/`` must be real folders; otherwise the
  command fails before it writes anything (:func:`check_contained`).
- **One writer at a time.** Every write happens through a :class:`StoryWriter`, which only
  :func:`open_for_writing` gives, under the folder's lock (:mod:`pipeline.folder_lock`).
- **Crash consistency.** Every file is written atomically. A story being told grows one frame at a time
  (its image, then ``story.json``), so a crash loses at most the frame in progress and :func:`load_story`
  with ``complete_only`` gives the frames to continue from. Every other change (an edit, an insertion, a
  replacement) is first staged whole under ``.update/``, then committed by writing
  ``.update/journal.json``, then applied. A crash before the commit leaves the old story as it was (the
  next writer discards the staging); after it, the next command that opens the folder finishes the update.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from PIL import Image

from pipeline.config import RESOLVED_CONFIG_NAME, read_config_file
from pipeline.errors import DataError, InputError
from pipeline.folder_lock import LOCK_FILE, FolderLock
from pipeline.io import (
    NEW_FOLDER_MODE,
    atomic_save_image,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    is_temp_path,
    load_rgb,
)
from pipeline.story import FRAMES_DIR, STORY_JSON_NAME, Frame, Story, frame_file, image_path
from pipeline.storyboard import STORYBOARD_HTML, STORYBOARD_PNG, storyboard_files

HISTORY_DIR = "history"
UPDATE_DIR = ".update"  # an edit, insertion or replacement being staged or applied
JOURNAL_NAME = "journal.json"  # in UPDATE_DIR: written once the update is staged whole; its commit point
STORY_FILES = (RESOLVED_CONFIG_NAME, STORYBOARD_HTML, STORYBOARD_PNG, STORY_JSON_NAME)  # story.json last
OUR_ENTRIES = frozenset((*STORY_FILES, FRAMES_DIR, HISTORY_DIR, UPDATE_DIR, LOCK_FILE))
FRAME_FILE_PATTERN = re.compile(r"frame_\d+\.png")


# --------------------------------------------------------------------------------------------
# Containment
# --------------------------------------------------------------------------------------------


def check_contained(folder: Path) -> None:
    """Refuse a story folder whose ``frames/``, ``history/`` or ``.update/`` is a symbolic link, or that
    holds a symbolic link leading out of it: storypipe reads and writes only inside the story folder."""
    root = _resolve(folder)
    for name in (FRAMES_DIR, HISTORY_DIR, UPDATE_DIR):
        if (folder / name).is_symlink():
            raise DataError(
                f"{folder / name} is a symbolic link; a story folder's {name}/ must be a real folder inside "
                "it. Replace the link with a copy of what it points to."
            )
    for directory, folders, files in os.walk(folder):  # symbolic links to folders are listed, not followed
        for name in (*folders, *files):
            path = Path(directory) / name
            if path.is_symlink() and not _resolve(path).is_relative_to(root):
                raise DataError(
                    f"{path} is a symbolic link to {os.readlink(path)}, outside the story folder {folder}; "
                    "storypipe reads and writes only inside it. Replace the link with a copy."
                )


def _resolve(path: Path) -> Path:
    try:
        return path.resolve(strict=False)
    except (OSError, RuntimeError) as exc:  # a loop of symbolic links
        raise DataError(f"{path} cannot be resolved: {exc}") from exc


def _inside(folder: Path, relative: str) -> Path:
    """``folder / relative``, refusing a path that leads out of the folder (after following links)."""
    path = folder / relative
    if not _resolve(path).is_relative_to(_resolve(folder)):
        raise DataError(
            f"{folder / STORY_JSON_NAME}: the image path {relative!r} leads out of the story folder"
        )
    return path


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def read_story_json(folder: Path) -> dict[str, Any]:
    """The raw, validated ``story.json`` of ``folder``; a clear error when it is missing or invalid."""
    path = _inside(folder, STORY_JSON_NAME)
    if not path.is_file():
        raise DataError(f"{path} does not exist: is {folder} a story folder written by `storypipe generate`?")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        Story.from_json(data)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, TypeError, RecursionError) as exc:
        raise DataError(f"{path} is not a valid story.json: {exc}") from exc
    return data


def load_story(folder: str | Path, complete_only: bool = False) -> Story:
    """The story in ``folder``, images and config included.

    With ``complete_only`` the frames stop before the first whose image is missing (a crash between
    writing a frame's entry and its image); otherwise a missing image is an error. An update that a crash
    interrupted after its commit is finished first (under the folder's lock).
    """
    folder = Path(folder)
    check_contained(folder)
    if (folder / UPDATE_DIR / JOURNAL_NAME).is_file():
        with open_for_writing(folder) as writer:
            return writer.load(complete_only)
    return _read_story(folder, complete_only)


def _read_story(folder: Path, complete_only: bool) -> Story:
    data = read_story_json(folder)
    frames = []
    for entry in data["frames"]:
        path = _inside(folder, image_path(entry))
        if not path.is_file():
            if complete_only:
                break
            raise DataError(f"{folder}: the image of frame {entry['index']}, {path}, is missing")
        frames.append(Frame.from_dict(entry, image=load_rgb(path)))
    if not frames:
        raise DataError(f"{folder}: the seed frame's image is missing; start a new story instead")
    config_path = _inside(folder, RESOLVED_CONFIG_NAME)
    config = read_config_file(config_path) if config_path.exists() else None  # bounded: no YAML bomb
    return Story(frames, data["metadata"], config)


# --------------------------------------------------------------------------------------------
# Writing: one writer at a time, under the folder's lock
# --------------------------------------------------------------------------------------------


@contextmanager
def open_for_writing(folder: str | Path, create: bool = False) -> Iterator[StoryWriter]:
    """``with open_for_writing(folder) as writer:`` the folder's lock held, its containment checked, an
    interrupted update finished (or an uncommitted one discarded) and leftover temporary files removed.

    With ``create``, a missing folder is made, and removed again if the block fails before anything is
    written in it. Raises :class:`pipeline.folder_lock.FolderInUse` at once when another process writes it.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise DataError(f"{folder} is a file, not a story folder; choose a folder")
    made: list[Path] = []
    if not folder.exists():
        if not create:
            raise DataError(f"{folder} does not exist: is it a story folder written by `storypipe generate`?")
        made = _make_folders(folder)
    try:
        with FolderLock(folder):
            check_contained(folder)
            _finish_interrupted_update(folder)
            yield StoryWriter(folder)
    except BaseException:
        for path in reversed(made):  # innermost first; a folder that holds anything stays
            if path.is_dir() and not any(path.iterdir()):
                path.rmdir()
        raise


def save_story(folder: str | Path, story: Story) -> Path:
    """Write ``story`` into ``folder`` (see :meth:`StoryWriter.save`), under the folder's lock."""
    with open_for_writing(folder, create=True) as writer:
        writer.save(story)
    return Path(folder)


class StoryWriter:
    """The writes a story folder allows; get one from :func:`open_for_writing`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @property
    def holds_story(self) -> bool:
        return (self.folder / STORY_JSON_NAME).exists()

    def unknown_entries(self) -> list[str]:
        """What the folder holds that storypipe did not write (a new story never goes in beside it)."""
        unknown = [p.name for p in self.folder.iterdir() if p.name not in OUR_ENTRIES and not is_temp_path(p)]
        frames = self.folder / FRAMES_DIR
        if frames.is_dir():
            unknown += [
                f"{FRAMES_DIR}/{p.name}" for p in frames.iterdir() if not FRAME_FILE_PATTERN.fullmatch(p.name)
            ]
        return sorted(unknown)

    def check_no_unknown_entries(self) -> None:
        """A new story goes only into a folder that holds nothing but storypipe's files (say, of a first
        write that died): never in beside other files, which a later ``--overwrite`` would then not own."""
        unknown = self.unknown_entries()
        if unknown:
            shown = ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else "")
            raise InputError(
                f"{self.folder} is not empty and holds no story (it has {shown}); choose another folder for "
                "the story: --overwrite replaces only a story that storypipe wrote"
            )

    def load(self, complete_only: bool = False) -> Story:
        return _read_story(self.folder, complete_only)

    # A story being told: the seed frame, one frame at a time, then the storyboards ---------------

    def start(self, story: Story) -> None:
        """The first write of a story into a folder that holds none: its frames and ``config.yaml``, then
        ``story.json`` (written last, so a folder with a ``story.json`` always holds a whole story). What an
        unfinished first write left is replaced."""
        _check_images(story)
        if self.holds_story:
            raise DataError(f"{self.folder} already holds a story")
        for stale in self._frame_files() - {frame_file(frame.index) for frame in story.frames}:
            (self.folder / stale).unlink()
        for name in (STORYBOARD_HTML, STORYBOARD_PNG):
            (self.folder / name).unlink(missing_ok=True)
        for frame in story.frames:
            atomic_save_image(self.folder / frame_file(frame.index), frame.image.convert("RGB"))
        if story.config is not None:
            atomic_write_text(self.folder / RESOLVED_CONFIG_NAME, _config_yaml(story))
        atomic_write_json(self.folder / STORY_JSON_NAME, story.to_json())

    def append(self, story: Story) -> None:
        """Write the story's newest frame, then ``story.json`` (which so never names a missing image)."""
        _check_images(story)
        frame = story.frames[-1]
        atomic_save_image(self.folder / frame_file(frame.index), frame.image.convert("RGB"))
        atomic_write_json(self.folder / STORY_JSON_NAME, story.to_json())

    def finish(self, story: Story) -> None:
        """The storyboards, once the story is complete."""
        for name, contents in storyboard_files(story).items():
            atomic_write_bytes(self.folder / name, contents)

    # Every other change: staged whole, committed, applied -----------------------------------------

    def save(self, story: Story) -> None:
        """Write the whole story folder for ``story``.

        When the folder already holds a different story (an edit, an insertion, or another story), its
        ``story.json`` and every frame image the new story no longer has are kept in
        ``history/NNN-<change>/``, so nothing is lost.
        """
        _check_images(story)
        if not self.holds_story:
            self.check_no_unknown_entries()
            self.start(story)
            self.finish(story)
            return
        saved = self.load(complete_only=True)
        history = None
        if _frames_summary(saved) != _frames_summary(story):
            kept = {_image_key(frame.image) for frame in story.frames}
            replaced = [frame_file(f.index) for f in saved.frames if _image_key(f.image) not in kept]
            history = (change_name(story, saved), replaced)
        self._update(story, saved, history)

    def replace(self, story: Story) -> None:
        """Replace the story the folder holds with ``story`` (``--overwrite``): its frames, files and history
        go, files that are not storypipe's stay. The old story stays whole until the new one is staged."""
        _check_images(story)
        self._update(story, saved=None, history=None)

    def _update(self, story: Story, saved: Story | None, history: tuple[str, list[str]] | None) -> None:
        """Stage the new state under ``.update/``, commit its journal, apply it. ``saved`` is the story on
        disk that ``story`` changes (None: replace it whole); ``history`` names the snapshot to keep."""
        staging = self.folder / UPDATE_DIR
        _finish_interrupted_update(self.folder)  # an earlier update of this writer that an error interrupted
        staging.mkdir(NEW_FOLDER_MODE)
        try:
            moves, removals = self._stage(staging, story, saved, history)
            self._check_writable([*moves, *removals])
        except Exception:
            shutil.rmtree(staging, ignore_errors=True)  # nothing was committed: the story is as it was
            raise
        # The commit point, then the update itself.
        atomic_write_json(staging / JOURNAL_NAME, {"moves": moves, "removals": removals})
        _apply_update(self.folder)

    def _stage(
        self, staging: Path, story: Story, saved: Story | None, history: tuple[str, list[str]] | None
    ) -> tuple[list[str], list[str]]:
        """Write under ``staging`` every file the update adds; returns ``(moves, removals)``, paths relative
        to both ``staging`` and the story folder."""
        moves: list[str] = []

        # 1. The history entry: copies of story.json and of the frames the change replaces.
        if history is not None:
            reason, replaced = history
            entry = f"{HISTORY_DIR}/{self._next_history_number():03d}-{reason}"
            (staging / entry / FRAMES_DIR).mkdir(parents=True)
            for relative in (STORY_JSON_NAME, *replaced):
                shutil.copyfile(self.folder / relative, staging / entry / relative)
            moves.append(entry)

        # 2. The new story's files; a frame whose image is unchanged at its place is left where it is.
        unchanged = {frame_file(f.index): _image_key(f.image) for f in saved.frames} if saved else {}
        for frame in story.frames:
            relative = frame_file(frame.index)
            if unchanged.get(relative) != _image_key(frame.image):
                atomic_save_image(staging / relative, frame.image.convert("RGB"))
                moves.append(relative)
        StoryWriter(staging).finish(story)  # the storyboards
        if story.config is not None:
            atomic_write_text(staging / RESOLVED_CONFIG_NAME, _config_yaml(story))
        atomic_write_json(staging / STORY_JSON_NAME, story.to_json())
        moves += [name for name in STORY_FILES if (staging / name).exists()]  # story.json last

        # 3. What the new story no longer has.
        removals = sorted(self._frame_files() - {frame_file(frame.index) for frame in story.frames})
        if saved is None:
            removals += [HISTORY_DIR] + ([RESOLVED_CONFIG_NAME] if story.config is None else [])

        return moves, removals

    def _check_writable(self, paths: list[str]) -> None:
        """Refuse before the commit point when a folder the update writes into is read-only, so an update is
        never committed that cannot be applied (``os.access`` also sees a read-only file system)."""
        for relative in paths:
            place = (self.folder / relative).parent
            while not place.exists():
                place = place.parent
            if not os.access(place, os.W_OK):
                raise DataError(
                    f"cannot write into {place}: it is read-only, so {self.folder} was left as it was"
                )

    def _frame_files(self) -> set[str]:
        frames = self.folder / FRAMES_DIR
        if not frames.is_dir():
            return set()
        return {f"{FRAMES_DIR}/{p.name}" for p in frames.iterdir() if FRAME_FILE_PATTERN.fullmatch(p.name)}

    def _next_history_number(self) -> int:
        history = self.folder / HISTORY_DIR
        numbers = (
            [int(p.name.split("-")[0]) for p in history.iterdir() if p.name.split("-")[0].isdigit()]
            if history.is_dir()
            else []
        )
        return 1 + max(numbers, default=0)


def _make_folders(folder: Path) -> list[Path]:
    """Make ``folder`` and its missing parents; returns the folders made, outermost first."""
    missing = [path for path in (folder, *folder.parents) if not path.exists()][::-1]
    try:
        for path in missing:
            path.mkdir(NEW_FOLDER_MODE)
    except OSError as exc:
        raise DataError(f"cannot create the folder {folder}: {exc.strerror} ({exc.filename})") from exc
    return missing


def _finish_interrupted_update(folder: Path) -> None:
    """Finish an update that was committed when it was interrupted; discard one that was not (the story it
    would have changed is intact); remove temporary files that interrupted writes left."""
    staging = folder / UPDATE_DIR
    if (staging / JOURNAL_NAME).is_file():
        _apply_update(folder)
    elif staging.is_dir():
        shutil.rmtree(staging)
    elif staging.exists():
        staging.unlink()
    for place in (folder, folder / FRAMES_DIR):
        if place.is_dir():
            for leftover in place.iterdir():
                if is_temp_path(leftover) and leftover.is_file():
                    leftover.unlink()


def _apply_update(folder: Path) -> None:
    """Move each staged path into place, remove what the journal says, drop the staging. Each step can be
    repeated, so an update interrupted while being applied is finished by applying it again."""
    staging = folder / UPDATE_DIR
    journal = _read_journal(staging / JOURNAL_NAME)
    for relative in journal["moves"]:
        source, target = staging / relative, folder / relative
        if source.exists():
            target.parent.mkdir(NEW_FOLDER_MODE, parents=True, exist_ok=True)
            os.replace(source, target)
    for relative in journal["removals"]:
        target = folder / relative
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
    shutil.rmtree(staging)


def _read_journal(path: Path) -> dict[str, list[str]]:
    """``.update/journal.json``, every path in it checked to be one of a story folder's own."""
    try:
        journal = json.loads(path.read_text(encoding="utf-8"))
        paths = [*journal["moves"], *journal["removals"]]
        if not all(isinstance(p, str) and _is_story_path(p) for p in paths):
            raise ValueError("it names a path that is not one of a story folder's own")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"{path}: an interrupted update's journal that storypipe cannot use ({exc}). Remove "
            f"{path.parent} to keep the story as it was before that update."
        ) from exc
    return journal


def _is_story_path(relative: str) -> bool:
    parts = PurePosixPath(relative).parts
    if not parts or PurePosixPath(relative).is_absolute() or ".." in parts:
        return False
    return parts[0] in (FRAMES_DIR, HISTORY_DIR) or relative in STORY_FILES


def _config_yaml(story: Story) -> str:
    return yaml.safe_dump(story.config, sort_keys=False)


def _check_images(story: Story) -> None:
    missing = [frame.index for frame in story.frames if frame.image is None]
    if missing:
        raise ValueError(f"frames {missing} have no image; a story folder needs every frame's image")


def _image_key(image: Image.Image) -> str:
    rgb = image.convert("RGB")
    return hashlib.sha256(f"{rgb.size}".encode() + rgb.tobytes()).hexdigest()


def _frames_summary(story: Story) -> list[tuple]:
    return [(f.story_caption, f.description, f.source, _image_key(f.image)) for f in story.frames]


def change_name(story: Story, saved: Story) -> str:
    """``edit-frame-02`` / ``insert-after-01``: the newest change ``story`` made to ``saved``."""
    changes, saved_changes = story.metadata.get("changes", []), saved.metadata.get("changes", [])
    if (
        not isinstance(changes, list)
        or not isinstance(saved_changes, list)
        or len(changes) <= len(saved_changes)
    ):
        return "replaced"
    change = changes[-1] if isinstance(changes[-1], dict) else {}
    number = change.get("frame" if change.get("change") == "edit" else "after")
    if not isinstance(number, int) or isinstance(number, bool) or number < 0:
        return "replaced"
    if change.get("change") == "edit":
        return f"edit-frame-{number:02d}"
    if change.get("change") == "insert":
        return f"insert-after-{number:02d}"
    return "replaced"
