"""A story folder a person can open::

    story.json            # the story (see pipeline.story), with timings and the seed in its metadata
    config.yaml           # the resolved config it was made with
    frames/frame_00.png   # one image per frame
    storyboard.html       # every frame with its story caption and description; opens with no server
    storyboard.png        # a contact sheet
    history/NNN-.../      # what an edit or an insertion replaced (story.json and the replaced frames)

Every file is written atomically.
"""

from __future__ import annotations

import base64
import html
import io
import os
import shutil
from pathlib import Path

from PIL import Image, ImageDraw

from pipeline.io import atomic_save_image, atomic_write_text
from pipeline.story import STORY_JSON_NAME, Story

FRAMES_DIR = "frames"
HISTORY_DIR = "history"
STORYBOARD_HTML = "storyboard.html"
STORYBOARD_PNG = "storyboard.png"
SHEET_TILE = 256  # contact-sheet tile side, pixels
SHEET_COLUMNS = 5
SHEET_GAP = 8
SHEET_LABEL_HEIGHT = 20
EMBEDDED_JPEG_QUALITY = 90


def frame_path(index: int) -> str:
    """A frame's image path, relative to the story folder."""
    return f"{FRAMES_DIR}/frame_{index:02d}.png"


def save_frame_image(folder: Path, index: int, image: Image.Image) -> str:
    relative = frame_path(index)
    atomic_save_image(folder / relative, image.convert("RGB"))
    return relative


def save_staged_image(folder: Path, image: Image.Image) -> str:
    """A frame image under a temporary name in ``frames/``, until :func:`renumber_frames` names it."""
    relative = f"{FRAMES_DIR}/.staged.png"
    atomic_save_image(folder / relative, image.convert("RGB"))
    return relative


def load_frame_image(folder: Path, relative: str) -> Image.Image:
    from pipeline.io import load_rgb

    return load_rgb(folder / relative)


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


def renumber_frames(folder: Path, story: Story) -> None:
    """Give every frame the file name of its index (after an insertion), via a staging folder."""
    staging = folder / f".{FRAMES_DIR}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for frame in story.frames:
        source = folder / frame.image
        target = staging / Path(frame_path(frame.index)).name
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)
        frame.image = frame_path(frame.index)
    old = folder / f".{FRAMES_DIR}.old"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(folder / FRAMES_DIR, old)
    os.replace(staging, folder / FRAMES_DIR)
    shutil.rmtree(old)


def write_storyboard(folder: Path, story: Story) -> None:
    """``storyboard.html`` (one self-contained file) and ``storyboard.png`` (a contact sheet)."""
    images = {frame.image: embedded_jpeg(load_frame_image(folder, frame.image)) for frame in story.frames}
    atomic_write_text(folder / STORYBOARD_HTML, storyboard_html(story, images))
    atomic_save_image(folder / STORYBOARD_PNG, contact_sheet(folder, story))


def embedded_jpeg(image: Image.Image) -> str:
    """A data URI, so the storyboard opens anywhere as a single file, moved or mailed."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=EMBEDDED_JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def storyboard_html(story: Story, images: dict[str, str]) -> str:
    """Each frame (embedded; a link to its full PNG) with its story caption and description."""
    title = html.escape(story.frames[0].story_caption if story.frames else "story")
    panels = []
    for frame in story.frames:
        description = html.escape(frame.description or "")
        panels.append(
            f'<figure class="panel {frame.source}">'
            f'<a href="{html.escape(frame.image)}"><img src="{images[frame.image]}" alt="frame {frame.index}: {description}"></a>'
            f'<figcaption><span class="index">{frame.index + 1}</span> '
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
<body><h1>{title}</h1><p class="meta">{len(story.frames)} frames, seed {seed}</p>
<main>
{chr(10).join(panels)}
</main></body></html>
"""


def contact_sheet(folder: Path, story: Story) -> Image.Image:
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
        tile = load_frame_image(folder, frame.image).resize(
            (SHEET_TILE, SHEET_TILE), Image.Resampling.NEAREST
        )
        sheet.paste(tile, (left, top))
        draw.text(
            (left, top + SHEET_TILE + 4), f"{frame.index + 1}. {frame.story_caption}"[:42], fill="black"
        )
    return sheet
