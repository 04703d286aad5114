"""results.json, results.md (tables laid out like the papers') and PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
TEXT_ROWS = {
    "ours_story_next": "Ours: story captioner (non-autoregressive)",
    "ours_ar": "Ours: autoregressive",
    "ours_description": "Ours: description captioner (vs DII)",
    "caption_baseline": "Image-to-text baseline (BLIP row)",
    "text_baseline": "Text-only LM baseline (MPT row)",
}
IMAGE_ROWS = {
    "gt": "GT images",
    "sd_no_context": "SD, descriptions, no context",
    "story_captions_no_context": "Story captions as prompts, no context",
    "story_captions_refs": "Story captions + reference conditioning",
    "ours_non_ar": "Ours: descriptions + GT references (non-autoregressive)",
    "ours_ar": "Ours: fully autoregressive",
    "memory_story_captions_refs": "Memory attention: story captions + GT references",
    "memory_non_ar": "Memory attention: descriptions + GT references (non-autoregressive)",
}
INTRINSIC_ROWS = {"sis": "SIS (ground truth)", "ours_ar": "Ours: autoregressive", "caption_baseline": "Image-to-text baseline",
                  "text_baseline": "Text-only LM baseline"}  # fmt: skip


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
    rows = [[TEXT_ROWS[m], _cell(text[m]["meteor"]), _cell(text[m]["clip"]), _cell(text[m]["sentence_similarity"]),
             str(text[m]["samples"])] for m in TEXT_ROWS if m in text]  # fmt: skip
    parts.append(_table(["Method", "METEOR", "CLIP", "Sentence sim.", "n"], rows))
    parts.append("\nThe source paper, on VIST:\n")
    parts.append(
        _table(
            ["Method", "METEOR", "CLIP", "SRoBERTa"],
            [[k, *(_cell(v) for v in vals)] for k, vals in PAPER_TEXT.items()],
        )
    )

    described = text.get("ours_description", {})
    if described.get("character_frames"):
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
    for method, label in IMAGE_ROWS.items():
        if method in images:
            row = images[method]
            rows.append([label, _cell(row["text_image"]), _cell(row["previous_image"]), _cell(row.get("gt_image")),
                         _cell(row["total_story"]), _cell(row.get("fid")), _cell(row.get("kid")),
                         _cell(row.get("character_accuracy"), True), _cell(row.get("character_f1"), True),
                         _cell(row.get("background_accuracy"), True), _cell(row.get("background_f1"), True)])  # fmt: skip
    parts.append(_table(["Method", "Text–image", "Prev-image", "GT-image", "Total story", "FID", "KID",
                         "Char acc", "Char F1", "Bg acc", "Bg F1"], rows))  # fmt: skip
    told = images.get("ours_ar", {})
    if told.get("told_character_accuracy") is not None:
        parts.append(
            "\nAgainst the story it told (ShapeStories): the autoregressive pipeline's frames show the characters "
            f"its own descriptions name in {_cell(told['told_character_accuracy'], True)}% of frames and the "
            f"place they name in {_cell(told.get('told_background_accuracy'), True)}%. The row above scores them "
            "against the true story, whose new actors and places the pipeline cannot know from the seed."
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
    rows = [[INTRINSIC_ROWS[m], _cell(intrinsic[m]["pronouns_per_story"]), _cell(intrinsic[m]["kl_vs_sis"]),
             _cell(intrinsic[m]["kl_vs_dii"])] for m in INTRINSIC_ROWS if m in intrinsic]  # fmt: skip
    parts.append(_table(["Text", "Pronouns per story", "Word KL vs SIS", "Word KL vs DII"], rows))
    objects = [[IMAGE_ROWS[m], _cell(images[m].get("objects_per_image"))] for m in IMAGE_ROWS if m in images]
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
        axis.set_title(INTRINSIC_ROWS.get(name, name), fontsize=9)
    figure.suptitle("Most frequent words")
    figure.tight_layout()
    figure.savefig(out / "word_distribution.png")
    plt.close(figure)

    images = {m: row for m, row in results["images"].items() if row.get("object_histogram")}
    figure, axis = plt.subplots(figsize=(6, 4))
    for method, row in images.items():
        histogram = {int(k): v for k, v in row["object_histogram"].items()}
        axis.plot(
            sorted(histogram), [histogram[k] for k in sorted(histogram)], marker="o", label=IMAGE_ROWS[method]
        )
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
