"""A story folder a person can open::

    story.json            # the story (see pipeline.story), with the seed, timings and changes in its metadata
    config.yaml           # the resolved config it was told with
    frames/frame_00.png   # one image per frame; frame 0 is the seed
    storyboard.html       # every frame with its story caption and description; opens with no server
    storyboard.png        # a contact sheet
    history/NNN-.../      # after an edit or an insertion: the story.json and the frames it replaced

Every file is written atomically. While a story is being told, :func:`append_frame` adds each finished
frame, so a crash loses at most the frame in progress and :func:`load_story` with ``complete_only``
gives the frames to continue from.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import shutil
from pathlib import Path
from typing import Any

import yaml
from PIL import Image, ImageDraw

from pipeline.config import RESOLVED_CONFIG_NAME
from pipeline.errors import DataError
from pipeline.io import atomic_save_image, atomic_write_json, atomic_write_text, load_rgb
from pipeline.story import FRAMES_DIR, STORY_JSON_NAME, Frame, Story, frame_file, image_path

HISTORY_DIR = "history"
STORYBOARD_HTML = "storyboard.html"
STORYBOARD_PNG = "storyboard.png"
SHEET_TILE = 256  # contact-sheet tile side, pixels
SHEET_COLUMNS = 5
SHEET_GAP = 8
SHEET_LABEL_HEIGHT = 20
EMBEDDED_JPEG_QUALITY = 90


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def read_story_json(folder: Path) -> dict[str, Any]:
    """The raw, validated ``story.json`` of ``folder``; a clear error when it is missing or invalid."""
    path = folder / STORY_JSON_NAME
    if not path.is_file():
        raise DataError(f"{path} does not exist: is {folder} a story folder written by `storypipe generate`?")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        Story.from_json(data)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, TypeError) as exc:
        raise DataError(f"{path} is not a valid story.json: {exc}") from exc
    return data


def load_story(folder: Path, complete_only: bool = False) -> Story:
    """The story in ``folder``, images and config included.

    With ``complete_only`` the frames stop before the first whose image is missing (a crash between
    writing a frame's entry and its image); otherwise a missing image is an error.
    """
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
    config_path = folder / RESOLVED_CONFIG_NAME
    config = yaml.safe_load(config_path.read_text(encoding="utf-8")) if config_path.is_file() else None
    return Story(frames, data["metadata"], config)


def _inside(folder: Path, relative: str) -> Path:
    """``folder / relative``, refusing a path that leads out of the folder."""
    path = folder / relative
    if not path.resolve().is_relative_to(folder.resolve()):
        raise DataError(
            f"{folder / STORY_JSON_NAME}: the image path {relative!r} leads out of the story folder"
        )
    return path


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def save_story(folder: Path, story: Story) -> Path:
    """Write the whole story folder for ``story``.

    When ``folder`` already holds a different story (an edit, an insertion, or another story), its
    ``story.json`` and every frame image the new story no longer has are first copied into
    ``history/NNN-<change>/``, so nothing is lost.
    """
    _check_images(story)
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / STORY_JSON_NAME).is_file():
        _keep_history(folder, story)
    for frame in story.frames:
        atomic_save_image(folder / frame_file(frame.index), frame.image.convert("RGB"))
    wanted = {Path(frame_file(frame.index)).name for frame in story.frames}
    for stale in (folder / FRAMES_DIR).glob("frame_*.png"):  # a story that got shorter
        if stale.name not in wanted:
            stale.unlink()
    if story.config is not None:
        atomic_write_text(folder / RESOLVED_CONFIG_NAME, yaml.safe_dump(story.config, sort_keys=False))
    atomic_write_json(folder / STORY_JSON_NAME, story.to_json())
    write_storyboard(folder, story)
    return folder


def append_frame(folder: Path, story: Story) -> None:
    """Write the story's newest frame and ``story.json`` (image first: ``story.json`` never names a
    missing image). The storyboards are written once the story is complete."""
    _check_images(story)
    frame = story.frames[-1]
    atomic_save_image(folder / frame_file(frame.index), frame.image.convert("RGB"))
    atomic_write_json(folder / STORY_JSON_NAME, story.to_json())


def _check_images(story: Story) -> None:
    missing = [frame.index for frame in story.frames if frame.image is None]
    if missing:
        raise ValueError(f"frames {missing} have no image; a story folder needs every frame's image")


def _image_key(image: Image.Image) -> str:
    rgb = image.convert("RGB")
    return hashlib.sha256(f"{rgb.size}".encode() + rgb.tobytes()).hexdigest()


def _keep_history(folder: Path, story: Story) -> None:
    """Snapshot the saved story into ``history/`` when ``story`` differs from it."""
    saved = load_story(folder, complete_only=True)
    new_keys = {_image_key(frame.image) for frame in story.frames}

    def summary(frames: list[Frame]) -> list[tuple]:
        return [(f.story_caption, f.description, f.source, _image_key(f.image)) for f in frames]

    if summary(saved.frames) == summary(story.frames):
        return
    replaced = [frame for frame in saved.frames if _image_key(frame.image) not in new_keys]
    snapshot(folder, change_name(story, saved), [frame_file(frame.index) for frame in replaced])


def change_name(story: Story, saved: Story) -> str:
    """``edit-frame-02`` / ``insert-after-01``: the newest change ``story`` made to ``saved``."""
    changes = story.metadata.get("changes", [])
    if len(changes) <= len(saved.metadata.get("changes", [])):
        return "replaced"
    change = changes[-1]
    if change.get("change") == "edit":
        return f"edit-frame-{change['frame']:02d}"
    if change.get("change") == "insert":
        return f"insert-after-{change['after']:02d}"
    return "replaced"


def snapshot(folder: Path, reason: str, frames: list[str]) -> Path:
    """Copy ``story.json`` and the given frame images into a new ``history/NNN-reason/`` folder."""
    history = folder / HISTORY_DIR
    history.mkdir(exist_ok=True)
    number = 1 + max(
        (int(p.name.split("-")[0]) for p in history.iterdir() if p.name.split("-")[0].isdigit()), default=0
    )
    target = history / f"{number:03d}-{reason}"
    (target / FRAMES_DIR).mkdir(parents=True)
    shutil.copy2(folder / STORY_JSON_NAME, target / STORY_JSON_NAME)
    for relative in frames:
        if (folder / relative).is_file():
            shutil.copy2(folder / relative, target / relative)
    return target


# --------------------------------------------------------------------------------------------
# Storyboards
# --------------------------------------------------------------------------------------------


def write_storyboard(folder: Path, story: Story) -> None:
    """``storyboard.html`` (one self-contained file) and ``storyboard.png`` (a contact sheet)."""
    images = [embedded_jpeg(frame.image) for frame in story.frames]
    atomic_write_text(folder / STORYBOARD_HTML, storyboard_html(story, images))
    atomic_save_image(folder / STORYBOARD_PNG, contact_sheet(story))


def embedded_jpeg(image: Image.Image) -> str:
    """A data URI, so the storyboard opens anywhere as a single file, moved or mailed."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=EMBEDDED_JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def storyboard_html(story: Story, images: list[str]) -> str:
    """Each frame (embedded; a link to its full PNG) with its number, story caption and description."""
    title = html.escape(story.frames[0].story_caption if story.frames else "story")
    panels = []
    for frame, image in zip(story.frames, images, strict=True):
        description = html.escape(frame.description or "")
        link = html.escape(frame_file(frame.index))
        panels.append(
            f'<figure class="panel {frame.source}">'
            f'<a href="{link}"><img src="{image}" alt="frame {frame.index}: {description}"></a>'
            f'<figcaption><span class="index">{frame.index}</span> '
            f'<p class="caption">{html.escape(frame.story_caption)}</p>'
            f'<p class="description">{description}</p>'
            f'<p class="source">{frame.source}</p></figcaption></figure>'
        )
    seed = html.escape(str(story.metadata.get("seed", "")))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; background: #f4f1ea; color: #222; margin: 2rem; }}
