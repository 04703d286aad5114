"""Pretrain a diffusion base from scratch (the toy models): ``pretrain(run)``, top to bottom.

Real runs start from Stable Diffusion 1.5. With no weights to download, the toy preset builds its own
SD-1.5-layout base on ShapeStories, in two phases, before `finetune-storygen` adds the context layers:

1. **VAE**: an ``AutoencoderKL`` learns to reconstruct the training frames (MSE + a tiny KL term);
   its ``scaling_factor`` is then set to 1 / std of the latents, as SD's was.
2. **UNet**: single-frame text-to-image, noise-prediction MSE (StoryGen's first stage), with the VAE
   and the text encoder frozen. Prompts are the frames' descriptions, or with
   ``story_caption_probability`` their story captions; ``text_dropout`` empties some for guidance.

The output is a plain SD 1.5 folder (no context layers), which ``StoryDiffusion.from_pretrained``
and diffusers' ``StableDiffusionPipeline`` both load. Checkpoints every ``checkpoint_every`` steps of
either phase make the run resumable; step s of a phase always draws the same batch and noise.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, CLIPTextModel

from pipeline.config import save_resolved_config
from pipeline.data.vist import load_vist_split
from pipeline.errors import DataError, StorypipeError
from pipeline.io import ImageDecodeError, load_rgb
from pipeline.training import (
    CHECKPOINTS_DIR,
    LOG_FILE,
    append_log,
    global_batch_indices,
    latest_checkpoint,
    truncate_log,
    warmup_cosine_schedule,
    write_checkpoint,
)
from storygen_ft.config import GeneratorConfig
from storygen_ft.model import (
    SCHEDULER_CLASSES,
    build_tiny_diffusion,
    encode_prompts,
    images_to_pixels,
    save_sd_components,
)

TEXT_ENCODE_BATCH = 256
PHASES = ("vae", "unet")


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
    checkpoints = out_dir / CHECKPOINTS_DIR
    if not run.resume and checkpoints.exists():
        raise StorypipeError(
            f"{out_dir} already holds a run; pass --resume to continue it or choose another --out"
        )
    torch.manual_seed(pcfg.seed)

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
    try:
        images = [load_rgb(frame.image_file) for frame in frames]
    except ImageDecodeError as exc:
        raise DataError(str(exc)) from exc
    pixels = images_to_pixels(images, cfg.resolution)  # (N, 3, H, W)

    start = {"phase": 0, "step": 0}
    if run.resume:
        latest, _ = latest_checkpoint(checkpoints)
        state = torch.load(latest / "progress.pt", weights_only=True)
        start = {"phase": int(state["phase"]), "step": int(state["step"])}
        vae.load_state_dict(load_file(str(latest / "vae.safetensors")))
        unet.load_state_dict(load_file(str(latest / "unet.safetensors")))
        truncate_log(out_dir / LOG_FILE, after_step=_global_step(start["phase"], start["step"], pcfg))
    out_dir.mkdir(parents=True, exist_ok=True)
    save_resolved_config(run.resolved_config if run.resolved_config is not None else cfg, out_dir)

    progress = Progress(
        TextColumn("pretrain-diffusion {task.fields[phase]}"), BarColumn(), MofNCompleteColumn(),
        TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
    )  # fmt: skip
    with progress:
        # 3. Phase 1, the VAE: reconstruct the frames.
        if start["phase"] == 0 and pcfg.vae_steps:
            vae.train().requires_grad_(True)
            optimizer = torch.optim.AdamW(vae.parameters(), lr=pcfg.vae_learning_rate)
            schedule = warmup_cosine_schedule(optimizer, 0, pcfg.vae_steps)
            if run.resume and start["step"]:
                _load_optimizer(checkpoints, optimizer, schedule)
            bar = progress.add_task(
                "vae", total=pcfg.vae_steps, completed=start["step"], phase="vae", status=""
            )
            for step in range(start["step"], pcfg.vae_steps):
                rng = torch.Generator().manual_seed(pcfg.seed * 1_000_003 + step)
                batch = pixels[global_batch_indices(step, len(frames), pcfg.vae_batch_size, pcfg.seed)]
                posterior = vae.encode(batch).latent_dist
                latents = posterior.mean + posterior.std * torch.randn(
                    posterior.mean.shape, generator=rng
                )  # (B, C, h, w)
                reconstruction = vae.decode(latents).sample  # (B, 3, H, W)
                mse = torch.nn.functional.mse_loss(reconstruction, batch)
                loss = mse + pcfg.vae_kl_weight * posterior.kl().mean()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(vae.parameters(), pcfg.max_grad_norm)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                done = step + 1
                append_log(out_dir / LOG_FILE, {"step": _global_step(0, done, pcfg), "phase": "vae",
                                                "loss": loss.item(), "mse": mse.item()})  # fmt: skip
                if done % pcfg.checkpoint_every == 0 and done < pcfg.vae_steps:
                    _checkpoint(checkpoints, 0, done, vae, unet, optimizer, schedule, pcfg)
                progress.update(bar, completed=done, status=f"mse {mse.item():.4f}")
            start = {"phase": 1, "step": 0}
        vae.eval().requires_grad_(False)

        # 4. Latents (the posterior mean) and the scaling factor that gives them unit variance, as SD's.
        with torch.no_grad():
            latents = torch.cat(
                [vae.encode(chunk).latent_dist.mode() for chunk in pixels.split(TEXT_ENCODE_BATCH)]
            )  # (N, C, h, w)
        vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
        latents = latents * vae.config.scaling_factor

        # 5. Prompt embeddings, computed once with the frozen text encoder.
        def encode_all(texts: list[str]) -> torch.Tensor:
            chunks = range(0, len(texts), TEXT_ENCODE_BATCH)
            return torch.cat(
                [encode_prompts(tokenizer, text_encoder, texts[i : i + TEXT_ENCODE_BATCH])[0] for i in chunks]
            )

        descriptions = encode_all([frame.description for frame in frames])  # (N, T, D)
        story_captions = encode_all([frame.story_caption for frame in frames])  # (N, T, D)
        empty = encode_all([""])  # (1, T, D)

        # 6. Phase 2, the UNet: single-frame text-to-image.
        unet.train().requires_grad_(True)
        optimizer = torch.optim.AdamW(
            unet.parameters(), lr=pcfg.learning_rate, weight_decay=pcfg.weight_decay
        )
        schedule = warmup_cosine_schedule(optimizer, pcfg.warmup_steps, pcfg.unet_steps)
        if run.resume and start["phase"] == 1 and start["step"]:
            _load_optimizer(checkpoints, optimizer, schedule)
        train_steps = noise_scheduler.config.num_train_timesteps
        bar = progress.add_task(
            "unet", total=pcfg.unet_steps, completed=start["step"], phase="unet", status=""
        )
        for step in range(start["step"] if start["phase"] == 1 else 0, pcfg.unet_steps):
            rng = torch.Generator().manual_seed(pcfg.seed * 1_000_003 + 7_919 + step)
            indices = torch.tensor(global_batch_indices(step, len(frames), pcfg.batch_size, pcfg.seed))
            batch = len(indices)
            use_story = torch.rand(batch, generator=rng) < pcfg.story_caption_probability  # (B,)
            drop = torch.rand(batch, generator=rng) < pcfg.text_dropout  # (B,)
            text = torch.where(
                use_story[:, None, None], story_captions[indices], descriptions[indices]
            )  # (B, T, D)
            text = torch.where(drop[:, None, None], empty.expand_as(text), text)  # (B, T, D)
            clean = latents[indices]  # (B, C, h, w)
            noise = torch.randn(clean.shape, generator=rng)  # (B, C, h, w)
            timesteps = torch.randint(0, train_steps, (batch,), generator=rng)  # (B,)
            noisy = noise_scheduler.add_noise(clean, noise, timesteps)
            prediction = unet(noisy, timesteps, encoder_hidden_states=text).sample  # (B, C, h, w)
            loss = torch.nn.functional.mse_loss(prediction, noise)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), pcfg.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            append_log(out_dir / LOG_FILE, {"step": _global_step(1, done, pcfg), "phase": "unet",
                                            "loss": loss.item(), "lr": schedule.get_last_lr()[0]})  # fmt: skip
            if done % pcfg.checkpoint_every == 0 and done < pcfg.unet_steps:
                _checkpoint(checkpoints, 1, done, vae, unet, optimizer, schedule, pcfg)
            progress.update(bar, completed=done, status=f"loss {loss.item():.4f}")

    # 7. Save a plain SD 1.5 folder (the run's config and log stay beside it).
    unet.eval().requires_grad_(False)
    save_sd_components(out_dir, vae, text_encoder, tokenizer, unet, sampler)
    shutil.rmtree(checkpoints, ignore_errors=True)
    return out_dir


def _global_step(phase: int, step: int, pcfg) -> int:
    """One step count across both phases, for the log."""
    return step + (pcfg.vae_steps if phase == 1 else 0)


def _checkpoint(folder: Path, phase: int, step: int, vae, unet, optimizer, schedule, pcfg) -> None:
    def write(staging: Path) -> None:
        save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(staging / "vae.safetensors"))
        save_file(
            {k: v.contiguous() for k, v in unet.state_dict().items()}, str(staging / "unet.safetensors")
        )
        torch.save(optimizer.state_dict(), staging / "optimizer.pt")
        torch.save(schedule.state_dict(), staging / "scheduler.pt")
        torch.save({"phase": phase, "step": step}, staging / "progress.pt")

    write_checkpoint(folder, _global_step(phase, step, pcfg), write, pcfg.keep_checkpoints)


def _load_optimizer(folder: Path, optimizer, schedule) -> None:
    latest, _ = latest_checkpoint(folder)
    optimizer.load_state_dict(torch.load(latest / "optimizer.pt", weights_only=True))
    schedule.load_state_dict(torch.load(latest / "scheduler.pt", weights_only=True))
