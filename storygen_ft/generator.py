"""Frame generation: the next frame from its description and up to K previous frames.

Guidance follows StoryGen's three branches (``../shared/reference.md``):

| branch | text   | reference images | reference captions |
|--------|--------|------------------|--------------------|
| uncond | uncond | blank image      | uncond             |
| image  | uncond | real             | cond               |
| all    | cond   | real             | cond               |

``eps = eps_uncond + s_img * (eps_image - eps_uncond) + s_txt * (eps_all - eps_image)``.

Reference features come from the same UNet run on the references, noised to a small timestep derived
from the current one (StoryGen: ``t // 10``, older references noisier). The *image* and *all* branches
share the real references, so their features are computed once per step (``share_reference_passes``),
bit-identical to recomputing them per branch. Fast mode (``reference_features="once"``) computes them
once per frame at a fixed small timestep. With no reference the model is plain SD 1.5 with text guidance.
References are not padded: fewer than K are masked (a row attends only to the references it has).

``storygen_exact`` (weights from ``storypipe import-storygen``) also follows StoryGen's sampler where it
differs from the above (haoningwu3639/StoryGen, model/pipeline.py ``__call__``, inference.py):

* References are fed in [0, 1]: their ``ref_image * 2. - 1.`` loop is a no-op (dataset.py, inference.py).
* References are encoded with a posterior sample (``latent_dist.sample()``), not the posterior mean.
* The blank image is encoded once, and that one latent is every reference's blank (``zero_image_prompt``).
* One reference noise is drawn per frame, before the loop, and reused: the same tensor for every
  reference, for the blank and the real references, and at every denoising step (their
  ``noise = torch.randn_like(image_prompts[0])``; their training shares one ``ref_noise`` likewise).

StoryGen draws that sample and noise from the unseeded global RNG; we draw them from the frame's seeded
generator, after the starting noise, so a seed still gives one frame. Already the same in every mode: the
branches, their inputs and the formula above; reference i of N at ``(t // 10) * (N - i)`` (their
``auto-regressive`` stage, as trained); DDIM with SD 1.5's scheduler config, eta 0, 40 steps, scales 7.0
and 3.5 (inference.py). Not copied: with ``guidance_scale <= 1`` StoryGen turns guidance off, but its
reference pass then gets a list as text and fails; we keep the three branches at every scale.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from pipeline.config import OffloadMode
from pipeline.orchestrator import FrameRequest
from storygen_ft.attention import StoryAttentionState
from storygen_ft.config import GeneratorConfig
from storygen_ft.model import StoryDiffusion, resolve_base_model


@dataclass
class FrameResult:
    image: Image.Image
    unet_evaluations: int  # UNet sample-passes (batch rows), references included
    seconds: float
    prompt_truncated: bool  # the description had more tokens than the text encoder reads


@dataclass
class _References:
    """Everything about one frame's references that does not change across denoising steps."""

    latents: torch.Tensor  # (N, C, h, w), real references
    blank_latents: torch.Tensor  # (N, C, h, w), blank images (the uncond branch)
    noise: torch.Tensor | None  # (N, C, h, w), storygen_exact's one reference noise; None: fresh per pass
    text: torch.Tensor  # (N, T, D), each reference's own description
    uncond_text: torch.Tensor  # (N, T, D)
    pooled: torch.Tensor  # (N, D), sentence embeddings of the descriptions (memory keys)
    uncond_pooled: torch.Tensor  # (N, D)


