"""The source paper's text baselines: an off-the-shelf image-to-text captioner (its BLIP row) and a
text-only causal LM that continues the story from the previous captions (its MPT row).

Both load any hub id or local folder through ``from_pretrained``. ``build_tiny_causal_lm`` makes an
offline tiny one for tests and the tiny preset.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
)

from pipeline.errors import StorypipeError, model_load_error

CAPTION_QUESTION = "Describe the image in one sentence."
STORY_PROMPT = "Here is a story, one sentence per line.\n{story}\n"


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def _load_error(name_or_path: str, what: str, exc: Exception) -> StorypipeError:
    return model_load_error(
        what,
        name_or_path,
        exc,
        "Set the eval config key to a local folder, or to null to skip this baseline.",
    )


class ImageToTextBaseline:
    """Captions an image with any transformers image-text-to-text model (BLIP, LLaVA, ...), greedily."""

    def __init__(self, model, processor, max_new_tokens: int = 30) -> None:
        self.model, self.processor, self.max_new_tokens = model.eval(), processor, max_new_tokens

    @classmethod
    def load(cls, name_or_path: str, device: str = "cpu", max_new_tokens: int = 30) -> ImageToTextBaseline:
        try:
            processor = AutoProcessor.from_pretrained(name_or_path)
            model = AutoModelForImageTextToText.from_pretrained(name_or_path).to(device)
        except (OSError, ValueError) as exc:
            raise _load_error(name_or_path, "image-to-text baseline", exc) from exc
        return cls(model, processor, max_new_tokens)

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> list[str]:
        rgb = [image.convert("RGB") for image in images]
        if getattr(
            self.processor, "chat_template", None
        ):  # instruction models take a question with the image
            messages = [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CAPTION_QUESTION}]}
            ]
            prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
            self.processor.tokenizer.padding_side = "left"
            inputs = self.processor(text=[prompt] * len(rgb), images=rgb, return_tensors="pt", padding=True)
        else:  # plain captioners (BLIP) take the image alone
            inputs = self.processor(images=rgb, return_tensors="pt")
        inputs = inputs.to(self.model.device)
        output = self.model.generate(**inputs, do_sample=False, max_new_tokens=self.max_new_tokens)
        if "input_ids" in inputs:
            output = output[:, inputs["input_ids"].shape[1] :]
        return [_first_line(text) for text in self.processor.batch_decode(output, skip_special_tokens=True)]


class TextOnlyBaseline:
    """Continues a story from its previous captions with a causal LM, greedily, one sentence."""

    def __init__(self, model, tokenizer, max_new_tokens: int = 30) -> None:
        self.model, self.tokenizer, self.max_new_tokens = model.eval(), tokenizer, max_new_tokens

    @classmethod
    def load(cls, name_or_path: str, device: str = "cpu", max_new_tokens: int = 30) -> TextOnlyBaseline:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            model = AutoModelForCausalLM.from_pretrained(name_or_path).to(device)
        except (OSError, ValueError) as exc:
            raise _load_error(name_or_path, "text-only baseline", exc) from exc
        return cls(model, tokenizer, max_new_tokens)

    @torch.no_grad()
    def __call__(self, previous_captions: Sequence[str]) -> str:
        prompt = STORY_PROMPT.format(story="\n".join(previous_captions))
        inputs = self.tokenizer(prompt, return_tensors="pt").to(self.model.device)
        pad = (
            self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else self.tokenizer.eos_token_id
        )
        output = self.model.generate(
            **inputs, do_sample=False, max_new_tokens=self.max_new_tokens, pad_token_id=pad
        )
        return _first_line(
            self.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        )