main {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); gap: 1.5rem; }}
.panel {{ margin: 0; background: #fff; border-radius: 8px; box-shadow: 0 1px 4px #0002; overflow: hidden; }}
.panel img {{ width: 100%; display: block; image-rendering: pixelated; }}
figcaption {{ padding: 0.6rem 0.8rem; }}
.index {{ font-weight: bold; color: #888; }}
.caption {{ font-size: 1.05rem; margin: 0.2rem 0; }}
.description {{ color: #666; font-style: italic; margin: 0.2rem 0; }}
.source {{ color: #aaa; font-size: 0.8rem; margin: 0; }}
</style></head>
<body><h1>{title}</h1><p class="meta">{len(story.frames)} frames (0 is the seed), seed {seed}</p>
<main>
{chr(10).join(panels)}
</main></body></html>
"""


def contact_sheet(story: Story) -> Image.Image:
    """Every frame in a grid, each labelled with its number and the start of its story caption."""
    count = len(story.frames)
    columns = min(SHEET_COLUMNS, count)
    rows = (count + columns - 1) // columns
    cell_height = SHEET_TILE + SHEET_LABEL_HEIGHT
    sheet = Image.new(
        "RGB",
        (columns * (SHEET_TILE + SHEET_GAP) + SHEET_GAP, rows * (cell_height + SHEET_GAP) + SHEET_GAP),
        "white",
    )
    draw = ImageDraw.Draw(sheet)
    for frame in story.frames:
        row, column = divmod(frame.index, columns)
        left, top = SHEET_GAP + column * (SHEET_TILE + SHEET_GAP), SHEET_GAP + row * (cell_height + SHEET_GAP)
        tile = frame.image.convert("RGB").resize((SHEET_TILE, SHEET_TILE), Image.Resampling.NEAREST)
        sheet.paste(tile, (left, top))
        draw.text((left, top + SHEET_TILE + 4), f"{frame.index}. {frame.story_caption}"[:42], fill="black")
    return sheet
