"""storypipe.activations: the traced activation peaks against the same code run on real tensors.

The planner traces on fake tensors (no storage); here the real stages run on the tiny models under the
same storage counter, with real tensors, and the traced figure must land within 15% of what they made.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image

from storypipe import activations, plan
from storypipe.config import resolve_config

TOLERANCE = 0.15  # the bar for the planner against measured peaks


def real_peak(run, *modules: torch.nn.Module) -> int:
    """The planner's counter on real tensors: outside fake mode it counts the storages ``run`` really makes."""
    return activations.traced_peak(run, *modules)


def tiny_config(tiny_llava, tiny_sd, *overrides: str):
    return resolve_config(
        None,
        "tiny",
        (f"captioner.base_model={tiny_llava}", f"generator.base_model={tiny_sd}", *overrides),
        {},
    )


def test_the_storage_counter_counts_new_storages_until_they_are_freed():
    layer = torch.nn.Linear(256, 256)  # 256 KiB of weight: never counted

    def run() -> None:
        a = torch.randn(256, 256)  # 256 KiB
        b = a * 2  # 512 KiB live
        del a  # 256 KiB live
        b.view(-1).unsqueeze(0)  # views: no new storage
        layer(b).sum()  # 256 KiB output + a 4-byte scalar: 512 KiB + 4 live
        c = torch.cat([b, b, b])  # 768 KiB more: 1 MiB live, the peak
        del c

    assert real_peak(run, layer) == 1024 * 1024
    meta = torch.nn.Linear(256, 256, device="meta")
    with activations.fake_tensors():
        fake = activations.materialise(meta, torch.float16)
        assert activations.traced_peak(lambda: fake(torch.randn(64, 256, dtype=torch.float16)), fake) == (
            2 * 64 * 256 * 2  # the fp16 input and output, nothing for the weight
        )


@pytest.mark.parametrize("reference_features", ["per_step", "once"])
def test_the_traced_frame_peak_matches_the_real_sampler(tiny_llava, tiny_sd, reference_features):
    """Three references, three guidance branches, several steps: a sampler that kept the previous step's
    features alive through the next step's reference passes would be ~1.5x the trace."""
    from storygen_ft.generator import FrameGenerator

    # The kept blank-reference features live in host memory, not the device's: the plan leaves them out.
    cfg = tiny_config(tiny_llava, tiny_sd, "generator.num_inference_steps=3", "generator.blank_reference_cache_mib=0",
                      f"generator.reference_features={reference_features}")  # fmt: skip
    generator = FrameGenerator.from_config(cfg.generator)
    references = [Image.new("RGB", (32, 32), (60 * i, 20, 20)) for i in range(3)]
    with torch.no_grad():
        measured = real_peak(
            lambda: generator.generate("A red circle.", references, ["a", "b", "c"], seed=0), generator.model
        )
    traced = plan.sd_generate_item(cfg.generator, "float32").bytes
    assert traced == pytest.approx(measured, rel=TOLERANCE)


def test_the_traced_caption_peak_matches_real_generate(tiny_llava, tiny_sd):
    from llava_ft.captioners import Captioners

    cfg = tiny_config(
        tiny_llava, tiny_sd, "captioner.story_adapter=null", "captioner.description_adapter=null"
    )
    captioners = Captioners.from_config(cfg.captioner)
    prompt_lengths, generate = [], captioners.model.generate

    def recording_generate(*args, **kwargs):
        prompt_lengths.append(kwargs["input_ids"].shape[1])
        return generate(*args, **kwargs)

    captioners.model.generate = recording_generate
    image = Image.new("RGB", (32, 32), (200, 20, 20))
    with torch.no_grad():
        measured = real_peak(lambda: captioners.describe(image, "A story.", "The next."), captioners.model)
    llava = plan.meta_llava(tiny_llava)
    text_tokens = prompt_lengths[0] - activations.image_tokens(llava)
    traced = activations.llava_generate_activations(llava, cfg.captioner, torch.float32, text_tokens)
    assert traced == pytest.approx(measured, rel=TOLERANCE)


def test_the_traced_training_step_matches_a_real_storygen_step(tiny_llava, tiny_sd, toy_stories):
    """``storygen_ft.train``'s step on the CPU (fp32, no autocast): make_batch, then forward and backward
    with only the context layers trainable."""
    from diffusers import DDIMScheduler

    from pipeline.data.vist import load_vist_split
    from storygen_ft.model import StoryDiffusion
    from storygen_ft.train import Example, make_batch

    cfg = tiny_config(tiny_llava, tiny_sd).generator
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=2))
    model = StoryDiffusion.from_pretrained(tiny_sd, context=cfg.context)
    model.context_layers.requires_grad_(True)
    if cfg.train.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    model.train()
    stories = load_vist_split(toy_stories, "train").stories
    examples = [Example(story, len(story.frames) - 1) for story in stories[: cfg.train.batch_size]]

    def step() -> None:
        batch = make_batch(model, examples, cfg, torch.Generator().manual_seed(0))
        model(**batch, reference_timestep_divisor=cfg.reference_timestep_divisor).backward()

    measured = real_peak(step, model)
    scheduler = DDIMScheduler.from_pretrained(tiny_sd, subfolder="scheduler")
    traced = activations.sd_train_activations(plan.meta_sd(tiny_sd), scheduler, cfg, torch.float32, None)
    assert traced == pytest.approx(measured, rel=TOLERANCE)


def test_the_traced_training_step_matches_a_real_llava_step(tiny_llava, tiny_sd, llava_samples):
    """``llava_ft.train``'s step on the CPU (fp32, unquantised): LoRA, gradient checkpointing, the model's
    own loss over a batch of prepare-llava samples, backward."""
    from llava_ft.data import read_conversations
    from llava_ft.model import load_llava
    from llava_ft.train import add_lora, batch_for

    cfg = tiny_config(tiny_llava, tiny_sd).captioner
    cfg = dataclasses.replace(cfg, load_in_4bit=False, train=dataclasses.replace(cfg.train, batch_size=2))
    model, processor = load_llava(tiny_llava)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model = add_lora(model, cfg.lora)
    model.train()
    samples = read_conversations(llava_samples / "story.json", llava_samples / "images")[
        : cfg.train.batch_size
    ]
    batch = batch_for(processor, samples, processor.tokenizer.pad_token_id, torch.device("cpu"))
    measured = real_peak(lambda: model(**batch).loss.backward(), model)
    llava = plan.meta_llava(tiny_llava)
    text_tokens = batch["input_ids"].shape[1] - activations.image_tokens(llava)
    traced = activations.llava_train_activations(llava, cfg, torch.float32, None, text_tokens)
    assert traced == pytest.approx(measured, rel=TOLERANCE)
