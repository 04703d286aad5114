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

BLANK_NOISE_SEED = 0  # the one fixed noise of the blank references (see BlankReferenceFeatures)


@dataclass
class FrameResult:
    image: Image.Image
    unet_evaluations: int  # UNet sample-passes (batch rows), references included, of the call that drew it
    seconds: float  # of that call
    prompt_truncated: bool  # the description had more tokens than the text encoder reads


@dataclass
class _References:
    """A batch's references: everything about them that does not change across denoising steps.
    B frames of N references each, frame-major (frame b's references are rows b*N .. b*N+N-1)."""

    count: int  # N
    latents: torch.Tensor  # (B*N, C, h, w), the real references
    text: torch.Tensor  # (B*N, T, D), each reference's own description
    pooled: torch.Tensor  # (B, N, D), sentence embeddings of the descriptions (memory keys)
    uncond_text: torch.Tensor  # (1, T, D), the empty caption
    uncond_pooled: torch.Tensor  # (1, D)
    # storygen_exact only: each frame's blank latents and its one reference noise (StoryGen's sampler).
    # Otherwise None: the blank references come from BlankReferenceFeatures and the noise is fresh per step.
    blank_latents: torch.Tensor | None = None  # (B*N, C, h, w)
    noise: torch.Tensor | None = None  # (B*N, C, h, w)


