"""The captioners' question strings, shared by training-data preparation and inference.

The texts live in ``prompts/*.txt`` (one template each, ``str.format`` placeholders) so that the exact
strings the source paper trained with are data, not code. The human turn of a LLaVA conversation is
``"<image>\\n" + question``; at inference the processor's chat template places the image instead.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from pipeline.errors import DataError

# The top-level prompts/ folder, found through the installed package (pipeline/prompt_templates links to it).
PROMPTS_DIR = Path(str(resources.files("pipeline") / "prompt_templates"))
IMAGE_TOKEN = "<image>"

# Each template and the placeholders it must use, no more and no fewer.
TEMPLATE_FIELDS = {
    "story_next": {"current_caption"},
    "description": {"previous_caption", "current_caption"},
    "caption": set(),  # pretraining a base from scratch (toy models): what the image itself shows
}


@dataclass(frozen=True)
class PromptTemplates:
    story_next: str
    description: str
    caption: str

    @classmethod
    def load(cls, folder: str | Path = PROMPTS_DIR) -> PromptTemplates:
        folder = Path(folder)
        texts = {}
        for name, expected in TEMPLATE_FIELDS.items():
            path = folder / f"{name}.txt"
            if not path.is_file():
                raise DataError(f"prompt file {path} is missing; it must hold the {name!r} question template")
            text = path.read_text(encoding="utf-8").rstrip("\n")
            found = {field for _, field, _, _ in string.Formatter().parse(text) if field is not None}
            if found != expected:
                raise DataError(
                    f"{path} must use exactly the placeholders {sorted(expected)}, found {sorted(found)}"
                )
            texts[name] = text
        return cls(**texts)

    def story_next_question(self, current_caption: str) -> str:
        """Question for the *story* captioner: current image + its caption -> next story caption."""
        return self.story_next.format(current_caption=current_caption)

    def description_question(self, previous_caption: str, current_caption: str) -> str:
        """Question for the *description* captioner.

        The image is the previous frame; ``previous_caption`` is its story caption and
        ``current_caption`` the story caption of the frame to describe.
        """
        return self.description.format(previous_caption=previous_caption, current_caption=current_caption)

    def caption_question(self) -> str:
        """Question for pretraining a captioner base: the image -> its own description."""
        return self.caption


def llava_human_turn(question: str) -> str:
    """The human turn of a LLaVA conversation sample: the image token, a newline, the question."""
    return f"{IMAGE_TOKEN}\n{question}"
