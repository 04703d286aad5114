"""`storypipe eval`: the metric tables of both source papers, with their baselines, from one command.

For every usable story of the split (in ``story_id`` order), each *method* produces captions and/or
frames, and each is scored per frame; per-story results are cached under ``OUT/cache/``, so a crashed
run resumes where it stopped, and under ``accelerate launch`` each process takes every n-th story and
the main process merges. Generated frames are kept under ``OUT/images/{method}/``.

Text methods (predicting story caption k+1, or the description of frame k+1, from frame k):
  ours_story_next   story captioner: GT image k + GT caption k            vs SIS k+1
  ours_description  description captioner: GT image k + SIS k, SIS k+1    vs DII k+1
  ours_ar           the whole pipeline's captions, from the seed frame    vs SIS k
  caption_baseline  an off-the-shelf image-to-text model on GT image k    vs SIS k+1 (the paper's BLIP row)
  text_baseline     a causal LM given the previous GT captions            vs SIS k+1 (the paper's MPT row)
Image methods (frames 1..n-1; the seed frame is GT):
  gt                         the ground-truth frames themselves
  sd_no_context              descriptions, no reference frames (independent SD)
  story_captions_no_context  story captions as prompts, no references (the key ablation)
  story_captions_refs        story captions + reference conditioning
  ours_non_ar                descriptions + GT reference frames
  ours_ar                    the whole pipeline from the seed frame
  memory_story_captions_refs story captions + GT references, Make-A-Story's memory-attention generator
  memory_non_ar              descriptions + GT references, the memory-attention generator
The two memory rows need ``eval.memory_generator_model``. On ShapeStories, ``ours_description`` also gets
referential scores (:mod:`eval.referential_metrics`): does a description name the characters that the
next story caption only calls "he", "she" or "they"?
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from eval.config import EvalConfig
from eval.report import write_results
from eval.scoring import IMAGE_METHODS as IMAGE_METHODS  # re-exported: the image methods, in table order
from eval.scoring import Measures, score_images, score_intrinsic, score_text
from pipeline.data.vist import VistStory, load_vist_split
from pipeline.errors import DataError, StorypipeError
from pipeline.io import atomic_save_image, atomic_write_json
from pipeline.orchestrator import FrameIllustrator

CACHE_DIR = "cache"
IMAGES_DIR = "images"
STORIES_DIR = "stories"  # the autoregressive stories, as story folders a person can open
TEXT_METHODS = ("ours_story_next", "ours_description", "ours_ar", "caption_baseline", "text_baseline")


# --------------------------------------------------------------------------------------------
# What the evaluation runs: small interfaces, implemented by the stages and wired in storypipe.wiring
# --------------------------------------------------------------------------------------------


class Captioners(Protocol):
    def next_story_captions(
        self, images: Sequence[Image.Image], captions: Sequence[str], seed: int | None = None
    ) -> list[str]: ...

    def describe_batch(
        self,
        images: Sequence[Image.Image],
        current: Sequence[str],
        upcoming: Sequence[str],
        seed: int | None = None,
    ) -> list[str]: ...


@dataclass
class StoryFrames:
    captions: list[str]
    descriptions: list[str]
    images: list[Image.Image]


@dataclass
class EvalModels:
    """The systems under test; any may be None, and its rows are then skipped."""

    captioners: Captioners | None = None
    illustrator: FrameIllustrator | None = None
    # A frame generator with Make-A-Story's memory attention instead of StoryGen's context branch.
    memory_illustrator: FrameIllustrator | None = None
    # The whole pipeline from a seed frame: (story folder, seed image, seed caption, frames, seed) -> the story.
    tell_story: Callable[[Path, Image.Image, str, int, int], StoryFrames] | None = None
    caption_baseline: Callable[[Sequence[Image.Image]], list[str]] | None = None
    text_baseline: Callable[[Sequence[str]], str] | None = None  # previous captions -> the next one


# --------------------------------------------------------------------------------------------
# Per-story generation (cached)
# --------------------------------------------------------------------------------------------


def select_stories(
    data_dir: Path, cfg: EvalConfig, story_length: int
) -> list[tuple[VistStory, list[Image.Image]]]:
    split = load_vist_split(data_dir, cfg.split, story_length=story_length)
    stories = list(split.iter_usable(limit=cfg.max_stories))
    if not stories:
        raise DataError(
            f"no usable story in split {cfg.split!r} of {data_dir}"
            + (": " + "; ".join(split.drop_report()) if split.drop_report() else "")
        )
    return stories


def generate_story_outputs(
    story: VistStory, images: list[Image.Image], models: EvalModels, cfg: EvalConfig, out: Path
) -> dict:
    """Everything each method produces for one story; frames are saved, paths recorded."""
    captions = [frame.story_caption for frame in story.frames]
    descriptions = [frame.description for frame in story.frames]
    n = len(story.frames)
    record: dict[str, Any] = {"story_id": story.story_id, "text": {}, "images": {}}

    def save(method: str, k: int, image: Image.Image) -> str:
        path = out / IMAGES_DIR / method / f"{story.story_id}_{k}.png"
        atomic_save_image(path, image.convert("RGB"))
        return str(path.relative_to(out))

    # 1. Text, non-autoregressive: frame k predicts k+1.
    if models.captioners is not None:
        record["text"]["ours_story_next"] = models.captioners.next_story_captions(
            images[:-1], captions[:-1], seed=cfg.seed
        )
        record["text"]["ours_description"] = models.captioners.describe_batch(
            images[:-1], captions[:-1], captions[1:], seed=cfg.seed
        )
    if models.caption_baseline is not None:
        record["text"]["caption_baseline"] = models.caption_baseline(images[:-1])
    if models.text_baseline is not None:
        record["text"]["text_baseline"] = [models.text_baseline(captions[: k + 1]) for k in range(n - 1)]

    # 2. Images, non-autoregressive: GT previous frames as references.
    record["images"]["gt"] = [
        str(Path(frame.image_path).resolve()) for frame in story.frames[1:]
    ]  # absolute: --data may be relative
    # method -> (illustrator, prompts, with GT references)
    variants: dict[str, tuple[FrameIllustrator, list[str], bool]] = {}
    if models.illustrator is not None:
        variants["sd_no_context"] = (models.illustrator, descriptions, False)
        variants["story_captions_no_context"] = (models.illustrator, captions, False)
        variants["story_captions_refs"] = (models.illustrator, captions, True)
        variants["ours_non_ar"] = (models.illustrator, descriptions, True)
    if models.memory_illustrator is not None:
        variants["memory_story_captions_refs"] = (models.memory_illustrator, captions, True)
        variants["memory_non_ar"] = (models.memory_illustrator, descriptions, True)
    for method, (illustrator, prompts, with_refs) in variants.items():
        paths = []
        for k in range(1, n):
            start = max(0, k - illustrator.max_references) if with_refs else k
            result = illustrator.generate(prompts[k], images[start:k], prompts[start:k], seed=cfg.seed + k)
            paths.append(save(method, k, result.image))
        record["images"][method] = paths

    # 3. The whole pipeline, autoregressive from the seed frame.
    if models.tell_story is not None and "autoregressive" in cfg.image_modes:
        told = models.tell_story(out / STORIES_DIR / story.story_id, images[0], captions[0], n, cfg.seed)
        record["text"]["ours_ar"] = told.captions[1:]
        record["ar_descriptions"] = told.descriptions[1:]
        record["images"]["ours_ar"] = [save("ours_ar", k, told.images[k]) for k in range(1, n)]
    return record


def run_generation(
    stories: list[tuple[VistStory, list[Image.Image]]],
    models: EvalModels,
    cfg: EvalConfig,
    out: Path,
    process_index: int = 0,
    num_processes: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Generate (or reuse from the cache) each of this process's stories."""
    mine = stories[process_index::num_processes]
    for done, (story, images) in enumerate(mine, start=1):
        cached = out / CACHE_DIR / f"{story.story_id}.json"
        if not cached.is_file():
            atomic_write_json(cached, generate_story_outputs(story, images, models, cfg, out))
        if progress is not None:
            progress(done, len(mine))


