"""Make-A-Story's character and background metrics, computed from per-frame labels.

Make-A-Story scores generated frames with a classifier and compares its predictions to the ground
truth (``../shared/reference.md``):

* **accuracy** is frame exact-match: a frame counts only when the predicted character *set* equals the
  true one (for backgrounds: when the single label is right);
* **F1** is scikit-learn's weighted F1 (each label's F1 weighted by its true support), over the
  multi-label indicator matrix for characters and over the single labels for backgrounds.

Values are in [0, 1]; the paper prints them x100.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np
from sklearn.metrics import f1_score

# Stands in for a predicted background of ``None``: always wrong, and never a true label, so it carries
# no weight in the weighted F1 (weights are true supports).
NO_BACKGROUND = "<none>"


def character_scores(
    true: Sequence[Collection[str]], predicted: Sequence[Collection[str]], labels: Sequence[str]
) -> dict[str, float | int]:
    """Exact-match accuracy and weighted F1 of predicted character sets against the true ones.

    ``labels`` fixes the indicator matrix's columns (usually the classifier's vocabulary). A name outside
    it, in ``true`` or ``predicted``, gets an extra column of its own, so it still counts: a true
    character the classifier cannot name lowers the F1 by its support instead of vanishing.

    Returns ``{"accuracy", "f1", "frames"}``.
    """
    _check_lengths(true, predicted)
    true_sets = [set(names) for names in true]
    predicted_sets = [set(names) for names in predicted]
    accuracy = sum(t == p for t, p in zip(true_sets, predicted_sets, strict=True)) / len(true_sets)

    columns = list(dict.fromkeys(labels))
    seen = set(columns)
    columns += sorted(set().union(*true_sets, *predicted_sets) - seen)
    index = {name: column for column, name in enumerate(columns)}
    true_matrix = np.zeros((len(true_sets), len(columns)), dtype=np.int64)  # (N, L)
    predicted_matrix = np.zeros_like(true_matrix)  # (N, L)
    for row, (t, p) in enumerate(zip(true_sets, predicted_sets, strict=True)):
        true_matrix[row, [index[name] for name in t]] = 1
        predicted_matrix[row, [index[name] for name in p]] = 1
    f1 = f1_score(true_matrix, predicted_matrix, average="weighted", zero_division=0)
    return {"accuracy": float(accuracy), "f1": float(f1), "frames": len(true_sets)}


def background_scores(
    true: Sequence[str | None], predicted: Sequence[str | None]
) -> dict[str, float | int] | None:
    """Accuracy and weighted F1 of single background labels; ``None`` when no frame has a true background.

    Frames whose true background is ``None`` (PororoSV has no backgrounds) are skipped. A predicted
    ``None`` is simply wrong. Returns ``{"accuracy", "f1", "frames"}`` over the frames scored.
    """
    _check_lengths(true, predicted)
    pairs = [
        (t, NO_BACKGROUND if p is None else p) for t, p in zip(true, predicted, strict=True) if t is not None
    ]
    if not pairs:
        return None
    true_labels = [t for t, _ in pairs]
    predicted_labels = [p for _, p in pairs]
    accuracy = sum(t == p for t, p in pairs) / len(pairs)
    f1 = f1_score(true_labels, predicted_labels, average="weighted", zero_division=0)
    return {"accuracy": float(accuracy), "f1": float(f1), "frames": len(pairs)}


def _check_lengths(true: Sequence, predicted: Sequence) -> None:
    if len(true) != len(predicted):
        raise ValueError(f"{len(true)} true labels but {len(predicted)} predictions: one of each per frame")
    if not true:
        raise ValueError("no frames to score")
