"""The captioners' training data, built from VIST exactly as the source paper did.

For each usable story and each k in 0..n-2, two LLaVA conversation samples share frame k's image:

* ``story_next.json``: image k + story caption k  ->  story caption k+1
* ``description.json``: image k + story captions k and k+1  ->  description (DII) of frame k+1
* ``caption.json``: image k  ->  its own description (pretraining a captioner base from scratch)

Images are written once per photo as ``images/{photo_id}.jpg``, RGB, resized to a square.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from pipeline.config import DataConfig
from pipeline.data.vist import VistStory, load_vist_split
from pipeline.io import atomic_save_image, atomic_write_json
from pipeline.prompts import PromptTemplates, llava_human_turn

STORY_NEXT_FILE = "story_next.json"
DESCRIPTION_FILE = "description.json"
CAPTION_FILE = "caption.json"  # image k -> its own description: pretraining a base from scratch
IMAGES_SUBDIR = "images"
REPORT_FILE = "prepare_report.json"


@dataclass
class PrepareReport:
    usable_stories: int = 0
    samples: dict[str, int] = field(default_factory=dict)  # file name -> samples written
    images_written: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> stories dropped
    drop_lines: list[str] = field(default_factory=list)


def conversation(sample_id: str, image_name: str, question: str, answer: str) -> dict[str, Any]:
    """One sample in LLaVA's conversation format."""
    return {
        "id": sample_id,
        "image": image_name,
        "conversations": [
            {"from": "human", "value": llava_human_turn(question)},
            {"from": "gpt", "value": answer},
        ],
    }


def story_samples(story: VistStory, prompts: PromptTemplates) -> tuple[list[dict], list[dict], list[dict]]:
    """The story_next, description and caption samples of one story (k = 0 .. n-2)."""
    story_next, description, caption = [], [], []
    for k in range(len(story.frames) - 1):
        current, upcoming = story.frames[k], story.frames[k + 1]
        sample_id, image_name = f"{story.story_id}_{k}", f"{current.photo_id}.jpg"
        story_next.append(
            conversation(
                sample_id,
                image_name,
                prompts.story_next_question(current.story_caption),
                upcoming.story_caption,
            )
        )
        description.append(
            conversation(
                sample_id,
                image_name,
                prompts.description_question(
                    previous_caption=current.story_caption, current_caption=upcoming.story_caption
                ),
                upcoming.description,
            )
        )
        caption.append(conversation(sample_id, image_name, prompts.caption_question(), current.description))
    return story_next, description, caption


def prepare_llava(
    vist_dir: str | Path,
    split: str,
    out: str | Path,
    data_cfg: DataConfig,
    limit: int | None = None,
    prompts: PromptTemplates | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PrepareReport:
    """Write ``out/{story_next,description,caption}.json`` and ``out/images/``; return what was written and dropped.

    ``limit`` keeps the first N usable stories in ``story_id`` order. ``progress(done, total)`` is called
    after each usable story (for a progress bar). Reruns with the same arguments write identical files.
    """
    out = Path(out)
    prompts = prompts or PromptTemplates.load()

    # 1. Group and check the split (JSON only; images are decoded lazily below).
    vist = load_vist_split(vist_dir, split, story_length=data_cfg.story_length)

    # 2. Decode each usable story's images, write the ones the samples use, build the samples.
    story_next: list[dict] = []
    description: list[dict] = []
    caption: list[dict] = []
    written_photos: set[str] = set()
    usable = 0
    total = len(vist.stories) if limit is None else min(limit, len(vist.stories))
    for story, images in vist.iter_usable(limit=limit):
        usable += 1
        next_samples, description_samples, caption_samples = story_samples(story, prompts)
        story_next += next_samples
        description += description_samples
        caption += caption_samples
        used_photos = {sample["image"] for sample in next_samples}
        for frame, image in zip(story.frames, images, strict=True):
            image_name = f"{frame.photo_id}.jpg"
            if image_name in used_photos and frame.photo_id not in written_photos:
                square = image.resize((data_cfg.image_size, data_cfg.image_size), Image.Resampling.BICUBIC)
                atomic_save_image(out / IMAGES_SUBDIR / image_name, square, quality=data_cfg.jpeg_quality)
                written_photos.add(frame.photo_id)
        if progress is not None:
            progress(usable, total)

    if progress is not None:  # stories dropped while decoding shrink the total seen by the bar
        progress(usable, usable)

    # 3. Write the sample files (atomically, deterministic JSON).
    atomic_write_json(out / STORY_NEXT_FILE, story_next)
    atomic_write_json(out / DESCRIPTION_FILE, description)
    atomic_write_json(out / CAPTION_FILE, caption)

    report = PrepareReport(
        usable_stories=usable,
        samples={
            STORY_NEXT_FILE: len(story_next),
            DESCRIPTION_FILE: len(description),
            CAPTION_FILE: len(caption),
        },
        images_written=len(written_photos),
        dropped={reason: count for reason, count in vist.drop_counts().items() if count},
        drop_lines=vist.drop_report(),
    )
    atomic_write_json(out / REPORT_FILE, {"split": split, "limit": limit, **report.__dict__})
    return report
