"""Finetune the StoryGen-style context layers on stories: ``train(run)``, top to bottom.

Data: a VIST-layout folder (VIST, ShapeStories, converted FlintstonesSV/PororoSV). Each example is a
frame k >= 1 of a usable story, captioned with its **description** (DII, the source paper's choice),
conditioned on 1..min(K, k) of the frames before it (uniformly at random). With
``story_caption_probability`` an example is captioned with story captions instead, so the context
layers learn to recover who "he"/"she"/"they" are from the reference frames.

Only the added layers train by default (optionally also a LoRA on the UNet's attention). Text is
dropped with ``text_dropout``, references with ``reference_dropout`` (blank images, empty captions), so
both guidance scales have an unconditional branch to work against (StoryGen's recipe).

Every random choice of step s (which references, dropout, noise, timesteps) comes from a generator
seeded by ``derive_seed(seed, "storygen step", s, process)``, and the batch from the seeded data order: a
resumed run (``pipeline.training.TrainingRun`` checkpoints: trainable tensors only, optimizer, scheduler,
log) repeats exactly the steps it would have run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import get_constant_schedule_with_warmup

from pipeline.config import save_resolved_config
from pipeline.data.vist import VistFrame, VistStory, load_vist_split
from pipeline.errors import DataError, StorypipeError
from pipeline.io import ImageDecodeError, load_rgb
from pipeline.training import TrainingRun, global_batch_indices, seeded_generator
from storygen_ft.config import GeneratorConfig
from storygen_ft.model import StoryDiffusion, resolve_base_model


@dataclass
class StoryGenRun:
    generator: GeneratorConfig
    data_dir: Path
    out_dir: Path
    split: str = "train"
    resume: bool = False
    resolved_config: Any = None  # the whole resolved storypipe config, written into the run


@dataclass
class Example:
    story: VistStory
    frame: int  # k >= 1: the frame to generate


def train(run: StoryGenRun) -> Path:
    cfg, tcfg = run.generator, run.generator.train
    out_dir = Path(run.out_dir)
    if cfg.max_references < 1:
        raise StorypipeError("generator.max_references must be >= 1 to train the context layers")

    # 1. Devices and precision: mixed precision and 8-bit Adam on CUDA; fp32 on the CPU.
    with TrainingRun(
        out_dir, "finetune-storygen", checkpoint_every=tcfg.checkpoint_every,
        keep_checkpoints=tcfg.keep_checkpoints, resume=run.resume, mixed_precision=tcfg.mixed_precision,
        seed=tcfg.seed,
    ) as training:  # fmt: skip
        accelerator = training.accelerator
        frozen_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
            accelerator.mixed_precision, torch.float32
        )

        # 2. Data: every frame k >= 1 of every structurally usable story (images decode lazily, per batch).
        vist = load_vist_split(run.data_dir, run.split)
        examples = [Example(story, k) for story in vist.stories for k in range(1, len(story.frames))]
        if not examples:
            raise DataError(
                f"no usable story in split {run.split!r} of {run.data_dir}: " + "; ".join(vist.drop_report())
            )
        global_batch = tcfg.batch_size * tcfg.gradient_accumulation_steps * accelerator.num_processes

        # 3. Model: frozen SD components (in the mixed-precision dtype), trainable context layers in fp32.
        model = StoryDiffusion.from_pretrained(
            resolve_base_model(cfg), context=cfg.context, scheduler=cfg.scheduler
        )
        for component in (model.vae, model.text_encoder, model.unet):
            component.to(accelerator.device)
            if frozen_dtype != torch.float32:
                component.to(frozen_dtype)
        model.context_layers.to(accelerator.device).requires_grad_(True)
        if tcfg.unet_lora_rank is not None:
            from peft import LoraConfig

            lora = LoraConfig(
                r=tcfg.unet_lora_rank,
                lora_alpha=tcfg.unet_lora_rank,
                target_modules=["to_q", "to_k", "to_v", "to_out.0"],
            )
            model.unet.add_adapter(lora)
            for parameter in model.unet.parameters():
                if parameter.requires_grad:
                    parameter.data = parameter.data.float()  # trainable weights stay fp32 under fp16 autocast
        if tcfg.gradient_checkpointing:
            model.unet.enable_gradient_checkpointing()
        trainable = [p for p in model.parameters() if p.requires_grad]

        # 4. Optimizer and schedule (registered for checkpoints, not prepared: it steps once per step).
        #    Checkpoints keep the trainable tensors only, never the frozen SD components.
        if training.device.type == "cuda" and tcfg.use_8bit_adam:
            import bitsandbytes as bnb

            optimizer = bnb.optim.AdamW8bit(trainable, lr=tcfg.learning_rate, weight_decay=tcfg.weight_decay)
        else:
            optimizer = torch.optim.AdamW(trainable, lr=tcfg.learning_rate, weight_decay=tcfg.weight_decay)
        scheduler = get_constant_schedule_with_warmup(optimizer, min(tcfg.warmup_steps, tcfg.max_steps))
        model, optimizer = training.prepare(model, optimizer)
        accelerator.register_for_checkpointing(scheduler)
        story_model: StoryDiffusion = accelerator.unwrap_model(model)

        # 5. Resume from the newest checkpoint.
        start_step = training.start(tcfg.max_steps)
        if accelerator.is_main_process:
            save_resolved_config(run.resolved_config if run.resolved_config is not None else cfg, out_dir)

        # 6. The loop. Every random choice of step s comes from a generator of (seed, s, process).
        for step in range(start_step, tcfg.max_steps):
            model.train()
            rng = seeded_generator(tcfg.seed, "storygen step", step, accelerator.process_index)
            indices = global_batch_indices(step, len(examples), global_batch, tcfg.seed)
            local = indices[accelerator.process_index :: accelerator.num_processes]
            micro_batches = [local[i : i + tcfg.batch_size] for i in range(0, len(local), tcfg.batch_size)]
            step_loss = torch.zeros((), device=accelerator.device)
            for micro, batch_indices in enumerate(micro_batches):
                inputs = make_batch(story_model, [examples[i] for i in batch_indices], cfg, rng)
                with accelerator.autocast():
                    loss = model(**inputs, reference_timestep_divisor=cfg.reference_timestep_divisor)
                if micro < len(micro_batches) - 1:
                    with accelerator.no_sync(model):
                        accelerator.backward(loss / len(micro_batches))
                else:
                    accelerator.backward(loss / len(micro_batches))
                step_loss += loss.detach() / len(micro_batches)
            accelerator.clip_grad_norm_(trainable, tcfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            done = step + 1
            training.log(
                {
                    "step": done,
                    "loss": accelerator.reduce(step_loss, "mean").item(),
                    "lr": scheduler.get_last_lr()[0],
                }
            )
            training.maybe_checkpoint(done)

        # 7. Save a folder that loads with StoryDiffusion.from_pretrained(out_dir).
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if tcfg.unet_lora_rank is not None:
                story_model.unet.fuse_lora()  # bake the LoRA in, so the UNet folder stays plain SD 1.5
                story_model.unet.unload_lora()
            if frozen_dtype != torch.float32:
                for component in (story_model.vae, story_model.text_encoder, story_model.unet):
                    component.to(torch.float32)
            story_model.save_pretrained(out_dir)
        training.finish()  # the finished model supersedes the checkpoints
    return out_dir


def frame_description(frame: VistFrame) -> str:
    return frame.description


def frame_story_caption(frame: VistFrame) -> str:
    return frame.story_caption


def make_batch(
    model: StoryDiffusion, examples: list[Example], cfg: GeneratorConfig, rng: torch.Generator
) -> dict:
    """Encode a micro-batch: targets, texts, right-aligned references (newest last), noise and timesteps."""
    tcfg, device, count = cfg.train, model.device, cfg.max_references
    blank = Image.new("RGB", (cfg.resolution, cfg.resolution))
    targets, texts, ref_images, ref_texts, masks = [], [], [], [], []
    for example in examples:
        frames = example.story.frames
        available = min(count, example.frame)
        used = int(torch.randint(1, available + 1, (1,), generator=rng))  # 1..min(K, k) references
        previous = frames[example.frame - used : example.frame]  # oldest first
        drop_text = float(torch.rand((), generator=rng)) < tcfg.text_dropout
        drop_refs = float(torch.rand((), generator=rng)) < tcfg.reference_dropout
        use_story_captions = float(torch.rand((), generator=rng)) < tcfg.story_caption_probability
        caption_of = frame_story_caption if use_story_captions else frame_description
        try:
            target = load_rgb(frames[example.frame].image_file)
            images = [blank if drop_refs else load_rgb(frame.image_file) for frame in previous]
        except ImageDecodeError as exc:
            raise DataError(f"story {example.story.story_id}: {exc}") from exc
        targets.append(target)
        texts.append("" if drop_text else caption_of(frames[example.frame]))
        padding = count - used
        ref_images += [blank] * padding + images
        ref_texts += [""] * padding + ["" if drop_refs else caption_of(frame) for frame in previous]
        masks.append([False] * padding + [True] * used)

    batch = len(examples)
    with torch.no_grad():
        latents = model.encode_images(model.images_to_tensor(targets, cfg.resolution))  # (B, C, h, w)
        ref_latents = model.encode_images(
            model.images_to_tensor(ref_images, cfg.resolution)
        )  # (B*N, C, h, w)
        text, pooled = model.encode_text(texts)  # (B, T, D), (B, D)
        ref_text, ref_pooled = model.encode_text(ref_texts)  # (B*N, T, D), (B*N, D)
    train_steps = model.noise_scheduler.config.num_train_timesteps
    return {
        "latents": latents,
        "text": text,
        "pooled": pooled,
        "ref_latents": ref_latents.reshape(batch, count, *ref_latents.shape[1:]),  # (B, N, C, h, w)
        "ref_text": ref_text.reshape(batch, count, *ref_text.shape[1:]),  # (B, N, T, D)
        "ref_pooled": ref_pooled.reshape(batch, count, -1),  # (B, N, D)
        "ref_mask": torch.tensor(masks, device=device),  # (B, N)
        "noise": torch.randn(latents.shape, generator=rng).to(device, latents.dtype),
        "ref_noise": torch.randn((batch, count, *ref_latents.shape[1:]), generator=rng).to(
            device, latents.dtype
        ),
        "timesteps": torch.randint(0, train_steps, (batch,), generator=rng).to(device),
    }
