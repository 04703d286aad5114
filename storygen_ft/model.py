"""The StoryGen-style diffusion model: SD 1.5 components plus the added context layers.

A model folder is a Stable Diffusion 1.5 diffusers folder (``vae/ text_encoder/ tokenizer/ unet/
scheduler/ model_index.json``, so diffusers' own pipeline can load it too) plus, once finetuned,
``context_layers.safetensors`` and ``story_model.json``. ``StoryDiffusion.from_pretrained(folder)``
loads either kind with one call; the UNet's own weights are never modified by the added layers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

from pipeline.config import OffloadMode, in_cache
from pipeline.errors import StorypipeError, model_load_error, require_model_folder
from pipeline.io import atomic_write_folder, atomic_write_json
from pipeline.offload import Placement, place_modules
from pipeline.tiny_text import build_byte_bpe_tokenizer, tiny_corpus
from storygen_ft.attention import (
    ContextKind,
    StoryAttentionState,
    build_context_layers,
    install_story_processors,
)
from storygen_ft.config import BASE_MODEL_ADVICE, GeneratorConfig, TinyDiffusionSettings

CONTEXT_WEIGHTS = "context_layers.safetensors"
STORY_MODEL_FILE = "story_model.json"
SCHEDULER_CLASSES = {
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "euler": EulerDiscreteScheduler,
    "dpm": DPMSolverMultistepScheduler,
}
# The tiny CLIP tokenizer's special tokens; "<pad>" first keeps the EOS id away from 2, the id that makes
# CLIPTextModel fall back to its legacy (argmax-of-ids) pooling.
TINY_TEXT_SPECIAL_TOKENS = {
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "bos_token": "<s>",
    "eos_token": "</s>",
}
TEXT_MAX_LENGTH = 77  # CLIP's context length, as in SD 1.5


class StoryDiffusion(nn.Module):
    """SD 1.5 components with story processors installed on the UNet and the context layers beside it."""

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer,
        unet: UNet2DConditionModel,
        scheduler,
        context_kind: ContextKind,
        context_layers: nn.ModuleDict | None = None,
    ) -> None:
        super().__init__()
        self.vae, self.text_encoder, self.unet = vae, text_encoder, unet
        self.tokenizer = tokenizer
        self.scheduler = scheduler  # the sampler (DDIM by default)
        # References and training noise use the training (DDPM) schedule, valid for any integer t.
        self.noise_scheduler = DDPMScheduler.from_config(scheduler.config)
        self.context_kind = context_kind
        text_dim = text_encoder.config.hidden_size
        self.context_layers = (
            context_layers
            if context_layers is not None
            else build_context_layers(unet, context_kind, text_dim)
        )
        install_story_processors(unet, self.context_layers, context_kind)
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.placement: Placement | None = None  # set by place()

    # ----------------------------------------------------------------------------------------
    # Loading and saving
    # ----------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | Path, context: ContextKind | None = None, scheduler: str = "ddim"
    ) -> StoryDiffusion:
        """Load an SD 1.5-layout folder or hub id; the added layers too when the folder has them.

        ``context`` defaults to the kind the folder was trained with, else ``"storygen"``.
        """
        folder = Path(name_or_path)
        saved = (
            json.loads((folder / STORY_MODEL_FILE).read_text())
            if (folder / STORY_MODEL_FILE).is_file()
            else None
        )
        if saved is not None and context is not None and context != saved["context"]:
            raise StorypipeError(
                f"{folder} was trained with generator.context={saved['context']!r}, not {context!r}; "
                "set generator.context to match or point generator.base_model at another folder"
            )
        kind = context or (saved["context"] if saved else "storygen")
        vae, text_encoder, tokenizer, sampler = load_sd_parts(name_or_path, scheduler)
        with model_load_errors(name_or_path):
            unet = UNet2DConditionModel.from_pretrained(name_or_path, subfolder="unet")
        model = cls(vae, text_encoder, tokenizer, unet, sampler, kind)
        if saved is not None:
            model.context_layers.load_state_dict(load_file(str(folder / CONTEXT_WEIGHTS)))
        model.requires_grad_(False)
        return model.eval()

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the SD components in diffusers format plus the context layers, atomically."""

        def write(staging: Path) -> None:
            save_sd_components(
                staging, self.vae, self.text_encoder, self.tokenizer, self.unet, self.scheduler
            )
            weights = {
                name: t.detach().contiguous().cpu() for name, t in self.context_layers.state_dict().items()
            }
            save_file(weights, str(staging / CONTEXT_WEIGHTS))
            atomic_write_json(staging / STORY_MODEL_FILE, {"context": self.context_kind, "format": 1})

        # Keep the run's other files (config.yaml, train_log.jsonl) when saving into a run folder.
        return atomic_write_folder(folder, write, keep_existing_files=True)

    def place(
        self, device: torch.device | str, dtype: torch.dtype, offload: OffloadMode = "none"
    ) -> StoryDiffusion:
        """Cast to ``dtype`` and put the components on ``device`` as ``runtime.offload`` says
        (:func:`pipeline.offload.place_modules`): under ``model`` the text encoder, UNet and VAE take
        turns on the GPU in that order, and the context layers (which the UNet's processors call) stay
        there; under ``sequential`` every layer streams its weights in."""
        self.to(dtype=dtype)
        self.placement = place_modules(
            [self.text_encoder, self.unet, self.vae], device, offload, resident=[self.context_layers]
        )
        return self

    def offload(self) -> None:
        """Under ``runtime.offload=model``, move the components back to the CPU (between uses)."""
        if self.placement is not None:
            self.placement.offload()

    # ----------------------------------------------------------------------------------------
    # Training loss
    # ----------------------------------------------------------------------------------------

    def forward(
        self,
        latents: torch.Tensor,
        text: torch.Tensor,
        pooled: torch.Tensor,
        ref_latents: torch.Tensor,
        ref_text: torch.Tensor,
        ref_pooled: torch.Tensor,
        ref_mask: torch.Tensor,
        noise: torch.Tensor,
        ref_noise: torch.Tensor,
        timesteps: torch.Tensor,
        reference_timestep_divisor: int,
    ) -> torch.Tensor:
        """Noise-prediction MSE of the current frame, conditioned on its text and its references.

        Shapes: latents/noise ``(B, C, h, w)``, text ``(B, T, D)``, pooled ``(B, D)``, references
        ``(B, N, ...)`` right-aligned (position N-1 is the newest), ``ref_mask`` ``(B, N)``.
        Reference j of N is noised to ``(t // divisor) * (N - j)`` and run through the frozen UNet.
        """
        batch, count = ref_mask.shape
        with torch.no_grad():
            base = timesteps // reference_timestep_divisor  # (B,)
            ages = torch.arange(count, 0, -1, device=timesteps.device)  # (N,): N .. 1, oldest first
            ref_timesteps = (base[:, None] * ages[None, :]).reshape(-1)  # (B*N,)
            flat = ref_latents.flatten(0, 1)  # (B*N, C, h, w)
            noised_refs = self.noise_scheduler.add_noise(flat, ref_noise.flatten(0, 1), ref_timesteps)
            record = StoryAttentionState(mode="record")
            self.unet(
                noised_refs,
                ref_timesteps,
                encoder_hidden_states=ref_text.flatten(0, 1),
                cross_attention_kwargs={"story": record},
            )
        features = {
            layer: tokens.reshape(batch, count, *tokens.shape[1:])
            for layer, tokens in record.features.items()
        }
        state = StoryAttentionState(
            mode="attend",
            features=features,
            reference_mask=ref_mask,
            query_embedding=pooled,
            key_embeddings=ref_pooled,
        )
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)  # (B, C, h, w)
        prediction = self.unet(
            noisy, timesteps, encoder_hidden_states=text, cross_attention_kwargs={"story": state}
        ).sample
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        return torch.nn.functional.mse_loss(prediction.float(), target.float())

    # ----------------------------------------------------------------------------------------
    # Encoders
    # ----------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """Where the components run: the execution device under offload (the parameters are then on
        the CPU or the meta device), else the UNet's."""
        if self.placement is not None and self.placement.mode != "none":
            return self.placement.execution_device
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def latent_scale(self) -> float:
        return self.vae.config.scaling_factor

    def encode_text(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP token states ``(B, T, D)`` for cross-attention and the pooled sentence embedding ``(B, D)``."""
        return encode_prompts(self.tokenizer, self.text_encoder, texts, device=self.device)

    @property
    def text_max_length(self) -> int:
        return prompt_max_length(self.tokenizer, self.text_encoder)

    def count_text_tokens(self, text: str) -> int:
        return len(self.tokenizer(text).input_ids)

    def images_to_tensor(self, images: Sequence[Image.Image], resolution: int) -> torch.Tensor:
        """RGB images resized to ``resolution``², in [-1, 1]: ``(B, 3, H, W)``."""
        return images_to_pixels(images, resolution).to(self.device, self.vae.dtype)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(B, 3, H, W)`` in [-1, 1] -> scaled latents ``(B, C, H/f, W/f)``: the posterior mean, or with
        ``generator`` a posterior sample (its noise drawn on the CPU, so a seed gives the same on any device)."""
        posterior = self.vae.encode(pixels).latent_dist
        if generator is None:
            return posterior.mode() * self.latent_scale
        eps = torch.randn(posterior.mean.shape, generator=generator).to(posterior.mean)  # (B, C, h, w)
        return (posterior.mean + posterior.std * eps) * self.latent_scale

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> list[Image.Image]:
        pixels = self.vae.decode(latents / self.latent_scale).sample  # (B, 3, H, W) in [-1, 1]
        pixels = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(array) for array in pixels]


