"""`storypipe eval`: the metric tables of both source papers, with their baselines, from one command.

The tables' rows are the records of :mod:`eval.rows`: each says which system produces it, from what, and
what it is scored against. For every usable story of the split (in ``story_id`` order), every row that
``eval.rows`` selects and whose model is configured produces one text or one frame for each of frames
1..n-1, and each is scored per frame. Per-story outputs are cached under ``OUT/cache/`` (:mod:`eval.cache`),
each row's under the key of what produced it (settings, model folders, seed, the story's inputs), so a
crashed run resumes where it stopped and a rerun only produces the rows a cached story lacks or holds
under another key; under ``accelerate launch`` each process takes every n-th story and the main process
merges. Models load phase by phase (:mod:`eval.phases`): each phase's models produce their rows for every
story and are released before the next phase loads; the measuring models load last, to score. Generated
frames are kept under ``OUT/images/{row key}/``, the autoregressive stories as story folders under
``OUT/stories/``. On ShapeStories the rows scored against the descriptions also get referential scores
(:mod:`eval.referential_metrics`): does a description name the characters that the next story caption
only calls "he", "she" or "they"?
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from PIL import Image

from eval.cache import (
    AR_DESCRIPTIONS,
    KEYS,
    RowKeys,
    cache_path,
    current_outputs,
    drop_stale,
    new_record,
    read_record,
    row_keys,
)
from eval.config import EvalConfig
from eval.phases import EVAL_PHASES, EvalPhase, eval_phases, release_memory
from eval.report import write_results
from eval.rows import IMAGE_ROWS, TEXT_ROWS, ImageRow, Row, TextRow, select_rows
from eval.scoring import Measures, score_images, score_intrinsic, score_text
from pipeline.data.vist import VistStory, load_vist_split
from pipeline.errors import DataError, StorypipeError
from pipeline.io import atomic_save_image, atomic_write_json
from pipeline.orchestrator import FrameIllustrator, StoryCaptioner
from pipeline.seeds import derive_seed
from pipeline.story import PLAIN_NAME, PLAIN_NAME_RULE

IMAGES_DIR = "images"
STORIES_DIR = "stories"  # the autoregressive stories, as story folders a person can open


# --------------------------------------------------------------------------------------------
# What the evaluation runs: small interfaces, implemented by the stages and wired in storypipe.wiring
# --------------------------------------------------------------------------------------------


@dataclass
class StoryFrames:
    captions: list[str]
    descriptions: list[str]
    images: list[Image.Image]


@dataclass
class EvalModels:
    """The systems under test; any may be None, and its rows are then skipped."""

    captioners: StoryCaptioner | None = None  # the story loop's interface: the batched calls
    illustrator: FrameIllustrator | None = None
    # A frame generator with Make-A-Story's memory attention instead of StoryGen's context branch.
    memory_illustrator: FrameIllustrator | None = None
    # The whole pipeline from a seed frame: (story folder, seed image, seed caption, frames, seed) -> the story.
    tell_story: Callable[[Path, Image.Image, str, int, int], StoryFrames] | None = None
    caption_baseline: Callable[[Sequence[Image.Image]], list[str]] | None = None
    text_baseline: Callable[[Sequence[str]], str] | None = None  # previous captions -> the next one

    def has(self, row: Row) -> bool:
        """Whether the model ``row`` needs is here (the ground-truth row needs none)."""
        return row.model is None or getattr(self, row.model) is not None

    @property
    def systems(self) -> frozenset[str]:
        """The names of the systems that are here."""
        return frozenset(f.name for f in fields(self) if getattr(self, f.name) is not None)

    def only(self, systems: Collection[str]) -> EvalModels:
        """The same models with only ``systems`` kept (the others None)."""
        return EvalModels(**{name: getattr(self, name) for name in self.systems & set(systems)})


@dataclass(frozen=True)
class PhasedModels:
    """The systems under test and the measuring models, each group loaded only for its phase
    (:mod:`eval.phases`) and dropped after it.

    ``systems`` names the configured systems (:class:`EvalModels` fields), known before anything loads:
    only their rows are produced. ``loaders`` maps each generating phase's name to a callable that loads
    that phase's systems afresh and returns them as an :class:`EvalModels`; ``load_measures`` loads the
    scoring phase's models (called on the main process only). The runner keeps no reference to what a
    loader returned once its phase is over, so a loader must not keep one either.
    """

    systems: frozenset[str]
    loaders: Mapping[str, Callable[[], EvalModels]]
    load_measures: Callable[[], Measures | None]

    @classmethod
    def loaded(cls, models: EvalModels, measures: Measures | None) -> PhasedModels:
        """Models that are all loaded already: every phase's loader hands out its share of them."""
        return cls(
            systems=models.systems,
            loaders={phase.name: lambda phase=phase: models.only(phase.systems) for phase in EVAL_PHASES},
            load_measures=lambda: measures,
        )


