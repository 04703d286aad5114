"""results.json, results.md (tables laid out like the papers') and PNG plots.

Each table lists the rows of :mod:`eval.rows` that the results hold, in the registry's order, under their
labels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from eval.rows import IMAGE_ROWS, SIS_KEY, SIS_LABEL, TEXT_ROWS
from pipeline.io import atomic_write_json, atomic_write_text

# The source papers' numbers, for side-by-side reading (../shared/reference.md). Only comparable on VIST
# with the real models; ShapeStories numbers measure the toy world.
PAPER_TEXT = {
    "MPT text-only": (0.066, 0.201, 0.208),
    "BLIP": (0.090, 0.289, 0.266),
    "Ours-10k, temperature 0.2": (0.076, 0.240, 0.586),
    "Ours, autoregressive": (0.054, None, 0.357),
}
PAPER_IMAGES = {
    "GT images": (0.295, 0.679, None, 0.675),
    "SD-1.5": (0.309, 0.575, 0.681, 0.589),
    "Ours, non-autoregressive, image guidance 5.0": (0.300, 0.646, 0.724, 0.642),
    "Ours, fully autoregressive": (0.196, 0.626, 0.581, 0.740),
}


def intrinsic_labels() -> dict[str, str]:
    """The intrinsic table's rows in order, key -> label: the GT story captions, then the text rows there."""
    rows = {row.key: row.intrinsic_label for row in TEXT_ROWS if row.intrinsic_label is not None}
    return {SIS_KEY: SIS_LABEL, **rows}