class BlankReferenceFeatures:
    """The blank references' features (the *uncond* branch's), kept by reference timestep.

    A blank reference is the blank image's latent with the empty caption, noised to its timestep with
    one fixed noise (StoryGen likewise reuses one reference noise at every step). So its features depend
    only on the UNet, the resolution and that timestep: one pass serves every frame in a batch, and the
    kept features serve every later frame with no pass at all. They are kept on the CPU, up to
    ``budget_bytes``; past it new ones are computed each time they are needed.
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.latent: torch.Tensor | None = None  # (1, C, h, w), the blank image encoded once
        self.noise: torch.Tensor | None = None  # (1, C, h, w)
        self.kept: dict[int, dict[str, torch.Tensor]] = {}  # timestep -> layer -> (L, C)
        self.kept_bytes = 0

    def features(
        self,
        timesteps: Sequence[int],
        record: Callable[[list[int]], dict[str, torch.Tensor]],
        device: torch.device,
    ) -> dict[str, torch.Tensor]:
        """Per layer ``(N, L, C)`` for the N ``timesteps``; ``record(missing)`` computes ``(M, L, C)``."""
        missing = [t for t in dict.fromkeys(timesteps) if t not in self.kept]
        fresh: dict[int, dict[str, torch.Tensor]] = {}
        if missing:
            recorded = record(missing)
            for position, t in enumerate(missing):
                fresh[t] = {layer: tokens[position] for layer, tokens in recorded.items()}  # (L, C)
                size = sum(tokens.nbytes for tokens in fresh[t].values())
                if self.kept_bytes + size <= self.budget_bytes:
                    self.kept[t] = {layer: tokens.to("cpu", copy=True) for layer, tokens in fresh[t].items()}
                    self.kept_bytes += size
        found = [fresh.get(t) or self.kept[t] for t in timesteps]
        return {layer: torch.stack([f[layer] for f in found]).to(device) for layer in found[0]}  # (N, L, C)


class FrameGenerator:
    def __init__(self, model: StoryDiffusion, cfg: GeneratorConfig) -> None:
        self.model = model
        self.cfg = cfg
        self.blank = BlankReferenceFeatures(cfg.blank_reference_cache_mib * 2**20)
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
        request = FrameRequest(description, tuple(context_images), tuple(context_descriptions), seed)
        return self._sample(
            [request], num_inference_steps, guidance_scale, image_guidance_scale, reference_features,
            share_reference_passes, on_step, [init_image] if init_image is not None else None, strength,
        )[0]  # fmt: skip

    def generate_batch(
        self,
        requests: Sequence[FrameRequest],
        on_step: Callable[[int, int], None] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        image_guidance_scale: float | None = None,
        reference_features: str | None = None,
        share_reference_passes: bool = True,
    ) -> list[FrameResult]:
        """Several frames in one batched sampling run, each as :meth:`generate` draws it from the same
        request (every random draw comes from the request's own seed; the rows differ from single calls
        only by floating-point batching noise). Every request must read the same number of frames."""
        return self._sample(
            requests, num_inference_steps, guidance_scale, image_guidance_scale, reference_features,
            share_reference_passes, on_step,
        )  # fmt: skip

    # ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def _sample(
        self,
        requests: Sequence[FrameRequest],
        num_inference_steps: int | None,
        guidance_scale: float | None,
        image_guidance_scale: float | None,
        reference_features: str | None,
        share_reference_passes: bool,
        on_step: Callable[[int, int], None] | None,
        init_images: Sequence[Image.Image] | None = None,
        strength: float | None = None,
    ) -> list[FrameResult]:
        cfg, model = self.cfg, self.model
        steps = cfg.num_inference_steps if num_inference_steps is None else num_inference_steps
        s_txt = cfg.guidance_scale if guidance_scale is None else guidance_scale
        s_img = cfg.image_guidance_scale if image_guidance_scale is None else image_guidance_scale
        once = (reference_features or cfg.reference_features) == "once"
        if not requests:
            raise ValueError("no frames requested")
        counts = sorted({len(request.context_images) for request in requests})
        if len(counts) > 1:
            raise ValueError(f"the frames of one batch must read equally many previous frames, not {counts}")
        for position, request in enumerate(requests):
            init_image = init_images[position] if init_images is not None else None
            self.check_inputs(
                request.description, request.context_images, request.context_descriptions,
                steps, s_txt, s_img, init_image, strength,
            )  # fmt: skip
        try:
            started, self._evaluations = time.perf_counter(), 0
            frames = len(requests)
            generators = [torch.Generator().manual_seed(request.seed) for request in requests]

            # 1. Text: the empty prompt, then each frame's description.
            text, pooled = model.encode_text(["", *(request.description for request in requests)])
            # text (1+B, T, D), pooled (1+B, D)

            # 2. Starting latents: pure noise, or the init images noised to `strength` (img2img).
            model.scheduler.set_timesteps(steps, device=model.device)
            timesteps = model.scheduler.timesteps
            side = cfg.resolution // model.vae_scale
            shape = (1, model.unet.config.in_channels, side, side)
            noise = torch.cat(
                [torch.randn(shape, generator=g) for g in generators]
            )  # (B, C, h, w), on the CPU
            noise = noise.to(model.device, model.dtype)
            if init_images is None:
                latents = noise * model.scheduler.init_noise_sigma  # (B, C, h, w)
            else:
                kept = max(1, round(steps * strength))
                timesteps = timesteps[steps - kept :]
                init = model.encode_images(model.images_to_tensor(init_images, cfg.resolution))
                latents = model.scheduler.add_noise(init, noise, timesteps[:1])  # (B, C, h, w)

            # 3. References and their descriptions; after the starting noise, which storygen_exact's random
            # reference encoding would otherwise shift.
            references = self._encode_references(requests, generators) if counts[0] else None
            # The encoders are done: under runtime.offload=model the UNet then has the GPU to itself.
            model.offload()

            # 4. Fast mode: reference features once, at a fixed small timestep.
            fixed = None
            if references is not None and once:
                fixed = self._attend_state(
                    references, cfg.fast_reference_timestep * cfg.reference_timestep_divisor,
                    generators, pooled, share_reference_passes, keep_projections=True,
                )  # fmt: skip

            # 5. Denoise: rows [uncond x B, image x B, all x B] (no references: [uncond x B, text x B]).
            uncond_text = text[:1].expand(frames, -1, -1)  # (B, T, D)
            for index, t in enumerate(timesteps):
                scaled = model.scheduler.scale_model_input(latents, t)  # (B, C, h, w)
                if references is None:
                    branch_text = torch.cat([uncond_text, text[1:]])  # (2B, T, D)
                    eps_uncond, eps_text = self._unet(scaled.repeat(2, 1, 1, 1), t, branch_text, None).chunk(
                        2
                    )
                    eps = eps_uncond + s_txt * (eps_text - eps_uncond)
                else:
                    # Only this step's features stay alive through the UNet pass, and they are freed
                    # before the next step's reference passes (storypipe plan traces this same peak).
                    state = (
                        fixed
                        if fixed is not None
                        else self._attend_state(
                            references, int(t), generators, pooled, share_reference_passes
                        )
                    )
                    branch_text = torch.cat([uncond_text, uncond_text, text[1:]])  # (3B, T, D)
                    eps_uncond, eps_image, eps_all = self._unet(
                        scaled.repeat(3, 1, 1, 1), t, branch_text, state
                    ).chunk(3)
                    del state
                    eps = eps_uncond + s_img * (eps_image - eps_uncond) + s_txt * (eps_all - eps_image)
                latents = model.scheduler.step(eps, t, latents).prev_sample
                if on_step is not None:
                    on_step(index + 1, len(timesteps))

            # 6. Decode, one frame at a time (the VAE decoder's activations are the largest of a frame).
            images = [model.decode_latents(latents[b : b + 1])[0] for b in range(frames)]
            seconds = time.perf_counter() - started
            return [
                FrameResult(image, self._evaluations, seconds, self.exceeds_prompt_limit(request.description))
                for image, request in zip(images, requests, strict=True)
            ]
        finally:
            model.offload()  # runtime.offload=model: nothing stays on the GPU between frames

    def _unet(
        self, latents: torch.Tensor, t, text: torch.Tensor, state: StoryAttentionState | None
    ) -> torch.Tensor:
        self._evaluations += latents.shape[0]
        kwargs = {"story": state} if state is not None else None
        return self.model.unet(latents, t, encoder_hidden_states=text, cross_attention_kwargs=kwargs).sample

    def _encode_references(
        self, requests: Sequence[FrameRequest], generators: Sequence[torch.Generator]
    ) -> _References:
        model = self.model
        count = len(requests[0].context_images)
        images = [image for request in requests for image in request.context_images]
        pixels = model.images_to_tensor(images, self.cfg.resolution)  # (B*N, 3, H, W) in [-1, 1]
        blank_latents = noise = None
        if model.context_kind == "storygen_exact":
            # StoryGen's references stay in [0, 1]: its `ref_image * 2. - 1.` loop rebinds a loop variable
            # (haoningwu3639/StoryGen, dataset.py), and its weights were trained that way.
            pixels = (pixels + 1) / 2  # (B*N, 3, H, W) in [0, 1]
            zero = torch.zeros((1, *pixels.shape[1:]), device=pixels.device, dtype=pixels.dtype)
            blanks, latents, noises = [], [], []
            for frame, generator in enumerate(generators):
                # Posterior samples, the blank image's once for all references, then one reference noise,
                # in StoryGen's order (haoningwu3639/StoryGen, model/pipeline.py, steps 6.5 and 7).
                blanks.append(model.encode_images(zero, generator).expand(count, -1, -1, -1))  # (N, C, h, w)
                latents.append(model.encode_images(pixels[frame * count : (frame + 1) * count], generator))
                one = torch.randn((1, *latents[-1].shape[1:]), generator=generator).to(latents[-1])
                noises.append(one.expand(count, -1, -1, -1))  # (N, C, h, w)
            blank_latents, latents, noise = torch.cat(blanks), torch.cat(latents), torch.cat(noises)
        else:
            latents = model.encode_images(pixels)  # (B*N, C, h, w), the posterior means
            if self.blank.latent is None:  # StoryGen's "zero image", encoded once
                zero = torch.zeros_like(pixels[:1])
                self.blank.latent = model.encode_images(zero)  # (1, C, h, w)
                blank_noise = torch.randn(
                    self.blank.latent.shape, generator=torch.Generator().manual_seed(BLANK_NOISE_SEED)
                )
                self.blank.noise = blank_noise.to(self.blank.latent)
        descriptions = [text for request in requests for text in request.context_descriptions]
        text, pooled = model.encode_text(descriptions)  # (B*N, T, D), (B*N, D)
        uncond_text, uncond_pooled = model.encode_text([""])  # (1, T, D), (1, D)
        return _References(
            count=count, latents=latents, text=text, pooled=pooled.view(len(requests), count, -1),
            uncond_text=uncond_text, uncond_pooled=uncond_pooled, blank_latents=blank_latents, noise=noise,
        )  # fmt: skip

    def _reference_timesteps(self, t: int, count: int) -> list[int]:
        """Reference i of N (oldest first) is noised to (t // divisor) * (N - i): the newest least."""
        base = t // self.cfg.reference_timestep_divisor
        return [base * (count - i) for i in range(count)]

    def _attend_state(
        self,
        refs: _References,
        t: int,
        generators: Sequence[torch.Generator],
        pooled: torch.Tensor,
        share: bool,
        keep_projections: bool = False,
    ) -> StoryAttentionState:
        """Per-layer reference features for a step at ``t``, in reference sets: the blank set(s), then the
        real references of each frame, read by its *image* and *all* rows (with ``share``, one pass that
        both read; otherwise one pass per branch, same inputs and noise: bit-identical features)."""
        model, frames, count = self.model, len(generators), refs.count
        ref_t = self._reference_timesteps(t, count)
        ref_timesteps = torch.tensor(ref_t * frames, device=model.device)  # (B*N,)
        if refs.noise is not None:  # storygen_exact: StoryGen's one noise, for both sets and every step
            real_noise = refs.noise  # (B*N, C, h, w)
        else:
            per_frame = (count, *refs.latents.shape[1:])
            real_noise = torch.cat([torch.randn(per_frame, generator=g) for g in generators])
            real_noise = real_noise.to(model.device, model.dtype)  # (B*N, C, h, w)
        real_text = refs.text

        def real() -> dict[str, torch.Tensor]:
            return self._record(refs.latents, real_noise, real_text, ref_timesteps)  # (B*N, L, C)

        if refs.blank_latents is not None:  # storygen_exact: each frame's own blank set
            blank = self._record(
                refs.blank_latents, refs.noise, refs.uncond_text.expand(frames * count, -1, -1), ref_timesteps
            )  # (B*N, L, C)
            blank_sets = frames
        else:  # one blank set for every frame, kept across frames
            blank = self.blank.features(
                ref_t, lambda missing: self._record_blank(refs.uncond_text, missing), model.device
            )
            blank_sets = 1
        passes = [real()] if share else [real(), real()]
        features = {
            layer: torch.cat([blank[layer], *(p[layer] for p in passes)]).unflatten(0, (-1, count))
            for layer in blank
        }  # (S, N, L, C)
        real_sets = len(passes)
        del blank, passes
        uncond_rows = tuple(b if blank_sets == frames else 0 for b in range(frames))
        image_rows = tuple(blank_sets + b for b in range(frames))
        all_rows = image_rows if share else tuple(blank_sets + frames + b for b in range(frames))
        keys = torch.cat([refs.uncond_pooled[None].expand(blank_sets, count, -1), *[refs.pooled] * real_sets])
        return StoryAttentionState(
            mode="attend",
            features=features,
            reference_mask=None,  # every reference exists: no mask, fused SDPA kernels
            query_embedding=torch.cat([pooled[:1].expand(frames, -1), pooled[1:], pooled[1:]]),  # (3B, D)
            key_embeddings=keys,  # (S, N, D)
            set_of_row=uncond_rows + image_rows + all_rows,
            keep_projections=keep_projections,
        )

    def _record_blank(self, uncond_text: torch.Tensor, timesteps: list[int]) -> dict[str, torch.Tensor]:
        """The blank reference (with the empty caption's ``(1, T, D)`` states) at each of ``timesteps``:
        ``(M, L, C)`` per layer."""
        rows = len(timesteps)
        return self._record(
            self.blank.latent.expand(rows, -1, -1, -1),
            self.blank.noise.expand(rows, -1, -1, -1),
            uncond_text.expand(rows, -1, -1),
            torch.tensor(timesteps, device=self.model.device),
        )

    def _record(
        self, latents: torch.Tensor, noise: torch.Tensor, text: torch.Tensor, timesteps: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """One reference pass: each latent noised to its timestep; the post-self-attention features of
        every layer, ``(rows, L, C)``."""
        noised = self.model.noise_scheduler.add_noise(latents, noise, timesteps)  # (rows, C, h, w)
        state = StoryAttentionState(mode="record")
        self._unet(noised, timesteps, text, state)
        return state.features