@contextmanager
def model_load_errors(name_or_path: str | Path) -> Iterator[None]:
    """Turn a diffusers/transformers loading failure into storypipe's error with the way out."""
    try:
        yield
    except (OSError, ValueError) as exc:
        raise model_load_error(
            "diffusion model",
            name_or_path,
            exc,
            "Set generator.base_model to an SD 1.5-layout folder or a reachable hub id, train one with "
            "`make finetune-storygen`, or use --preset tiny to build a tiny model offline.",
        ) from exc


def load_sd_parts(name_or_path: str | Path, scheduler: str = "ddim") -> tuple:
    """An SD 1.5-layout model's VAE, text encoder, tokenizer and sampler (everything but the UNet)."""
    with model_load_errors(name_or_path):
        vae = AutoencoderKL.from_pretrained(name_or_path, subfolder="vae")
        text_encoder = CLIPTextModel.from_pretrained(name_or_path, subfolder="text_encoder")
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, subfolder="tokenizer")
        sampler = SCHEDULER_CLASSES[scheduler].from_pretrained(name_or_path, subfolder="scheduler")
    return vae, text_encoder, tokenizer, sampler


def prompt_max_length(tokenizer, text_encoder) -> int:
    """Prompt tokens the text encoder reads: the tokenizer's limit or the encoder's positions, whichever is less."""
    return min(tokenizer.model_max_length, text_encoder.config.max_position_embeddings)