# --------------------------------------------------------------------------------------------
# Per-story generation (cached)
# --------------------------------------------------------------------------------------------


def select_stories(
    data_dir: Path, cfg: EvalConfig, story_length: int
) -> list[tuple[VistStory, list[Image.Image]]]:
    split = load_vist_split(data_dir, cfg.split, story_length=story_length)
    stories = list(split.iter_usable(limit=cfg.max_stories))
    for story, _ in stories:  # each id names files and folders under OUT: it must not lead out of it
        if not PLAIN_NAME.fullmatch(story.story_id):
            raise DataError(
                f"split {cfg.split!r} of {data_dir}: story_id {story.story_id!r} is not a plain name "
                f"({PLAIN_NAME_RULE}); the eval names its files after story ids"
            )
    if not stories:
        raise DataError(
            f"no usable story in split {cfg.split!r} of {data_dir}"
            + (": " + "; ".join(split.drop_report()) if split.drop_report() else "")
        )
    return stories


def wanted_rows(systems: Collection[str], cfg: EvalConfig) -> list[Row]:
    """The rows this run produces and scores: those ``cfg.rows`` selects whose system is among
    ``systems`` (the configured ones), and the ground truth."""
    rows = select_rows((*TEXT_ROWS, *IMAGE_ROWS), cfg.rows)
    return [row for row in rows if row.model is None or row.model in systems]


def rows_to_generate(record: dict, systems: Collection[str], cfg: EvalConfig) -> list[Row]:
    """The :func:`wanted_rows` of ``systems`` whose outputs ``record`` lacks."""
    wanted = wanted_rows(systems, cfg)
    missing = [row for row in wanted if row.key not in record[row.table]]
    if any(row.autoregressive for row in missing):  # one told story feeds them all: tell it again for all
        missing += [row for row in wanted if row.autoregressive and row not in missing]
    return missing


def generate_story_outputs(
    story: VistStory,
    images: list[Image.Image],
    models: EvalModels,
    cfg: EvalConfig,
    out: Path,
    record: dict | None = None,
    keys: RowKeys | None = None,
) -> dict:
    """Add to ``record`` (a new one when None) the outputs of :func:`rows_to_generate`'s rows for one story,
    each with its key from ``keys`` (:func:`eval.cache.row_keys`; None records none).

    Frames are saved under ``out`` and their paths recorded; the told story's folder is written afresh.
    Seeds come from ``derive_seed(cfg.seed, ...)`` and the story id, so each story draws its own noise;
    frame k of every frame generator's row has the same seed, so those rows differ only in what they are
    conditioned on.
    """
    record = record if record is not None else new_record(story.story_id)
    rows = rows_to_generate(record, models.systems, cfg)
    captions = [frame.story_caption for frame in story.frames]
    prompts = {"story_captions": captions, "descriptions": [frame.description for frame in story.frames]}
    n = len(story.frames)

    def save(row: ImageRow, k: int, image: Image.Image) -> str:
        path = out / IMAGES_DIR / row.key / f"{story.story_id}_{k}.png"
        atomic_save_image(path, image.convert("RGB"))
        return str(path.relative_to(out))

    told = None
    if any(row.autoregressive for row in rows):  # the whole pipeline, from the seed frame
        # Told with the seed eval.seed, as `storypipe generate --seed` would tell it; the story loop derives
        # each frame's seeds from it. A story told before (under another key) is removed, not mixed in.
        folder = out / STORIES_DIR / story.story_id
        shutil.rmtree(folder, ignore_errors=True)
        told = models.tell_story(folder, images[0], captions[0], n, cfg.seed)
        record[AR_DESCRIPTIONS] = told.descriptions[1:]

    for row in rows:
        if isinstance(row, TextRow) and row.autoregressive:
            record["text"][row.key] = told.captions[1:]
        elif isinstance(row, TextRow):
            seed = derive_seed(cfg.seed, row.key, story.story_id)
            record["text"][row.key] = predict_next_texts(row, models, images, captions, seed)
        elif row.ground_truth:  # absolute paths: --data may be relative
            record["images"][row.key] = [str(Path(frame.image_path).resolve()) for frame in story.frames[1:]]
        elif row.autoregressive:
            record["images"][row.key] = [save(row, k, told.images[k]) for k in range(1, n)]
        else:
            seeds = [derive_seed(cfg.seed, "frame", story.story_id, k) for k in range(n)]
            drawn = draw_frames(row, getattr(models, row.model), images, prompts[row.prompts], seeds)
            record["images"][row.key] = [save(row, k, image) for k, image in enumerate(drawn, start=1)]
        if keys is not None:
            record[KEYS][row.table][row.key] = keys[row.table][row.key]
    return record


