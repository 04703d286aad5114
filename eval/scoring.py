"""Scoring the cached records into the papers' tables: text, images, intrinsic (see eval/runner.py).

Each table scores the rows it is given (records of :mod:`eval.rows`, in table order) that the records hold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from eval.classification_metrics import background_scores, character_scores
from eval.detector import ObjectCounter
from eval.fid import (
    ClipFeatures,
    fid_warning,
    frechet_distance,
    kernel_inception_distance,
    prepare_for_features,
)
from eval.image_metrics import (
    ClipSimilarity,
    ground_truth_similarity,
    previous_image_similarity,
    total_story_similarity,
)
from eval.referential_metrics import described_labels, referential_scores
from eval.rows import IMAGE_ROWS, SIS_KEY, TEXT_ROWS, ImageRow, TextRow
from eval.text_metrics import SentenceSimilarity, count_pronouns, meteor, top_word_frequencies, word_kl
from pipeline.data.vist import VistFrame, VistStory
from pipeline.io import load_rgb


@dataclass
class Measures:
    """The models the metrics need; the optional ones skip their columns when None."""

    sentence: SentenceSimilarity
    clip: ClipSimilarity
    detector: Any | None = None  # eval.detector.ObjectCounter
    classifier: Any | None = None  # eval.classifier.FrameClassifier
    kl_epsilon: float = 1.0
    fid_resize: str = "full"


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _present(
    records: list[dict], stories: list[VistStory], row: TextRow | ImageRow
) -> list[tuple[dict, VistStory]]:
    """The (record, story) pairs whose record holds ``row``'s outputs."""
    return [
        (record, story)
        for record, story in zip(records, stories, strict=True)
        if row.key in record[row.table]
    ]


def _reference_text(row: TextRow, frame: VistFrame) -> str:
    """What ``row``'s prediction for ``frame`` is scored against: its description (DII) or story caption (SIS)."""
    return frame.description if row.reference == "dii" else frame.story_caption


def score_text(
    records: list[dict], stories: list[VistStory], measures: Measures, rows: Sequence[TextRow] = TEXT_ROWS
) -> dict[str, dict]:
    """METEOR, sentence similarity and CLIP text-image cosine (prediction vs GT image) per text row, each
    against the row's reference (SIS or DII); rows scored against DII also get referential scores."""
    table: dict[str, dict] = {}
    for row in rows:
        present = _present(records, stories, row)
        if not present:
            continue
        predictions, references, images = [], [], []
        for record, story in present:
            predictions += record["text"][row.key]
            references += [_reference_text(row, frame) for frame in story.frames[1:]]
            images += [frame.image_file for frame in story.frames[1:]]
        clip_scores = measures.clip.text_image(predictions, [load_rgb(path) for path in images])
        table[row.key] = {
            "meteor": _mean([meteor(p, r) for p, r in zip(predictions, references, strict=True)]),
            "sentence_similarity": _mean(measures.sentence(predictions, references)),
            "clip": _mean(clip_scores),
            "samples": len(predictions),
        }
        if row.reference == "dii":
            table[row.key].update(score_referential(present, row))
    return table


def score_referential(present: list[tuple[dict, VistStory]], row: TextRow) -> dict[str, Any]:
    """ShapeStories only: does ``row``'s description of frame k+1 name its characters, above all when SIS k+1
    calls them "he", "she" or "they"? Empty for data without ShapeStories character labels."""
    descriptions, captions, labels = [], [], []
    for record, story in present:
        descriptions += record["text"][row.key]
        captions += [frame.story_caption for frame in story.frames[1:]]
        labels += [frame.labels for frame in story.frames[1:]]
    scores = referential_scores(descriptions, captions, labels)
    return scores if scores["character_frames"] else {}


def _load(out: Path, path: str) -> Image.Image:
    return load_rgb(path if Path(path).is_absolute() else out / path)