class FrameGenerator:
    def __init__(self, model: StoryDiffusion, cfg: GeneratorConfig) -> None:
        self.model = model
        self.cfg = cfg
        self._evaluations = 0

    @classmethod
    def from_config(
        cls, cfg: GeneratorConfig, device: torch.device | str = "cpu", offload: OffloadMode = "none"
    ) -> FrameGenerator:
        """Load the model and place it on ``device`` as ``offload`` (``runtime.offload``) says."""
        model = StoryDiffusion.from_pretrained(
            resolve_base_model(cfg), context=cfg.context, scheduler=cfg.scheduler
        )
        dtype = getattr(torch, cfg.torch_dtype_name(torch.device(device).type))
        return cls(model.place(device, dtype, offload), cfg)

    @property
    def max_references(self) -> int:
        return self.cfg.max_references

    def exceeds_prompt_limit(self, text: str) -> bool:
        """True when the text encoder would truncate ``text``."""
        return self.model.count_text_tokens(text) > self.model.text_max_length

    # ----------------------------------------------------------------------------------------

    def check_inputs(
        self,
        description: str,
        context_images: Sequence[Image.Image],
        context_descriptions: Sequence[str],
        num_inference_steps: int,
        guidance_scale: float,
        image_guidance_scale: float,
        init_image: Image.Image | None,
        strength: float | None,
    ) -> None:
        if not isinstance(description, str) or not description.strip():
            raise ValueError("the description must be a non-empty string")
        if len(context_images) != len(context_descriptions):
            raise ValueError(
                f"{len(context_images)} context images but {len(context_descriptions)} context descriptions"
            )
        if len(context_images) > self.cfg.max_references:
            raise ValueError(
                f"{len(context_images)} context frames given, but the model reads at most "
                f"generator.max_references={self.cfg.max_references}; pass the most recent ones"
            )
        for image in [*context_images, *([init_image] if init_image is not None else [])]:
            if not isinstance(image, Image.Image):
                raise ValueError(f"images must be PIL images, got {type(image).__name__}")
            if min(image.size) < 8:
                raise ValueError(f"image of size {image.size} is too small")
        if any(not isinstance(text, str) or not text.strip() for text in context_descriptions):
            raise ValueError("context descriptions must be non-empty strings")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if guidance_scale < 0 or image_guidance_scale < 0:
            raise ValueError(f"guidance scales must be >= 0, got {guidance_scale} and {image_guidance_scale}")
        if init_image is None and strength is not None:
            raise ValueError("strength applies to img2img only: give init_image too")
        if strength is not None and not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")

    @torch.no_grad()
    def generate(
        self,
        description: str,
        context_images: Sequence[Image.Image] = (),
        context_descriptions: Sequence[str] = (),
        seed: int = 0,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        image_guidance_scale: float | None = None,
        init_image: Image.Image | None = None,
        strength: float | None = None,
        reference_features: str | None = None,
        share_reference_passes: bool = True,
        on_step: Callable[[int, int], None] | None = None,
    ) -> FrameResult:
        """The next frame. ``context_*`` are the previous frames (oldest first, at most K) and their
        descriptions; ``init_image`` + ``strength`` make it an img2img edit of an existing frame."""
        cfg, model = self.cfg, self.model
        steps = cfg.num_inference_steps if num_inference_steps is None else num_inference_steps
        s_txt = cfg.guidance_scale if guidance_scale is None else guidance_scale
        s_img = cfg.image_guidance_scale if image_guidance_scale is None else image_guidance_scale
        once = (reference_features or cfg.reference_features) == "once"
        self.check_inputs(
            description, context_images, context_descriptions, steps, s_txt, s_img, init_image, strength
        )
        try:
            started, self._evaluations = time.perf_counter(), 0
            generator = torch.Generator().manual_seed(seed)

            # 1. Text: the description and the empty prompt.
            text, pooled = model.encode_text(["", description])  # (2, T, D), (2, D)

            # 2. Starting latents: pure noise, or the init image noised to `strength` (img2img).
            model.scheduler.set_timesteps(steps, device=model.device)
            timesteps = model.scheduler.timesteps
            side = cfg.resolution // model.vae_scale
            shape = (1, model.unet.config.in_channels, side, side)
            noise = torch.randn(shape, generator=generator).to(model.device, model.dtype)  # drawn on the CPU
            if init_image is None:
                latents = noise * model.scheduler.init_noise_sigma  # (1, C, h, w)
            else:
                kept = max(1, round(steps * strength))
                timesteps = timesteps[steps - kept :]
                init = model.encode_images(model.images_to_tensor([init_image], cfg.resolution))
                latents = model.scheduler.add_noise(init, noise, timesteps[:1])

            # 3. References and their descriptions; after the starting noise, which storygen_exact's random
            # reference encoding would otherwise shift.
            references = (
                self._encode_references(context_images, context_descriptions, generator)
                if context_images
                else None
            )
            # The encoders are done: under runtime.offload=model the UNet then has the GPU to itself.
            model.offload()

            # 4. Fast mode: reference features once, at a fixed small timestep.
            fixed = None
            if references is not None and once:
                fixed = self._attend_state(
                    self._branch_features(
                        references,
                        cfg.fast_reference_timestep * cfg.reference_timestep_divisor,
                        generator,
                        share_reference_passes,
                    ),
                    references,
                    pooled,
                )

            # 5. Denoise.
            for index, t in enumerate(timesteps):
                scaled = model.scheduler.scale_model_input(latents, t)
                if references is None:
                    eps_uncond, eps_text = self._unet(scaled.repeat(2, 1, 1, 1), t, text, None).chunk(2)
                    eps = eps_uncond + s_txt * (eps_text - eps_uncond)
                else:
                    # Only the concatenated features stay alive through the UNet pass, and they are freed
                    # before the next step's reference passes (storypipe plan traces this same peak).
                    state = (
                        fixed
                        if fixed is not None
                        else self._attend_state(
                            self._branch_features(references, int(t), generator, share_reference_passes),
                            references,
                            pooled,
                        )
                    )
                    branch_text = text[[0, 0, 1]]  # uncond, image, all
                    eps_uncond, eps_image, eps_all = self._unet(
                        scaled.repeat(3, 1, 1, 1), t, branch_text, state
                    ).chunk(3)
                    del state
                    eps = eps_uncond + s_img * (eps_image - eps_uncond) + s_txt * (eps_all - eps_image)
                latents = model.scheduler.step(eps, t, latents).prev_sample
                if on_step is not None:
                    on_step(index + 1, len(timesteps))

            # 6. Decode.
            image = model.decode_latents(latents)[0]
            return FrameResult(
                image,
                self._evaluations,
                time.perf_counter() - started,
                self.exceeds_prompt_limit(description),
            )
        finally:
            model.offload()  # runtime.offload=model: nothing stays on the GPU between frames

    def generate_batch(
        self,
        requests: Sequence[FrameRequest],
        on_step: Callable[[int, int], None] | None = None,
        **options,
    ) -> list[FrameResult]:
        """Several frames, each as :meth:`generate` draws it from the same request and seed.
        Every request must read the same number of previous frames. ``options`` as for :meth:`generate`.
        (First version: one frame after another; batched sampling replaces the loop.)"""
        counts = {len(request.context_images) for request in requests}
        if len(counts) > 1:
            raise ValueError(f"requests read different numbers of previous frames: {sorted(counts)}")
        return [
            self.generate(
                request.description,
                request.context_images,
                request.context_descriptions,
                seed=request.seed,
                on_step=on_step,
                **options,
            )
            for request in requests
        ]

    # ----------------------------------------------------------------------------------------

    def _unet(
        self, latents: torch.Tensor, t, text: torch.Tensor, state: StoryAttentionState | None
    ) -> torch.Tensor:
        self._evaluations += latents.shape[0]
        kwargs = {"story": state} if state is not None else None
        return self.model.unet(latents, t, encoder_hidden_states=text, cross_attention_kwargs=kwargs).sample

    def _encode_references(
        self, images: Sequence[Image.Image], descriptions: Sequence[str], generator: torch.Generator
    ) -> _References:
        model = self.model
        count = len(images)
        pixels = model.images_to_tensor(images, self.cfg.resolution)  # (N, 3, H, W) in [-1, 1]
        if model.context_kind == "storygen_exact":
            # StoryGen's references stay in [0, 1]: its `ref_image * 2. - 1.` loop rebinds a loop variable
            # (haoningwu3639/StoryGen, dataset.py), and its weights were trained that way.
            pixels = (pixels + 1) / 2  # (N, 3, H, W) in [0, 1]
            # Posterior samples, the blank image's once for all references, then one reference noise,
            # in StoryGen's order (haoningwu3639/StoryGen, model/pipeline.py, steps 6.5 and 7).
            zero = torch.zeros((1, *pixels.shape[1:]), device=pixels.device, dtype=pixels.dtype)
            blank = model.encode_images(zero, generator)  # (1, C, h, w)
            blank = blank.expand(count, -1, -1, -1)  # (N, C, h, w)
            latents = model.encode_images(pixels, generator)  # (N, C, h, w)
            noise = torch.randn((1, *latents.shape[1:]), generator=generator).to(latents)  # (1, C, h, w)
            noise = noise.expand_as(latents)  # (N, C, h, w)
        else:
            latents, noise = model.encode_images(pixels), None  # (N, C, h, w), the posterior means
            blank = model.encode_images(torch.zeros_like(pixels))  # StoryGen's "zero image"
        text, pooled = model.encode_text(list(descriptions))  # (N, T, D), (N, D)
        uncond_text, uncond_pooled = model.encode_text([""] * count)
        return _References(
            latents=latents, blank_latents=blank, noise=noise,
            text=text, uncond_text=uncond_text, pooled=pooled, uncond_pooled=uncond_pooled,
        )  # fmt: skip

    def _branch_features(
        self, refs: _References, t: int, generator: torch.Generator, share: bool
    ) -> list[dict]:
        """Per-layer reference features for the three branches: [blank, real, real].

        With ``share`` the real references run once and both branches use the result; otherwise each
        branch runs its own pass (same inputs, same noise), which gives bit-identical features.
        """
        if refs.noise is not None:  # storygen_exact: StoryGen's one noise, for both sets and every step
            blank_noise = real_noise = refs.noise  # (N, C, h, w)
        else:
            blank_noise = torch.randn(refs.blank_latents.shape, generator=generator).to(
                self.model.device, self.model.dtype
            )
            real_noise = torch.randn(refs.latents.shape, generator=generator).to(
                self.model.device, self.model.dtype
            )
        blank = self._record(refs.blank_latents, refs.uncond_text, t, blank_noise)
        real = self._record(refs.latents, refs.text, t, real_noise)
        return [blank, real, real if share else self._record(refs.latents, refs.text, t, real_noise)]

    def _record(
        self, latents: torch.Tensor, text: torch.Tensor, t: int, noise: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """One reference pass: reference i of N (oldest first) noised to (t // divisor) * (N - i)."""
        count = latents.shape[0]
        base = t // self.cfg.reference_timestep_divisor
        ref_timesteps = torch.tensor(
            [base * (count - i) for i in range(count)], device=self.model.device
        )  # (N,)
        noised = self.model.noise_scheduler.add_noise(latents, noise, ref_timesteps)  # (N, C, h, w)
        state = StoryAttentionState(mode="record")
        self._unet(noised, ref_timesteps, text, state)
        return {layer: tokens.unsqueeze(0) for layer, tokens in state.features.items()}  # (1, N, L, C)

    def _attend_state(
        self, branches: list[dict], refs: _References, pooled: torch.Tensor
    ) -> StoryAttentionState:
        features = {
            layer: torch.cat([branch[layer] for branch in branches]) for layer in branches[0]
        }  # (3, N, L, C)
        return StoryAttentionState(
            mode="attend",
            features=features,
            reference_mask=None,  # every reference exists: no mask, fused SDPA kernels
            query_embedding=pooled[[0, 1, 1]],  # the uncond branch asks with the empty prompt
            key_embeddings=torch.stack([refs.uncond_pooled, refs.pooled, refs.pooled]),  # (3, N, D)
        )
