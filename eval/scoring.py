"""Scoring the cached records into the papers' tables: text, images, intrinsic (see eval/runner.py)."""

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
from eval.text_metrics import SentenceSimilarity, count_pronouns, meteor, top_word_frequencies, word_kl
from pipeline.data.vist import VistStory
from pipeline.io import load_rgb

# Image methods in table order (eval/runner.py describes each).
IMAGE_METHODS = (
    "gt",
    "sd_no_context",
    "story_captions_no_context",
    "story_captions_refs",
    "ours_non_ar",
    "ours_ar",
    "memory_story_captions_refs",
    "memory_non_ar",
)


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


def score_text(records: list[dict], stories: list[VistStory], measures: Measures) -> dict[str, dict]:
    """METEOR, sentence similarity and CLIP text-image cosine (prediction vs GT image) per text method."""
    table: dict[str, dict] = {}
    methods = sorted({method for record in records for method in record["text"]})
    for method in methods:
        predictions, references, images = [], [], []
        for record, story in zip(records, stories, strict=True):
            if method not in record["text"]:
                continue
            truth = (
                [f.description for f in story.frames[1:]]
                if method == "ours_description"
                else [f.story_caption for f in story.frames[1:]]
            )
            predictions += record["text"][method]
            references += truth
            images += [frame.image_file for frame in story.frames[1:]]
        clip_scores = measures.clip.text_image(predictions, [load_rgb(path) for path in images])
        table[method] = {
            "meteor": _mean([meteor(p, r) for p, r in zip(predictions, references, strict=True)]),
            "sentence_similarity": _mean(measures.sentence(predictions, references)),
            "clip": _mean(clip_scores),
            "samples": len(predictions),
        }
        if method == "ours_description":
            table[method].update(score_referential(records, stories))
    return table


def score_referential(records: list[dict], stories: list[VistStory]) -> dict[str, Any]:
    """ShapeStories only: does the description of frame k+1 name its characters, above all when SIS k+1
    calls them "he", "she" or "they"? Empty for data without ShapeStories character labels."""
    descriptions, captions, labels = [], [], []
    for record, story in zip(records, stories, strict=True):
        if "ours_description" in record["text"]:
            descriptions += record["text"]["ours_description"]
            captions += [frame.story_caption for frame in story.frames[1:]]
            labels += [frame.labels for frame in story.frames[1:]]
    scores = referential_scores(descriptions, captions, labels)
    return scores if scores["character_frames"] else {}


def _load(out: Path, path: str) -> Image.Image:
    return load_rgb(path if Path(path).is_absolute() else out / path)


def score_images(
    records: list[dict], stories: list[VistStory], measures: Measures, out: Path
) -> dict[str, dict]:
    """CLIP text-image / previous-image / GT-image / total-story similarity, FID/KID, objects, classifier."""
    table: dict[str, dict] = {}
    methods = [m for m in IMAGE_METHODS if any(m in record["images"] for record in records)]
    gt_features = np.zeros((0, 1))
    fid_features = ClipFeatures(measures.clip)  # FID_CLIP: projected, un-normalised CLIP image features
    for method in methods:
        text_image, previous, ground, total, features, counts = [], [], [], [], [], []
        true_labels, predicted_labels, told_labels = [], [], []
        for record, story in zip(records, stories, strict=True):
            if method not in record["images"]:
                continue
            seed = load_rgb(story.frames[0].image_file)
            generated = [_load(out, path) for path in record["images"][method]]
            truth = [load_rgb(frame.image_file) for frame in story.frames[1:]]
            prompts = (
                record.get("ar_descriptions")
                if method == "ours_ar"
                else [f.description for f in story.frames[1:]]
            )
            text_image += measures.clip.text_image(prompts, generated)
            embeddings = measures.clip.image_embeddings([seed, *generated])  # (n, D), the seed in row 0
            truth_embeddings = measures.clip.image_embeddings([seed, *truth])  # (n, D)
            previous.append(previous_image_similarity(embeddings))
            ground.append(ground_truth_similarity(embeddings, truth_embeddings))
            total.append(total_story_similarity(embeddings))
            features.append(
                fid_features.features(prepare_for_features(generated, measures.fid_resize))
            )  # (n-1, D)
            if measures.detector is not None:
                counts += measures.detector.count(generated)
            if measures.classifier is not None and story.frames[1].labels is not None:
                predicted_labels += measures.classifier.predict(generated)
                true_labels += [frame.labels for frame in story.frames[1:]]
                if method == "ours_ar":
                    told_labels += [described_labels(description) for description in prompts]
        row: dict[str, Any] = {
            "text_image": _mean(text_image),
            "previous_image": _mean(previous),
            "gt_image": _mean(ground) if method != "gt" else None,
            "total_story": _mean(total),
            "frames": len(text_image),
        }
        stacked = np.concatenate(features) if features else np.zeros((0, 1))
        if method == "gt":
            gt_features = stacked
        elif len(stacked) >= 2 and len(gt_features) >= 2:
            row["fid"] = frechet_distance(stacked, gt_features)
            row["kid"] = kernel_inception_distance(stacked, gt_features)[0]
            row["fid_note"] = fid_warning(len(stacked))
        if counts:
            row["objects_per_image"] = _mean(counts)
            row["object_histogram"] = {str(k): v for k, v in ObjectCounter.histogram(counts).items()}
        if predicted_labels:
            row.update(_label_scores(true_labels, predicted_labels, measures.classifier.characters))
        if told_labels and any(labels["characters"] for labels in told_labels):
            # The autoregressive pipeline cannot know what the true story does next (a new actor, a new
            # place); this asks instead whether each frame shows what the pipeline's own description says.
            told = _label_scores(told_labels, predicted_labels, measures.classifier.characters)
            row.update({f"told_{name}": value for name, value in told.items()})
        table[method] = row
    return table


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


def score_intrinsic(records: list[dict], stories: list[VistStory], measures: Measures) -> dict[str, dict]:
    """Pronouns per story and word-distribution KL against SIS and DII, for GT text and each text method."""
    sis = [[frame.story_caption for frame in story.frames] for story in stories]
    dii = [frame.description for story in stories for frame in story.frames]
    corpora: dict[str, list[list[str]]] = {"sis": sis}
    for method in ("ours_ar", "caption_baseline", "text_baseline"):
        if any(method in record["text"] for record in records):
            corpora[method] = [record["text"].get(method, []) for record in records]
    table = {}
    flat_sis = [caption for story in sis for caption in story]
    for name, texts in corpora.items():
        flat = [text for story in texts for text in story]
        table[name] = {
            "pronouns_per_story": _mean([sum(count_pronouns(text) for text in story) for story in texts]),
            "kl_vs_sis": word_kl(flat, flat_sis, measures.kl_epsilon) if name != "sis" else None,
            "kl_vs_dii": word_kl(flat, dii, measures.kl_epsilon),
            "top_words": top_word_frequencies(flat, 15),
        }
    return table