def draw_frames(
    row: ImageRow,
    illustrator: FrameIllustrator,
    images: list[Image.Image],
    prompts: list[str],
    seeds: list[int],
) -> list[Image.Image]:
    """A frame generator's row: frames 1..n-1, frame k from ``prompts[k]`` and ``seeds[k]``, with the GT
    frames before k (at most ``illustrator.max_references``) and their prompts as references, or none."""
    frames = []
    for k in range(1, len(images)):
        start = max(0, k - illustrator.max_references) if row.gt_references else k
        result = illustrator.generate(prompts[k], images[start:k], prompts[start:k], seed=seeds[k])
        frames.append(result.image)
    return frames


def predict_next_texts(
    row: TextRow, models: EvalModels, images: list[Image.Image], captions: list[str], seed: int
) -> list[str]:
    """A non-autoregressive text row's predictions for frames 1..n-1: frame k+1's text from GT frame k."""
    seeds = [seed] * (len(images) - 1)  # every row draws from the story's seed
    if row.model == "captioners" and row.reference == "dii":  # the description captioner also reads SIS k+1
        return models.captioners.describe_batch(images[:-1], captions[:-1], captions[1:], seeds=seeds)
    if row.model == "captioners":
        return models.captioners.next_story_captions(images[:-1], captions[:-1], seeds=seeds)
    if row.model == "caption_baseline":
        return models.caption_baseline(images[:-1])
    if row.model == "text_baseline":
        return [models.text_baseline(captions[: k + 1]) for k in range(len(captions) - 1)]
    raise ValueError(f"text row {row.key!r}: no code predicts texts with model {row.model!r}")


def story_keys(
    stories: list[tuple[VistStory, list[Image.Image]]],
    systems: Collection[str],
    cfg: EvalConfig,
    identities: Mapping[str, Any],
) -> dict[str, RowKeys]:
    """Each story's :func:`wanted_rows` keys, by story id; ``identities`` says what determines each
    model's outputs (:func:`storypipe.wiring.eval_identities`)."""
    rows = wanted_rows(systems, cfg)
    return {story.story_id: row_keys(story, rows, identities, cfg.seed) for story, _ in stories}


