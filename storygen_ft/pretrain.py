"""Pretrain a diffusion base from scratch (the toy models): ``pretrain(run)``, top to bottom.

Real runs start from Stable Diffusion 1.5. With no weights to download, the toy preset builds its own
SD-1.5-layout base on ShapeStories, in two phases, before `finetune-storygen` adds the context layers:

1. **VAE**: an ``AutoencoderKL`` learns to reconstruct the training frames (MSE + a tiny KL term);
   its ``scaling_factor`` is then set to 1 / std of the latents, as SD's was.
2. **UNet**: single-frame text-to-image, noise-prediction MSE (StoryGen's first stage), with the VAE
   and the text encoder frozen. Prompts are the frames' descriptions, or with
   ``story_caption_probability`` their story captions; ``text_dropout`` empties some for guidance.

The output is a plain SD 1.5 folder (no context layers), which ``StoryDiffusion.from_pretrained``
and diffusers' ``StableDiffusionPipeline`` both load. Steps count on across the phases (the UNet's first
step is ``vae_steps + 1``); a checkpoint every ``checkpoint_every`` of them (``pipeline.training.
TrainingRun``: both models, both phases' optimizers and schedules) makes the run resumable, and step s of
a phase always draws the same batch and noise.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import AutoTokenizer, CLIPTextModel

from pipeline.config import save_resolved_config
from pipeline.data.vist import load_vist_split
from pipeline.errors import DataError, StorypipeError
from pipeline.io import ImageDecodeError, load_rgb
from pipeline.training import TrainingRun, global_batch_indices, seeded_generator, warmup_cosine_schedule
from storygen_ft.config import GeneratorConfig
from storygen_ft.model import (
    SCHEDULER_CLASSES,
    build_tiny_diffusion,
    encode_prompts,
    images_to_pixels,
    save_sd_components,
)

TEXT_ENCODE_BATCH = 256


@dataclass
class PretrainRun:
    generator: GeneratorConfig
    data_dir: Path
    out_dir: Path
    split: str = "train"
    resume: bool = False
    resolved_config: Any = None  # the whole resolved storypipe config, written into the run


def pretrain(run: PretrainRun) -> Path:
    cfg = run.generator
    if cfg.pretrain is None or cfg.tiny is None:
        raise StorypipeError(
            "pretrain-diffusion needs generator.pretrain and generator.tiny (the architecture to build); "
            "use --preset toy, or start from a pretrained base with finetune-storygen instead"
        )
    pcfg, out_dir = cfg.pretrain, Path(run.out_dir)
    total_steps = pcfg.vae_steps + pcfg.unet_steps  # one step count across both phases

    with TrainingRun(
        out_dir, "pretrain-diffusion", checkpoint_every=pcfg.checkpoint_every,
        keep_checkpoints=pcfg.keep_checkpoints, resume=run.resume, seed=pcfg.seed,
    ) as training:  # fmt: skip
        device = training.device

        # 1. Data: every frame of the split, as pixels in [-1, 1] held in memory (toy datasets are small).
        split = load_vist_split(run.data_dir, run.split)
        frames = [frame for story in split.stories for frame in story.frames]
        if not frames:
            raise DataError(
                f"no usable story in split {run.split!r} of {run.data_dir}: " + "; ".join(split.drop_report())
            )

        # 2. The architecture, randomly initialised (text encoder from the CLIP folder, when one is named).
        with tempfile.TemporaryDirectory() as scratch:
            build_tiny_diffusion(Path(scratch) / "init", cfg.tiny)
            init = Path(scratch) / "init"
            vae = AutoencoderKL.from_pretrained(init, subfolder="vae")
            unet = UNet2DConditionModel.from_pretrained(init, subfolder="unet")
            text_encoder = CLIPTextModel.from_pretrained(init, subfolder="text_encoder").requires_grad_(False)
            tokenizer = AutoTokenizer.from_pretrained(init, subfolder="tokenizer")
            sampler = SCHEDULER_CLASSES[cfg.scheduler].from_pretrained(init, subfolder="scheduler")
        noise_scheduler = DDPMScheduler.from_config(sampler.config)
        text_encoder.to(device)
        try:
            images = [load_rgb(frame.image_file) for frame in frames]
        except ImageDecodeError as exc:
            raise DataError(str(exc)) from exc
        pixels = images_to_pixels(images, cfg.resolution).to(device)  # (N, 3, H, W)

        # 3. Both phases' optimizers and schedules, made up front so that every checkpoint holds the same
        #    objects (the VAE's, then the UNet's) whichever phase wrote it.
        vae_optimizer = torch.optim.AdamW(vae.parameters(), lr=pcfg.vae_learning_rate)
        vae_schedule = warmup_cosine_schedule(vae_optimizer, 0, pcfg.vae_steps)
        unet_optimizer = torch.optim.AdamW(
            unet.parameters(), lr=pcfg.learning_rate, weight_decay=pcfg.weight_decay
        )
        unet_schedule = warmup_cosine_schedule(unet_optimizer, pcfg.warmup_steps, pcfg.unet_steps)
        vae, unet, vae_optimizer, unet_optimizer = training.prepare(vae, unet, vae_optimizer, unet_optimizer)
        training.accelerator.register_for_checkpointing(vae_schedule, unet_schedule)
        start_step = training.start(total_steps)
        save_resolved_config(run.resolved_config if run.resolved_config is not None else cfg, out_dir)

        # 4. Phase 1, the VAE: reconstruct the frames. Step s draws batch s and noise from (seed, s).
        vae.train().requires_grad_(True)
        for step in range(start_step, pcfg.vae_steps):
            rng = seeded_generator(pcfg.seed, "vae step", step)
            batch = pixels[global_batch_indices(step, len(frames), pcfg.vae_batch_size, pcfg.seed)]
            posterior = vae.encode(batch).latent_dist
            noise = torch.randn(posterior.mean.shape, generator=rng).to(device)  # (B, C, h, w)
            latents = posterior.mean + posterior.std * noise  # (B, C, h, w)
            reconstruction = vae.decode(latents).sample  # (B, 3, H, W)
            mse = torch.nn.functional.mse_loss(reconstruction, batch)
            loss = mse + pcfg.vae_kl_weight * posterior.kl().mean()
            training.accelerator.backward(loss)
            torch.nn.utils.clip_grad_norm_(vae.parameters(), pcfg.max_grad_norm)
            vae_optimizer.step()
            vae_schedule.step()
            vae_optimizer.zero_grad(set_to_none=True)
            record = {"step": step + 1, "phase": "vae", "loss": loss.item(), "mse": mse.item()}
            training.log(record, status=f"vae mse {record['mse']:.4f}")
            training.maybe_checkpoint(step + 1)
        vae.eval().requires_grad_(False)

        # 5. Latents (the posterior mean) and the scaling factor that gives them unit variance, as SD's.
        with torch.no_grad():
            latents = torch.cat(
                [vae.encode(chunk).latent_dist.mode() for chunk in pixels.split(TEXT_ENCODE_BATCH)]
            )  # (N, C, h, w)
        vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
        latents = latents * vae.config.scaling_factor

        # 6. Prompt embeddings, computed once with the frozen text encoder.
        def encode_all(texts: list[str]) -> torch.Tensor:
            chunks = range(0, len(texts), TEXT_ENCODE_BATCH)
            return torch.cat(
                [encode_prompts(tokenizer, text_encoder, texts[i : i + TEXT_ENCODE_BATCH])[0] for i in chunks]
            )

        descriptions = encode_all([frame.description for frame in frames])  # (N, T, D)
        story_captions = encode_all([frame.story_caption for frame in frames])  # (N, T, D)
        empty = encode_all([""])  # (1, T, D)

        # 7. Phase 2, the UNet: single-frame text-to-image. Its step u = s - vae_steps draws from (seed, u).
        unet.train().requires_grad_(True)
        train_steps = noise_scheduler.config.num_train_timesteps
        for step in range(max(start_step, pcfg.vae_steps), total_steps):
            unet_step = step - pcfg.vae_steps
            rng = seeded_generator(pcfg.seed, "unet step", unet_step)
            indices = torch.tensor(global_batch_indices(unet_step, len(frames), pcfg.batch_size, pcfg.seed))
            batch = len(indices)
            use_story = (torch.rand(batch, generator=rng) < pcfg.story_caption_probability).to(device)  # (B,)
            drop = (torch.rand(batch, generator=rng) < pcfg.text_dropout).to(device)  # (B,)
            indices = indices.to(device)
            text = torch.where(
                use_story[:, None, None], story_captions[indices], descriptions[indices]
            )  # (B, T, D)
            text = torch.where(drop[:, None, None], empty.expand_as(text), text)  # (B, T, D)
            clean = latents[indices]  # (B, C, h, w)
            noise = torch.randn(clean.shape, generator=rng).to(device)  # (B, C, h, w)
            timesteps = torch.randint(0, train_steps, (batch,), generator=rng).to(device)  # (B,)
            noisy = noise_scheduler.add_noise(clean, noise, timesteps)  # (B, C, h, w)
            prediction = unet(noisy, timesteps, encoder_hidden_states=text).sample  # (B, C, h, w)
            loss = torch.nn.functional.mse_loss(prediction, noise)
            training.accelerator.backward(loss)
            torch.nn.utils.clip_grad_norm_(unet.parameters(), pcfg.max_grad_norm)
            unet_optimizer.step()
            unet_schedule.step()
            unet_optimizer.zero_grad(set_to_none=True)
            record = {
                "step": step + 1,
                "phase": "unet",
                "loss": loss.item(),
                "lr": unet_schedule.get_last_lr()[0],
            }
            training.log(record, status=f"unet loss {record['loss']:.4f}")
            training.maybe_checkpoint(step + 1)

        # 8. Save a plain SD 1.5 folder (the run's config and log stay beside it).
        unet.eval().requires_grad_(False)
        save_sd_components(out_dir, vae.cpu(), text_encoder.cpu(), tokenizer, unet.cpu(), sampler)
        training.finish()
    return out_dir
