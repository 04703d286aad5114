"""The captioners' training samples: LLaVA conversation JSON (as `storypipe prepare-llava` writes it).

A sample is ``{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", "value": ...}]}``. Encoding renders the question with the processor's chat template
(the same path as inference), appends the answer and EOS, and masks every prompt and image position
in the labels, so the loss is on the answer tokens only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlavaProcessor

from llava_ft.model import chat_prompt
from pipeline.errors import DataError
from pipeline.io import load_rgb
from pipeline.prompts import IMAGE_TOKEN

IGNORE_INDEX = -100  # labels with this value carry no loss (torch's cross-entropy default)
HUMAN_PREFIX = f"{IMAGE_TOKEN}\n"


@dataclass(frozen=True)
class ConversationSample:
    id: str
    image: Path
    question: str  # the human turn without its leading "<image>\n"
    answer: str


def read_conversations(data_file: str | Path, images_dir: str | Path) -> list[ConversationSample]:
    """Read and check every sample up front; errors name the file and the sample id."""
    data_file, images_dir = Path(data_file), Path(images_dir)
    if not data_file.is_file():
        raise DataError(
            f"{data_file} does not exist; `storypipe prepare-llava` writes story_next.json and description.json"
        )
    try:
        raw = json.loads(data_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{data_file} is not valid JSON: {exc}") from exc
    if not isinstance(raw, list):
        raise DataError(
            f"{data_file} must hold a list of LLaVA conversation samples, got {type(raw).__name__}"
        )
    if not raw:
        raise DataError(f"{data_file} holds no samples; did `storypipe prepare-llava` find any usable story?")
    if not images_dir.is_dir():
        raise DataError(f"images folder {images_dir} does not exist")

    samples = []
    for position, item in enumerate(raw):
        sample_id = item.get("id", f"#{position}") if isinstance(item, dict) else f"#{position}"

        def bad(what: str, sample_id: str = sample_id) -> DataError:
            return DataError(f"{data_file}, sample {sample_id!r}: {what}")

        if not isinstance(item, dict) or not {"id", "image", "conversations"} <= item.keys():
            raise bad('expected an object with "id", "image" and "conversations" (LLaVA conversation format)')
        turns = item["conversations"]
        if (
            not isinstance(turns, list)
            or len(turns) != 2
            or not all(isinstance(turn, dict) and isinstance(turn.get("value"), str) for turn in turns)
            or [turn.get("from") for turn in turns] != ["human", "gpt"]
        ):
            raise bad(
                '"conversations" must be [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}]'
            )
        human, answer = turns[0]["value"], turns[1]["value"].strip()
        if not human.startswith(HUMAN_PREFIX) or human.count(IMAGE_TOKEN) != 1:
            raise bad(f"the human turn must start with {HUMAN_PREFIX!r} and hold exactly one {IMAGE_TOKEN}")
        if not answer:
            raise bad("the gpt answer is empty")
        image = images_dir / str(item["image"])
        if not image.is_file():
            raise bad(f"image {image} does not exist")
        samples.append(ConversationSample(str(item["id"]), image, human[len(HUMAN_PREFIX) :], answer))
    return samples


def encode_sample(processor: LlavaProcessor, sample: ConversationSample) -> dict[str, torch.Tensor]:
    """``input_ids``, ``labels`` (answer + EOS only) and ``pixel_values`` for one sample."""
    prompt = chat_prompt(processor, sample.question)
    image = load_rgb(sample.image)
    # The answer follows "ASSISTANT:" after a space, as in llava-1.5's format.
    full = processor(
        text=prompt + " " + sample.answer + processor.tokenizer.eos_token, images=image, return_tensors="pt"
    )
    prompt_ids = processor(text=prompt, images=image, return_tensors="pt").input_ids[0]
    input_ids = full.input_ids[0]  # (T,)
    if not torch.equal(input_ids[: len(prompt_ids)], prompt_ids):
        raise DataError(
            f"sample {sample.id!r}: the tokenizer merges the prompt's end with the answer, so the answer "
            "tokens cannot be separated from the prompt; this tokenizer is not supported for training"
        )
    labels = input_ids.clone()
    labels[: len(prompt_ids)] = IGNORE_INDEX  # system/user text and every image token
    return {"input_ids": input_ids, "labels": labels, "pixel_values": full.pixel_values[0]}


def collate(encoded: list[dict[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded samples into a batch; padding carries no loss."""
    length = max(len(item["input_ids"]) for item in encoded)
    batch_size = len(encoded)
    input_ids = torch.full((batch_size, length), pad_token_id, dtype=torch.long)  # (B, T)
    labels = torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((batch_size, length), dtype=torch.long)  # (B, T)
    for row, item in enumerate(encoded):
        size = len(item["input_ids"])
        input_ids[row, :size] = item["input_ids"]
        labels[row, :size] = item["labels"]
        attention_mask[row, :size] = 1
    pixel_values = torch.stack([item["pixel_values"] for item in encoded])  # (B, 3, H, W)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "pixel_values": pixel_values,
    }