def _cell(value: Any, percent: bool = False) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{100 * value:.2f}" if percent else f"{value:.3f}"
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def results_markdown(results: dict) -> str:
    text, images, intrinsic = results["text"], results["images"], results["intrinsic"]
    parts = [
        f"# storypipe evaluation\n\n{results['stories']} stories of split `{results['split']}` from `{results['data']}`.\n"
    ]

    parts.append("## Text: next story caption / description\n")
    rows = [[row.label, _cell(text[row.key]["meteor"]), _cell(text[row.key]["clip"]),
             _cell(text[row.key]["sentence_similarity"]), str(text[row.key]["samples"])]
            for row in TEXT_ROWS if row.key in text]  # fmt: skip
    parts.append(_table(["Method", "METEOR", "CLIP", "Sentence sim.", "n"], rows))
    parts.append("\nThe source paper, on VIST:\n")
    parts.append(
        _table(
            ["Method", "METEOR", "CLIP", "SRoBERTa"],
            [[k, *(_cell(v) for v in vals)] for k, vals in PAPER_TEXT.items()],
        )
    )

    for row in TEXT_ROWS:
        described = text.get(row.key, {}) if row.reference == "dii" else {}
        if not described.get("character_frames"):
            continue
        parts.append("\n## Referential accuracy of the descriptions (ShapeStories)\n")
        parts.append(
            _table(
                ["Frames", "Description names exactly the true characters (%)", "n"],
                [
                    ["SIS k+1 says only he / she / they", _cell(described["pronoun_resolution"], True),
                     str(described["pronoun_frames"])],
                    ["All frames", _cell(described["character_named"], True), str(described["character_frames"])],
                ],
            )
        )  # fmt: skip
        parts.append(
            "\nThe description captioner's description of frame k+1 (from GT image k and SIS k, k+1) counts "
            "when it names exactly frame k+1's characters by colour and shape, and no other character.\n"
        )

    parts.append("\n## Images\n")
    rows = []
    for image_row in IMAGE_ROWS:
        if image_row.key in images:
            row = images[image_row.key]
            rows.append([image_row.label, _cell(row["text_image"]), _cell(row["previous_image"]),
                         _cell(row.get("gt_image")), _cell(row["total_story"]), _cell(row.get("fid")), _cell(row.get("kid")),
                         _cell(row.get("character_accuracy"), True), _cell(row.get("character_f1"), True),
                         _cell(row.get("background_accuracy"), True), _cell(row.get("background_f1"), True)])  # fmt: skip
    parts.append(_table(["Method", "Text–image", "Prev-image", "GT-image", "Total story", "FID", "KID",
                         "Char acc", "Char F1", "Bg acc", "Bg F1"], rows))  # fmt: skip
    for row in IMAGE_ROWS:
        told = images.get(row.key, {}) if row.autoregressive else {}
        if told.get("told_character_accuracy") is not None:
            parts.append(
                "\nAgainst the story it told (ShapeStories): the autoregressive pipeline's frames show the "
                f"characters its own descriptions name in {_cell(told['told_character_accuracy'], True)}% of "
                f"frames and the place they name in {_cell(told.get('told_background_accuracy'), True)}%. The "
                "row above scores them against the true story, whose new actors and places the pipeline cannot "
                "know from the seed."
            )
    notes = sorted({row["fid_note"] for row in images.values() if row.get("fid_note")})
    parts.append(
        "\nFID/KID use CLIP image features against the GT frames (not comparable with Inception FID), "
        f"resize protocol `{results['fid_resize']}`." + "".join(f"\n> {note}" for note in notes)
    )
    parts.append("\nThe source paper, on VIST:\n")
    parts.append(_table(["Method", "Text–image", "Prev-image", "GT-image", "Total story"],
                        [[k, *(_cell(v) for v in vals)] for k, vals in PAPER_IMAGES.items()]))  # fmt: skip

    parts.append("\n## Intrinsic\n")
    rows = [[label, _cell(intrinsic[key]["pronouns_per_story"]), _cell(intrinsic[key]["kl_vs_sis"]),
             _cell(intrinsic[key]["kl_vs_dii"])] for key, label in intrinsic_labels().items() if key in intrinsic]  # fmt: skip
    parts.append(_table(["Text", "Pronouns per story", "Word KL vs SIS", "Word KL vs DII"], rows))
    objects = [
        [row.label, _cell(images[row.key].get("objects_per_image"))]
        for row in IMAGE_ROWS
        if row.key in images
    ]
    parts.append("\n" + _table(["Frames", "Objects per image"], objects))
    parts.append(f"\nWord KL is KL(generated ‖ reference) over the shared vocabulary, additive smoothing ε = {results['kl_epsilon']}. "
                 "The paper: pronouns SIS 2.73, BLIP 0.45, ours 1.71; KL (SIS / DII) MPT 0.84 / 1.71, ours 1.45 / 1.40; "
                 "objects per image SD-1.5 4.58, ours 4.57.\n")  # fmt: skip
    parts.append("Plots: `word_distribution.png`, `object_counts.png`.\n")
    return "\n".join(parts)


def write_plots(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    intrinsic = results["intrinsic"]
    figure, axes = plt.subplots(1, len(intrinsic), figsize=(4 * len(intrinsic), 4), squeeze=False)
    for axis, (name, row) in zip(axes[0], intrinsic.items(), strict=True):
        words = row["top_words"][:10]
        axis.barh([w for w, _ in words][::-1], [f for _, f in words][::-1])
        axis.set_title(intrinsic_labels().get(name, name), fontsize=9)
    figure.suptitle("Most frequent words")
    figure.tight_layout()
    figure.savefig(out / "word_distribution.png")
    plt.close(figure)

    images = [(row.label, results["images"].get(row.key, {})) for row in IMAGE_ROWS]
    images = [(label, row) for label, row in images if row.get("object_histogram")]
    figure, axis = plt.subplots(figsize=(6, 4))
    for label, row in images:
        histogram = {int(k): v for k, v in row["object_histogram"].items()}
        axis.plot(sorted(histogram), [histogram[k] for k in sorted(histogram)], marker="o", label=label)
    axis.set_xlabel("objects detected per frame")
    axis.set_ylabel("frames")
    if images:
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / "object_counts.png")
    plt.close(figure)


def write_results(results: dict, out: Path) -> None:
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", results_markdown(results))
    write_plots(results, out)