def load_records(stories: list[tuple[VistStory, list[Image.Image]]], out: Path) -> list[dict]:
    records = []
    for story, _ in stories:
        path = out / CACHE_DIR / f"{story.story_id}.json"
        if not path.is_file():
            raise StorypipeError(
                f"{path} is missing: a process did not finish; rerun the same command to complete it"
            )
        records.append(json.loads(path.read_text()))
    return records


def check_record_images(records: list[dict], out: Path) -> None:
    """Every frame a record names must exist (a clear error if the folder was tampered with or moved)."""
    for record in records:
        for method, paths in record["images"].items():
            for path in paths:
                full = Path(path) if Path(path).is_absolute() else out / path
                if not full.is_file():
                    raise DataError(
                        f"story {record['story_id']}, method {method}: frame {full} is missing; delete "
                        f"{out / CACHE_DIR / (record['story_id'] + '.json')} and rerun to regenerate it"
                    )


# --------------------------------------------------------------------------------------------
# The whole evaluation
# --------------------------------------------------------------------------------------------


def evaluate(
    stories: list[tuple[VistStory, list[Image.Image]]],
    data_dir: Path,
    out: Path,
    cfg: EvalConfig,
    models: EvalModels,
    measures: Measures | None,
    process_index: int = 0,
    num_processes: int = 1,
    wait_for_everyone: Callable[[], None] = lambda: None,
    progress: Callable[[int, int], None] | None = None,
) -> dict | None:
    """Generate (sharded, cached), then on the main process score and write the results.

    ``stories`` come from :func:`select_stories`; ``measures`` is needed on the main process only.
    """
    # 1. Each process generates its share; finished stories are reused from the cache.
    run_generation(stories, models, cfg, out, process_index, num_processes, progress)
    wait_for_everyone()
    if process_index != 0:
        return None
    # 2. Merge, check, score, write.
    records = load_records(stories, out)
    check_record_images(records, out)
    vist_stories = [story for story, _ in stories]
    results = {
        "data": str(data_dir),
        "split": cfg.split,
        "stories": len(stories),
        "fid_resize": cfg.fid_resize,
        "kl_epsilon": cfg.kl_epsilon,
        "text": score_text(records, vist_stories, measures),
        "images": score_images(records, vist_stories, measures, out),
        "intrinsic": score_intrinsic(records, vist_stories, measures),
    }
    write_results(results, out)
    return results