@torch.no_grad()
def encode_prompts(
    tokenizer, text_encoder, texts: Sequence[str], device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP token states ``(B, T, D)`` and pooled embeddings ``(B, D)``, padded to the full context length.

    The tokens go to ``device`` (the execution device under offload), else to the encoder's."""
    tokens = tokenizer(
        list(texts),
        padding="max_length",
        truncation=True,
        max_length=prompt_max_length(tokenizer, text_encoder),
        return_tensors="pt",
    ).to(device or text_encoder.device)
    output = text_encoder(tokens.input_ids)
    return output.last_hidden_state, output.pooler_output


def images_to_pixels(images: Sequence[Image.Image], resolution: int) -> torch.Tensor:
    """RGB images resized to ``resolution``², in [-1, 1]: ``(B, 3, H, W)`` float32 on the CPU."""
    arrays = [
        np.asarray(image.convert("RGB").resize((resolution, resolution), Image.Resampling.BICUBIC))
        for image in images
    ]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, H, W)


def save_sd_components(folder: Path, vae, text_encoder, tokenizer, unet, scheduler) -> None:
    """An SD 1.5 diffusers folder (with model_index.json, so StableDiffusionPipeline loads it too)."""
    plain = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    plain.save_pretrained(folder)


def resolve_base_model(cfg: GeneratorConfig) -> str:
    """The model's hub id or folder. The tiny preset's model is built into storypipe's cache on first use
    (``cfg.tiny`` and a folder in the cache); any other missing folder is an error."""
    if (
        cfg.tiny is not None
        and in_cache(cfg.base_model)
        and not Path(cfg.base_model, "model_index.json").is_file()
    ):
        build_tiny_diffusion(cfg.base_model, cfg.tiny)
    require_model_folder("generator.base_model", cfg.base_model, BASE_MODEL_ADVICE)
    return cfg.base_model


