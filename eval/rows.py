"""The rows of the evaluation tables: one typed record per row, registered here once, in table order.

A row's ``key`` names it everywhere but in results.md: in ``results.json``, in the per-story cache files
under ``OUT/cache/``, as the folder ``OUT/images/{key}/`` of its frames, and in the config key
``eval.rows``. The text row and the image row of the autoregressive pipeline share the key ``ours_ar``:
both come from the same told story, and ``eval.rows`` selects them together.

A row's ``model`` is the field of :class:`eval.runner.EvalModels` that produces it; when that field is
None (its model is not configured), the row is skipped. The runner, the scoring and the report read these
records and nothing else about a row. Adding a row means adding its record below; a row of a new kind of
system also needs a new ``EvalModels`` field and the code that calls it in eval/runner.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal, TypeVar

# The systems under test: the fields of eval.runner.EvalModels.
Model = Literal[
    "captioners", "illustrator", "memory_illustrator", "tell_story", "caption_baseline", "text_baseline"
]
# The ground truth a text prediction for frame k is scored against: frame k's story caption from the SIS
# annotations, or its literal description from the DII annotations.
Reference = Literal["sis", "dii"]
# What a frame generator is prompted with for frame k: its GT description or its GT story caption.
Prompts = Literal["descriptions", "story_captions"]


@dataclass(frozen=True)
class TextRow:
    """A row of the text table: one predicted text for each of frames 1..n-1 of every story.

    A non-autoregressive row predicts the text of frame k+1 from GT frame k (its image, and the GT text
    its system reads). The autoregressive row's texts are the captions of the story the whole pipeline told
    from the seed frame (frame 0).
    """

    table: ClassVar[str] = "text"  # where its outputs are kept, in a cached record and in results.json

    key: str
    label: str  # its row in the text table of results.md
    model: Model
    reference: Reference = "sis"  # what the row predicts, and so what it is scored against
    autoregressive: bool = False  # its texts are the told story's captions (needs model "tell_story")
    intrinsic_label: str | None = None  # its row in the intrinsic table of results.md; None: not there


@dataclass(frozen=True)
class ImageRow:
    """A row of the image table: one frame for each of frames 1..n-1 of every story (frame 0, the seed, is
    always the GT frame).

    The ground-truth row (no model) is the GT frames themselves; every other row's FID and KID are measured
    against the GT frames, whether or not this row is selected. A frame generator's row draws frame k from
    its prompt for frame k, with GT frames before k (and their prompts) as references or none. The
    autoregressive row's frames are those of the story the whole pipeline told from the seed frame.
    """

    table: ClassVar[str] = "images"

    key: str
    label: str  # its row in the image tables of results.md
    model: Model | None  # None: the GT frames, which need no model
    prompts: Prompts = "descriptions"  # a frame generator's prompt for frame k
    gt_references: bool = False  # a frame generator sees GT frames k-m..k-1 (m = its max_references)
    autoregressive: bool = False  # its frames are the told story's (needs model "tell_story")

    @property
    def ground_truth(self) -> bool:
        return self.model is None


Row = TextRow | ImageRow

# The text table, in results.md order.
TEXT_ROWS: tuple[TextRow, ...] = (
    TextRow("ours_story_next", "Ours: story captioner (non-autoregressive)", model="captioners"),
    TextRow("ours_ar", "Ours: autoregressive", model="tell_story", autoregressive=True,
            intrinsic_label="Ours: autoregressive"),
    TextRow("ours_description", "Ours: description captioner (vs DII)", model="captioners", reference="dii"),
    TextRow("caption_baseline", "Image-to-text baseline (BLIP row)", model="caption_baseline",
            intrinsic_label="Image-to-text baseline"),
    TextRow("text_baseline", "Text-only LM baseline (MPT row)", model="text_baseline",
            intrinsic_label="Text-only LM baseline"),
)  # fmt: skip

# The image table, in results.md order.
IMAGE_ROWS: tuple[ImageRow, ...] = (
    ImageRow("gt", "GT images", model=None),
    ImageRow("sd_no_context", "SD, descriptions, no context", model="illustrator", prompts="descriptions"),
    ImageRow("story_captions_no_context", "Story captions as prompts, no context", model="illustrator",
             prompts="story_captions"),
    ImageRow("story_captions_refs", "Story captions + reference conditioning", model="illustrator",
             prompts="story_captions", gt_references=True),
    ImageRow("ours_non_ar", "Ours: descriptions + GT references (non-autoregressive)", model="illustrator",
             prompts="descriptions", gt_references=True),
    ImageRow("ours_ar", "Ours: fully autoregressive", model="tell_story", autoregressive=True),
    # Make-A-Story's memory attention in place of StoryGen's context branch (eval.memory_generator_model).
    ImageRow("memory_story_captions_refs", "Memory attention: story captions + GT references",
             model="memory_illustrator", prompts="story_captions", gt_references=True),
    ImageRow("memory_non_ar", "Memory attention: descriptions + GT references (non-autoregressive)",
             model="memory_illustrator", prompts="descriptions", gt_references=True),
)  # fmt: skip

# The intrinsic table's first row: the ground-truth story captions themselves (not a system's output).
SIS_KEY, SIS_LABEL = "sis", "SIS (ground truth)"

# Every name eval.rows accepts, text rows first.
ROW_KEYS: tuple[str, ...] = tuple(dict.fromkeys(row.key for row in (*TEXT_ROWS, *IMAGE_ROWS)))


R = TypeVar("R", bound=Row)


def select_rows(rows: Sequence[R], names: Sequence[str] | None) -> list[R]:
    """The rows among ``rows`` whose key ``names`` (``eval.rows``) lists, in table order; None: all of them."""
    return [row for row in rows if names is None or row.key in names]
