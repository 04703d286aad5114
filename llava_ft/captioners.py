"""Both captioners served from one LLaVA base: two LoRA adapters on a single copy of the weights.

* ``next_story_caption(image, caption)``: the *story* adapter predicts the next story caption.
* ``describe(image, current_caption, next_caption)``: the *description* adapter predicts a literal
  description of the next frame, a good diffusion prompt.

Both take the same question strings as training (``prompts/``) through the same chat template. A task
with no adapter configured is answered zero-shot by the base; ``zero_shot_tasks`` says which.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from llava_ft.config import TASKS, CaptionerConfig, adapter_advice
from llava_ft.model import chat_prompt, load_llava, resolve_base_model
from pipeline.config import OffloadMode
from pipeline.errors import ConfigError, StorypipeError
from pipeline.offload import Placement, place_modules
from pipeline.prompts import PromptTemplates

if TYPE_CHECKING:
    from peft import PeftModel  # imported where an adapter loads: peft costs seconds of start-up

# bitsandbytes' 4-bit weights stay where they were loaded, so offload hooks cannot move them.
OFFLOAD_4BIT_ADVICE = (
    "a 4-bit captioner (captioner.load_in_4bit=true) cannot be offloaded with runtime.offload={offload}: "
    "bitsandbytes weights stay on the device they load on. Load the captioners with offload='none' "
    "(storypipe does: with a 4-bit captioner runtime.offload applies to the generator only), "
    "or set captioner.load_in_4bit=false to offload the captioners too"
)


class Captioners:
    def __init__(
        self,
        model: LlavaForConditionalGeneration | PeftModel,
        processor: LlavaProcessor,
        adapters: Sequence[str],
        cfg: CaptionerConfig,
        prompts: PromptTemplates | None = None,
        placement: Placement | None = None,
    ) -> None:
        self.model = model.eval()
        self.placement = placement  # from runtime.offload; keeps the offload hooks alive
        self.processor = processor
        self.adapters = tuple(
            adapters
        )  # task names that have a loaded adapter, e.g. ("story", "description")
        self.cfg = cfg
        self.prompts = prompts or PromptTemplates.load()

    @classmethod
    def from_config(
        cls,
        cfg: CaptionerConfig,
        device: torch.device | str = "cpu",
        load_in_4bit: bool | None = None,
        offload: OffloadMode = "none",
    ) -> Captioners:
        """Load the base once, then each configured adapter onto it under its task's name; then place
        the whole model on ``device`` as ``offload`` (``runtime.offload``) says: one module, so under
        ``model`` it moves to the GPU for each call and back to the CPU after it."""
        quantised = cfg.load_in_4bit if load_in_4bit is None else load_in_4bit
        if quantised and offload != "none":
            raise ConfigError(OFFLOAD_4BIT_ADVICE.format(offload=offload))
        model, processor = load_llava(
            resolve_base_model(cfg),
            load_in_4bit=quantised,
            dtype=torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32,
            device=device if offload == "none" else None,  # offloaded: loaded on the CPU, placed below
        )
        adapters = []
        for task in TASKS:
            folder = cfg.adapter_for(task)
            if folder is None:
                continue
            from peft import PeftModel

            try:
                if isinstance(model, PeftModel):
                    model.load_adapter(
                        folder, adapter_name=task
                    )  # peft's from_pretrained loads only one adapter
                else:
                    model = PeftModel.from_pretrained(model, folder, adapter_name=task)
            except (OSError, ValueError) as exc:
                raise StorypipeError(
                    f"captioner.{task}_adapter: could not load a PEFT adapter from {folder!r} ({exc}). "
                    + adapter_advice(task)
                ) from exc
            adapters.append(task)
        placement = None
        if offload != "none":
            # The hook goes on the LLaVA itself: PeftModel.generate calls its forward, not the wrapper's.
            base = model.get_base_model() if adapters else model
            placement = place_modules([base], device, offload)
        return cls(model, processor, adapters, cfg, placement=placement)

    def with_temperature(self, temperature: float) -> Captioners:
        """The same loaded model and adapters, decoding at another temperature (0 = greedy)."""
        return Captioners(
            self.model, self.processor, self.adapters,
            dataclasses.replace(self.cfg, temperature=temperature), self.prompts, self.placement,
        )  # fmt: skip

    @property
    def device(self) -> torch.device:
        """Where the model runs: the execution device under offload (its parameters are then on the CPU
        or the meta device), else its parameters' device."""
        if self.placement is not None and self.placement.mode != "none":
            return self.placement.execution_device
        return self.model.device

    @property
    def zero_shot_tasks(self) -> tuple[str, ...]:
        return tuple(task for task in TASKS if task not in self.adapters)

    # ----------------------------------------------------------------------------------------
    # The two calls, single and batched
    # ----------------------------------------------------------------------------------------

    def next_story_caption(self, image: Image.Image, caption: str, seed: int | None = None) -> str:
        return self.next_story_captions([image], [caption], seed=seed)[0]

    def next_story_captions(
        self, images: Sequence[Image.Image], captions: Sequence[str], seed: int | None = None
    ) -> list[str]:
        _check_batch(images, captions=captions)
        questions = [self.prompts.story_next_question(caption) for caption in captions]
        return self.generate("story", images, questions, seed=seed)

    def describe(
        self, image: Image.Image, current_caption: str, next_caption: str, seed: int | None = None
    ) -> str:
        return self.describe_batch([image], [current_caption], [next_caption], seed=seed)[0]

    def describe_batch(
        self,
        images: Sequence[Image.Image],
        current_captions: Sequence[str],
        next_captions: Sequence[str],
        seed: int | None = None,
    ) -> list[str]:
        """``images[i]`` shows the frame whose story caption is ``current_captions[i]``; the result
        describes the next frame, whose story caption is ``next_captions[i]``."""
        _check_batch(images, current_captions=current_captions, next_captions=next_captions)
        questions = [
            self.prompts.description_question(previous_caption=current, current_caption=upcoming)
            for current, upcoming in zip(current_captions, next_captions, strict=True)
        ]
        return self.generate("description", images, questions, seed=seed)

    @torch.no_grad()
    def generate(
        self, task: str, images: Sequence[Image.Image], questions: Sequence[str], seed: int | None = None
    ) -> list[str]:
        """Sample one answer per (image, question) with ``task``'s adapter (or the bare base, zero-shot)."""
        # 1. Prompts: the chat template, left-padded so every row's answer starts at the same column.
        prompts = [chat_prompt(self.processor, question) for question in questions]
        rgb = [image.convert("RGB") for image in images]
        self.processor.tokenizer.padding_side = "left"
        inputs = self.processor(text=prompts, images=rgb, return_tensors="pt", padding=True)
        inputs = inputs.to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)

        # 2. Sampling settings from config; temperature 0 means greedy.
        sampling = {"do_sample": self.cfg.temperature > 0, "max_new_tokens": self.cfg.max_new_tokens}
        if self.cfg.temperature > 0:
            sampling.update(temperature=self.cfg.temperature, top_p=self.cfg.top_p)

        # 3. Generate under the task's adapter, with a private RNG stream when a seed is given.
        try:
            with self._adapter(task), _seeded(seed, self.device):
                output = self.model.generate(
                    **inputs, **sampling, pad_token_id=self.processor.tokenizer.pad_token_id
                )
        finally:
            if self.placement is not None:
                self.placement.offload()  # runtime.offload=model: back to the CPU for the generator
        new_tokens = output[:, inputs["input_ids"].shape[1] :]  # (B, new)
        return [
            clean_caption(text) for text in self.processor.batch_decode(new_tokens, skip_special_tokens=True)
        ]

    def _adapter(self, task: str) -> contextlib.AbstractContextManager:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}")
        if task in self.adapters:
            self.model.set_adapter(task)
            return contextlib.nullcontext()
        if self.adapters:  # the model is a PeftModel
            return self.model.disable_adapter()  # zero-shot: the bare base answers
        return contextlib.nullcontext()


def clean_caption(text: str) -> str:
    """One caption: the first non-empty line, without surrounding quotes or a role marker."""
    for line in text.splitlines():
        line = line.strip().strip("'\"").strip()
        for marker in ("ASSISTANT:", "USER:"):
            line = line.split(marker)[0].strip()
        if line:
            return line
    return ""


def _check_batch(images: Sequence[Image.Image], **texts: Sequence[str]) -> None:
    if not images:
        raise ValueError("no images given")
    for name, values in texts.items():
        if len(values) != len(images):
            raise ValueError(f"{len(images)} images but {len(values)} {name}")
        if any(not isinstance(value, str) or not value.strip() for value in values):
            raise ValueError(f"{name} must be non-empty strings")
    if any(not isinstance(image, Image.Image) for image in images):
        raise ValueError("images must be PIL images")


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device):
    """Seed sampling without touching the caller's global RNG state."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