def build_tiny_diffusion(folder: str | Path, settings: TinyDiffusionSettings) -> Path:
    """A randomly initialised tiny SD-1.5-layout model (VAE, CLIP text encoder, UNet, DDIM), saved atomically.

    With ``settings.text_encoder`` the text encoder and tokenizer are that CLIP model's text tower
    (trained, and kept frozen like SD 1.5's); everything else starts random.
    """
    folder = Path(folder)
    down_levels = len(settings.vae_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        if settings.text_encoder is not None:
            tokenizer, text_encoder = load_clip_text_tower(settings.text_encoder)
        else:
            tokenizer = build_byte_bpe_tokenizer(
                settings.vocab_size,
                tiny_corpus(),
                special_tokens=TINY_TEXT_SPECIAL_TOKENS,
                template="<s> $A </s>",
                model_max_length=TEXT_MAX_LENGTH,
            )
            text_encoder = CLIPTextModel(
                CLIPTextConfig(
                    vocab_size=len(tokenizer),
                    hidden_size=settings.cross_attention_dim,
                    intermediate_size=4 * settings.cross_attention_dim,
                    num_hidden_layers=settings.text_layers,
                    num_attention_heads=max(1, settings.cross_attention_dim // settings.attention_head_dim),
                    max_position_embeddings=TEXT_MAX_LENGTH,
                    pad_token_id=tokenizer.pad_token_id,
                    bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
            )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * down_levels,
            up_block_types=("UpDecoderBlock2D",) * down_levels,
            block_out_channels=settings.vae_channels,
            latent_channels=settings.latent_channels,
            layers_per_block=1,
            norm_num_groups=min(settings.norm_groups, settings.vae_channels[0]),
            mid_block_add_attention=settings.vae_mid_attention,
            sample_size=settings.resolution,
        )
        levels = len(settings.block_channels)
        plain = settings.levels_without_attention
        down_blocks = ("DownBlock2D",) * plain + ("CrossAttnDownBlock2D",) * (levels - plain)
        up_blocks = ("CrossAttnUpBlock2D",) * (levels - plain) + ("UpBlock2D",) * plain
        unet = UNet2DConditionModel(
            sample_size=settings.resolution // 2 ** (down_levels - 1),
            in_channels=settings.latent_channels,
            out_channels=settings.latent_channels,
            layers_per_block=settings.layers_per_block,
            block_out_channels=settings.block_channels,
            down_block_types=down_blocks,
            up_block_types=up_blocks,
            cross_attention_dim=text_encoder.config.hidden_size,
            attention_head_dim=settings.attention_head_dim,
            norm_num_groups=min(settings.norm_groups, settings.block_channels[0]),
        )
    # SD 1.5's sampler settings.
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )  # fmt: skip
    return atomic_write_folder(
        folder, lambda staging: save_sd_components(staging, vae, text_encoder, tokenizer, unet, scheduler)
    )


def load_clip_text_tower(clip_folder: str | Path) -> tuple:
    """The tokenizer and text tower of a CLIP model folder (``CLIPModel`` or ``CLIPTextModel`` weights)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(clip_folder)
        text_encoder = CLIPTextModel.from_pretrained(clip_folder)
    except (OSError, ValueError) as exc:
        raise model_load_error(
            "CLIP text encoder",
            str(clip_folder),
            exc,
            "Set generator.tiny.text_encoder to a CLIP folder (train one with `storypipe train-clip`) or null.",
        ) from exc
    return tokenizer, text_encoder
