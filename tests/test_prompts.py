"""The captioners' question strings are exactly the source paper's."""

from __future__ import annotations

import pytest

from pipeline.errors import DataError
from pipeline.prompts import PromptTemplates, llava_human_turn


def test_exact_prompt_strings():
    prompts = PromptTemplates.load()
    assert prompts.story_next_question("she didn't want the ride to end") == (
        "Current frame story caption: 'she didn't want the ride to end', What is the next frame story caption?"
    )
    assert prompts.description_question(
        previous_caption="we went to the fair.", current_caption="it was {fun}."
    ) == (
        "Previous frame story caption: 'we went to the fair.', Current frame story caption: 'it was {fun}.', "
        "What is the description of this caption?"
    )
    assert llava_human_turn("Q?") == "<image>\nQ?"


def test_templates_must_use_exactly_their_placeholders(tmp_path):
    (tmp_path / "story_next.txt").write_text("Caption: '{current_caption}' next?\n")
    (tmp_path / "description.txt").write_text(
        "Caption: '{current_caption}' describe?\n"
    )  # lacks previous_caption
    with pytest.raises(DataError, match=r"description.txt must use exactly the placeholders"):
        PromptTemplates.load(tmp_path)
    (tmp_path / "description.txt").unlink()
    with pytest.raises(DataError, match="description.txt is missing"):
        PromptTemplates.load(tmp_path)
