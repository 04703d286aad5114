"""A story's two storyboards: ``storyboard.html`` (one self-contained file) and ``storyboard.png`` (a contact
sheet). Both are derived from the story alone, so they can be redrawn at any time."""

from __future__ import annotations

import base64
import html
import io

from PIL import Image, ImageDraw

from pipeline.story import Story, frame_file

STORYBOARD_HTML = "storyboard.html"
STORYBOARD_PNG = "storyboard.png"
SHEET_TILE = 256  # contact-sheet tile side, pixels
SHEET_COLUMNS = 5
SHEET_GAP = 8
SHEET_LABEL_HEIGHT = 20
EMBEDDED_JPEG_QUALITY = 90


def storyboard_files(story: Story) -> dict[str, bytes]:
    """``{file name: contents}`` of both storyboards, for the story folder to write."""
    images = [embedded_jpeg(frame.image) for frame in story.frames]
    sheet = io.BytesIO()
    contact_sheet(story).save(sheet, format="PNG")
    return {STORYBOARD_HTML: storyboard_html(story, images).encode("utf-8"), STORYBOARD_PNG: sheet.getvalue()}


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