def score_images(
    records: list[dict],
    stories: list[VistStory],
    measures: Measures,
    out: Path,
    rows: Sequence[ImageRow] = IMAGE_ROWS,
) -> dict[str, dict]:
    """CLIP text-image / previous-image / GT-image / total-story similarity, FID/KID, objects, classifier,
    per image row. Text-image pairs each frame with the description it should show: the GT one, or for the
    autoregressive row the pipeline's own. FID/KID compare a row's frames with every story's GT frames."""
    table: dict[str, dict] = {}
    fid_features = ClipFeatures(measures.clip)  # FID_CLIP: projected, un-normalised CLIP image features
    gt_features = None  # (N, D), the FID/KID reference: the GT frames 1..n-1 of every story
    for row in rows:
        present = _present(records, stories, row)
        if not present:
            continue
        text_image, previous, ground, total, features, counts = [], [], [], [], [], []
        true_labels, predicted_labels, told_labels = [], [], []
        for record, story in present:
            seed = load_rgb(story.frames[0].image_file)
            generated = [_load(out, path) for path in record["images"][row.key]]
            truth = [load_rgb(frame.image_file) for frame in story.frames[1:]]
            prompts = (
                record["ar_descriptions"] if row.autoregressive else [f.description for f in story.frames[1:]]
            )
            text_image += measures.clip.text_image(prompts, generated)
            embeddings = measures.clip.image_embeddings([seed, *generated])  # (n, D), the seed in row 0
            truth_embeddings = measures.clip.image_embeddings([seed, *truth])  # (n, D)
            previous.append(previous_image_similarity(embeddings))
            ground.append(ground_truth_similarity(embeddings, truth_embeddings))
            total.append(total_story_similarity(embeddings))
            if not row.ground_truth:
                features.append(fid_features.features(prepare_for_features(generated, measures.fid_resize)))
            if measures.detector is not None:
                counts += measures.detector.count(generated)
            if measures.classifier is not None and story.frames[1].labels is not None:
                predicted_labels += measures.classifier.predict(generated)
                true_labels += [frame.labels for frame in story.frames[1:]]
                if row.autoregressive:
                    told_labels += [described_labels(description) for description in prompts]
        result: dict[str, Any] = {
            "text_image": _mean(text_image),
            "previous_image": _mean(previous),
            "gt_image": None if row.ground_truth else _mean(ground),
            "total_story": _mean(total),
            "frames": len(text_image),
        }
        if features:
            if gt_features is None:
                gt_features = _gt_features(stories, fid_features, measures.fid_resize)
            stacked = np.concatenate(features)  # (frames, D)
            if len(stacked) >= 2 and len(gt_features) >= 2:
                result["fid"] = frechet_distance(stacked, gt_features)
                result["kid"] = kernel_inception_distance(stacked, gt_features)[0]
                result["fid_note"] = fid_warning(len(stacked))
        if counts:
            result["objects_per_image"] = _mean(counts)
            result["object_histogram"] = {str(k): v for k, v in ObjectCounter.histogram(counts).items()}
        if predicted_labels:
            result.update(_label_scores(true_labels, predicted_labels, measures.classifier.characters))
        if told_labels and any(labels["characters"] for labels in told_labels):
            # The autoregressive pipeline cannot know what the true story does next (a new actor, a new
            # place); this asks instead whether each frame shows what the pipeline's own description says.
            told = _label_scores(told_labels, predicted_labels, measures.classifier.characters)
            result.update({f"told_{name}": value for name, value in told.items()})
        table[row.key] = result
    return table


def _gt_features(stories: list[VistStory], fid_features: ClipFeatures, fid_resize: str) -> np.ndarray:
    """FID features ``(N, D)`` of the GT frames 1..n-1 of every story, story by story."""
    return np.concatenate(
        [
            fid_features.features(
                prepare_for_features([load_rgb(f.image_file) for f in story.frames[1:]], fid_resize)
            )
            for story in stories
        ]
    )


def _label_scores(true_labels: list[dict], predicted_labels: list[dict], characters: list[str]) -> dict:
    """Make-A-Story's character accuracy/F1 and background accuracy/F1 of classifier predictions."""
    character = character_scores(
        [t["characters"] for t in true_labels], [p["characters"] for p in predicted_labels], labels=characters
    )
    scores = {"character_accuracy": character["accuracy"], "character_f1": character["f1"]}
    background = background_scores(
        [t.get("background") for t in true_labels], [p.get("background") for p in predicted_labels]
    )
    if background is not None:
        scores.update({"background_accuracy": background["accuracy"], "background_f1": background["f1"]})
    return scores


def score_intrinsic(
    records: list[dict], stories: list[VistStory], measures: Measures, rows: Sequence[TextRow] = TEXT_ROWS
) -> dict[str, dict]:
    """Pronouns per story and word-distribution KL against SIS and DII, for the GT story captions (SIS) and
    each text row of the intrinsic table."""
    sis = [[frame.story_caption for frame in story.frames] for story in stories]
    flat_sis = [caption for story in sis for caption in story]
    dii = [frame.description for story in stories for frame in story.frames]

    def scores(texts: list[list[str]], against_sis: bool = True) -> dict[str, Any]:
        flat = [text for story in texts for text in story]
        return {
            "pronouns_per_story": _mean([sum(count_pronouns(text) for text in story) for story in texts]),
            "kl_vs_sis": word_kl(flat, flat_sis, measures.kl_epsilon) if against_sis else None,
            "kl_vs_dii": word_kl(flat, dii, measures.kl_epsilon),
            "top_words": top_word_frequencies(flat, 15),
        }

    table = {SIS_KEY: scores(sis, against_sis=False)}
    for row in rows:
        if row.intrinsic_label is not None and _present(records, stories, row):
            table[row.key] = scores([record["text"].get(row.key, []) for record in records])
    return table
