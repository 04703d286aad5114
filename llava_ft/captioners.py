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
        return self.next_story_captions([image], [caption], seeds=[seed])[0]

    def next_story_captions(
        self,
        images: Sequence[Image.Image],
        captions: Sequence[str],
        seeds: Sequence[int | None] | None = None,
    ) -> list[str]:
        """Row ``i``'s next story caption, sampled with ``seeds[i]``: the same answer in any batch."""
        _check_batch(images, seeds, captions=captions)
        questions = [self.prompts.story_next_question(caption) for caption in captions]
        return self.generate("story", images, questions, seeds=seeds)

    def describe(
        self, image: Image.Image, current_caption: str, next_caption: str, seed: int | None = None
    ) -> str:
        return self.describe_batch([image], [current_caption], [next_caption], seeds=[seed])[0]

    def describe_batch(
        self,
        images: Sequence[Image.Image],
        current_captions: Sequence[str],
        next_captions: Sequence[str],
        seeds: Sequence[int | None] | None = None,
    ) -> list[str]:
        """``images[i]`` shows the frame whose story caption is ``current_captions[i]``; the result
        describes the next frame, whose story caption is ``next_captions[i]``, sampled with ``seeds[i]``."""
        _check_batch(images, seeds, current_captions=current_captions, next_captions=next_captions)
        questions = [
            self.prompts.description_question(previous_caption=current, current_caption=upcoming)
            for current, upcoming in zip(current_captions, next_captions, strict=True)
        ]
        return self.generate("description", images, questions, seeds=seeds)

    @torch.no_grad()
    def generate(
        self,
        task: str,
        images: Sequence[Image.Image],
        questions: Sequence[str],
        seeds: Sequence[int | None] | None = None,
    ) -> list[str]:
        """Sample one answer per (image, question) with ``task``'s adapter (or the bare base, zero-shot).

        Row ``i`` samples from its own generator seeded with ``seeds[i]`` (None: torch's global RNG), so
        its answer depends on its own inputs and seed only, not on the other rows of the batch (up to the
        floating-point noise that padding adds to the logits)."""
        seeds = [None] * len(images) if seeds is None else list(seeds)
        _check_batch(images, seeds, questions=questions)

        # 1. Prompts: the chat template, left-padded so every row's answer starts at the same column.
        prompts = [chat_prompt(self.processor, question) for question in questions]
        rgb = [image.convert("RGB") for image in images]
        self.processor.tokenizer.padding_side = "left"
        inputs = self.processor(text=prompts, images=rgb, return_tensors="pt", padding=True)
        inputs = inputs.to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)

        # 2. Sampling from config; temperature 0 means greedy. Sampling draws each row's token from its own
        # generator and hands greedy decoding a one-hot choice (RowSampler), so transformers' sampler,
        # which draws a whole batch from one RNG stream, is never used.
        from transformers import LogitsProcessorList

        processors = LogitsProcessorList()
        if self.cfg.temperature > 0:
            processors.append(RowSampler(seeds, self.cfg.temperature, self.cfg.top_p))

        # 3. Generate under the task's adapter.
        try:
            with self._adapter(task):
                output = self.model.generate(
                    **inputs,
                    do_sample=False,
                    max_new_tokens=self.cfg.max_new_tokens,
                    logits_processor=processors,
                    pad_token_id=self.processor.tokenizer.pad_token_id,
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


def _check_batch(
    images: Sequence[Image.Image], seeds: Sequence[int | None] | None, **texts: Sequence[str]
) -> None:
    if not images:
        raise ValueError("no images given")
    for name, values in texts.items():
        if len(values) != len(images):
            raise ValueError(f"{len(images)} images but {len(values)} {name}")
        if any(not isinstance(value, str) or not value.strip() for value in values):
            raise ValueError(f"{name} must be non-empty strings")
    if any(not isinstance(image, Image.Image) for image in images):
        raise ValueError("images must be PIL images")
    if seeds is not None:
        if len(seeds) != len(images):
            raise ValueError(f"{len(images)} images but {len(seeds)} seeds")
        if any(seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)) for seed in seeds):
            raise ValueError(f"seeds must be integers or None, got {list(seeds)!r}")


class RowSampler:
    """Temperature and top-p sampling with one ``torch.Generator`` per row (a transformers logits processor).

    transformers' own sampling draws the whole batch from one RNG stream, so a row's answer would depend
    on which rows share its batch. This processor draws row ``i``'s token from a CPU generator seeded with
    ``seeds[i]`` (torch's global RNG when None) and returns scores that are ``-inf`` everywhere but at
    the drawn token, so greedy decoding (``generate(do_sample=False)``) takes it. It must run last:
    transformers appends a custom processor after its own (repetition penalty, minimum length...).
    A row draws once per decoding step, so its k-th token always comes from its stream's k-th draw.
    """

    def __init__(self, seeds: Sequence[int | None], temperature: float, top_p: float) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 to sample (0 is greedy), got {temperature}")
        self.generators = [None if seed is None else torch.Generator().manual_seed(seed) for seed in seeds]
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """A transformers logits processor: ``scores`` (B, vocabulary) for the next token."""
        chosen = torch.full_like(scores, -float("inf"))
        for row, generator in enumerate(self.generators):  # row by row: nothing mixes rows
            probabilities = top_p_probabilities(scores[row].float().cpu() / self.temperature, self.top_p)
            token = torch.multinomial(probabilities, 1, generator=generator)
            chosen[row, token.to(scores.device)] = 0.0
        return chosen


def top_p_probabilities(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """The softmax of ``logits`` (one row) over the smallest set of most likely tokens whose probability
    reaches ``top_p``, renormalised; the rule of transformers' ``TopPLogitsWarper`` (one token at least)."""
    if top_p < 1.0:
        ordered, order = torch.sort(logits, descending=False)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - top_p)
        drop[-1:] = False  # keep the most likely token
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), -float("inf"))
    return logits.softmax(dim=-1)