def run_generation(
    stories: list[tuple[VistStory, list[Image.Image]]],
    models: PhasedModels,
    cfg: EvalConfig,
    out: Path,
    keys: Mapping[str, RowKeys],
    process_index: int = 0,
    num_processes: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Generate each of this process's stories, or only the rows its cached record lacks or holds under
    another key than ``keys`` (:func:`story_keys`) gives it, phase by phase (:mod:`eval.phases`).

    First every stale output is dropped from its record (and the record written), before any file is
    overwritten. Then each generating phase whose rows some story lacks loads its models, produces those
    rows story by story (each record written as it is done), and releases its models before the next
    phase loads; a phase with nothing to produce loads nothing. ``progress`` counts (phase, story) steps.
    """
    mine = stories[process_index::num_processes]
    rows, records = wanted_rows(models.systems, cfg), {}
    for story, _ in mine:
        path = cache_path(out, story.story_id)
        record = read_record(path, story) or new_record(story.story_id)
        if drop_stale(record, rows, keys[story.story_id]):
            atomic_write_json(path, record)  # before any of their files is overwritten
        records[story.story_id] = record

    phases = [phase for phase in eval_phases(models.systems, cfg.rows) if not phase.scoring]
    total, done = len(phases) * len(mine), 0
    for phase in phases:
        systems = models.systems & set(phase.systems)
        pending = [(s, images) for s, images in mine if rows_to_generate(records[s.story_id], systems, cfg)]
        done += len(mine) - len(pending)  # cached: nothing to do
        if progress is not None:
            progress(done, total)
        if not pending:
            continue
        loaded = load_phase(models, phase)
        for story, images in pending:
            record = generate_story_outputs(
                story, images, loaded, cfg, out, records[story.story_id], keys[story.story_id]
            )
            atomic_write_json(cache_path(out, story.story_id), record)
            done += 1
            if progress is not None:
                progress(done, total)
        del loaded  # the phase's models: freed before the next phase loads its own
        release_memory()


def load_phase(models: PhasedModels, phase: EvalPhase) -> EvalModels:
    """The systems of ``phase`` that are configured, freshly loaded by its loader (and only those)."""
    if phase.name not in models.loaders:
        raise ValueError(f"eval phase {phase.name!r}: no loader for its systems {', '.join(phase.systems)}")
    loaded = models.loaders[phase.name]().only(phase.systems)
    wanted = models.systems & set(phase.systems)
    if loaded.systems != wanted:
        raise ValueError(
            f"eval phase {phase.name!r}: its loader gave {sorted(loaded.systems)}, not {sorted(wanted)}"
        )
    return loaded


def load_records(
    stories: list[tuple[VistStory, list[Image.Image]]], out: Path, keys: Mapping[str, RowKeys]
) -> list[dict]:
    """Every story's cached record, with only the outputs cached under ``keys`` (:func:`story_keys`)."""
    records = []
    for story, _ in stories:
        path = cache_path(out, story.story_id)
        record = read_record(path, story)
        if record is None:
            raise StorypipeError(
                f"{path} is missing: a process did not finish; rerun the same command to complete it"
            )
        current = current_outputs(record, keys[story.story_id])
        lacking = [
            row for table, rows in keys[story.story_id].items() for row in rows if row not in current[table]
        ]
        if lacking:
            raise StorypipeError(
                f"{path} lacks rows {', '.join(lacking)} as this run's settings make them: a process did not "
                "finish, or ran with other settings; rerun the same command to complete it"
            )
        records.append(current)
    return records


def check_record_images(records: list[dict], out: Path, rows: Sequence[ImageRow] = IMAGE_ROWS) -> None:
    """Every frame of ``rows`` a record names must exist (a clear error if the folder was tampered with)."""
    for record in records:
        for row in rows:
            for path in record["images"].get(row.key, []):
                full = Path(path) if Path(path).is_absolute() else out / path
                if not full.is_file():
                    raise DataError(
                        f"story {record['story_id']}, row {row.key}: frame {full} is missing; delete "
                        f"{cache_path(out, record['story_id'])} and rerun to regenerate it"
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
    *,
    identities: Mapping[str, Any],
) -> dict | None:
    """:func:`evaluate_in_phases` with every model loaded already (``models``; ``measures`` on the main
    process): the same rows, cache and results, for models that fit the device together."""
    return evaluate_in_phases(
        stories, data_dir, out, cfg, PhasedModels.loaded(models, measures),
        process_index, num_processes, wait_for_everyone, progress, identities=identities,
    )  # fmt: skip


def evaluate_in_phases(
    stories: list[tuple[VistStory, list[Image.Image]]],
    data_dir: Path,
    out: Path,
    cfg: EvalConfig,
    models: PhasedModels,
    process_index: int = 0,
    num_processes: int = 1,
    wait_for_everyone: Callable[[], None] = lambda: None,
    progress: Callable[[int, int], None] | None = None,
    *,
    identities: Mapping[str, Any],
) -> dict | None:
    """Generate (sharded, cached, phase by phase), then on the main process load the measuring models,
    score and write the results.

    ``stories`` come from :func:`select_stories`; ``models`` loads each phase's models when the phase has
    something to do (:func:`run_generation`), the measuring models last and on the main process only;
    ``identities`` says what determines each model's outputs (:func:`storypipe.wiring.eval_identities`),
    part of every cached output's key. Only the rows ``cfg.rows`` selects whose model is configured are
    scored, each from outputs cached under its current key, also when the cache holds others.
    """
    # 1. Each process generates its share; what a cached story holds under the same key is reused.
    keys = story_keys(stories, models.systems, cfg, identities)
    run_generation(stories, models, cfg, out, keys, process_index, num_processes, progress)
    wait_for_everyone()
    if process_index != 0:
        return None
    # 2. Merge and check (before the measuring models load), then score and write.
    records = load_records(stories, out, keys)
    text_rows, image_rows = select_rows(TEXT_ROWS, cfg.rows), select_rows(IMAGE_ROWS, cfg.rows)
    check_record_images(records, out, image_rows)
    vist_stories = [story for story, _ in stories]
    measures = models.load_measures()
    results = {
        "data": str(data_dir),
        "split": cfg.split,
        "stories": len(stories),
        "fid_resize": cfg.fid_resize,
        "kl_epsilon": cfg.kl_epsilon,
        "text": score_text(records, vist_stories, measures, text_rows),
        "images": score_images(records, vist_stories, measures, out, image_rows),
        "intrinsic": score_intrinsic(records, vist_stories, measures, text_rows),
    }
    del measures
    release_memory()
    write_results(results, out)
    return results
