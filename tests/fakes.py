"""Fake captioners and a fake frame generator for the story loop and the story folder: their outputs depend
only on their inputs and seeds, so every frame is traceable and a rerun gives the same story."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from PIL import Image


def colour_of(text: str) -> tuple[int, int, int]:
    digest = hashlib.sha256(text.encode()).digest()
    return digest[0], digest[1], digest[2]


class FakeCaptioner:
    """Captions depend only on their inputs and seed; ``scripted`` answers come first when given. The single
    calls are batches of one, as the real captioners'; ``batches`` records each call's task and size."""

    zero_shot_tasks = ()

    def __init__(self, scripted: list[str] | None = None) -> None:
        self.scripted = list(scripted or [])
        self.story_calls: list[tuple[tuple, str, int]] = []
        self.describe_calls: list[tuple[tuple, str, str]] = []
        self.batches: list[tuple[str, int]] = []

    def next_story_caption(self, image, caption, seed=None):
        return self.next_story_captions([image], [caption], seeds=[seed])[0]

    def next_story_captions(self, images, captions, seeds=None):
        seeds = seeds or [None] * len(images)
        self.batches.append(("story", len(images)))
        answers = []
        for image, caption, seed in zip(images, captions, seeds, strict=True):
            self.story_calls.append((image.getpixel((0, 0)), caption, seed))
            answers.append(
                self.scripted.pop(0)
                if self.scripted
                else f"Then thing {(seed + colour_of(caption)[0]) % 9973} happened."
            )
        return answers

    def describe(self, image, current_caption, next_caption, seed=None):
        return self.describe_batch([image], [current_caption], [next_caption], seeds=[seed])[0]

    def describe_batch(self, images, current_captions, next_captions, seeds=None):
        self.batches.append(("description", len(images)))
        for image, current, upcoming in zip(images, current_captions, next_captions, strict=True):
            self.describe_calls.append((image.getpixel((0, 0)), current, upcoming))
        return [f"A picture of: {upcoming}" for upcoming in next_captions]


@dataclass
class FakeResult:
    image: Image.Image
    prompt_truncated: bool = False


class FakeIllustrator:
    """Each image is one flat colour derived from its description and seed, so frames are traceable."""

    max_references = 3

    def __init__(self, fail_at_call: int | None = None) -> None:
        self.calls: list[dict] = []
        self.batches: list[int] = []  # the size of each generate_batch call
        self.fail_at_call = fail_at_call

    def exceeds_prompt_limit(self, text: str) -> bool:
        return False

    def generate(self, description, context_images=(), context_descriptions=(), seed=0, init_image=None,
                 strength=None, on_step=None):  # fmt: skip
        if self.fail_at_call is not None and len(self.calls) == self.fail_at_call:
            raise RuntimeError("simulated crash")
        self.calls.append({
            "description": description,
            "context": [image.getpixel((0, 0)) for image in context_images],
            "context_descriptions": list(context_descriptions),
            "init": init_image.getpixel((0, 0)) if init_image is not None else None,
            "strength": strength,
        })  # fmt: skip
        return FakeResult(Image.new("RGB", (16, 16), colour_of(f"{description}|{seed}")))

    def generate_batch(self, requests, on_step=None):
        self.batches.append(len(requests))
        if len({len(r.context_images) for r in requests}) > 1:
            raise ValueError("requests read different numbers of previous frames")
        return [
            self.generate(
                r.description, r.context_images, r.context_descriptions, seed=r.seed, on_step=on_step
            )
            for r in requests
        ]
