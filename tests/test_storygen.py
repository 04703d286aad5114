"""The StoryGen-style frame generator on a tiny SD-1.5-layout model, offline."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image

from pipeline.errors import ConfigError
from pipeline.orchestrator import FrameRequest
from storygen_ft.attention import MemoryAttention, StoryAttentionState
from storygen_ft.config import GeneratorConfig
from storygen_ft.generator import FrameGenerator
from storygen_ft.model import StoryDiffusion

STEPS = 4
REFERENCES = [Image.new("RGB", (32, 32), colour) for colour in ((200, 20, 20), (20, 20, 200), (20, 160, 20))]
REFERENCE_TEXTS = ["A red circle jumps.", "A blue square runs.", "A green triangle sits."]


def _config(base, **overrides) -> GeneratorConfig:
    return GeneratorConfig(base_model=str(base), resolution=32, num_inference_steps=STEPS, **overrides)


@pytest.fixture(scope="module", params=["storygen", "memory"])
def generator(request, tiny_sd):
    return FrameGenerator.from_config(_config(tiny_sd, context=request.param))


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def _blank_passes(generator: FrameGenerator, count: int) -> int:
    """Blank-reference passes of a first frame with ``count`` references: one per reference timestep
    (t // divisor) * (N - i) not seen before, in the frame when the features are kept (the default),
    else in the step."""
    scheduler = generator.model.scheduler
    scheduler.set_timesteps(STEPS)
    divisor = generator.cfg.reference_timestep_divisor
    per_step = [{(int(t) // divisor) * (count - i) for i in range(count)} for t in scheduler.timesteps]
    if generator.cfg.blank_reference_cache_mib:
        return len(set().union(*per_step))
    return sum(len(timesteps) for timesteps in per_step)


@pytest.mark.parametrize("count", [0, 1, 2, 3])
def test_output_shapes_and_unet_work_for_0_to_3_references(tiny_sd, count):
    generator = FrameGenerator.from_config(_config(tiny_sd))  # nothing kept yet
    result = generator.generate("A red circle waves.", REFERENCES[:count], REFERENCE_TEXTS[:count], seed=0)
    assert result.image.size == (32, 32) and result.image.mode == "RGB"
    # Per step: 3 guidance branches + the N real references (one pass for the image and all branches), and
    # the blank references' timesteps not seen before; no context: 2 branches.
    expected = STEPS * (3 + count) + _blank_passes(generator, count) if count else STEPS * 2
    assert result.unet_evaluations == expected
    # A later frame reads the kept blank features: no blank pass at all, and the same frame.
    again = generator.generate("A red circle waves.", REFERENCES[:count], REFERENCE_TEXTS[:count], seed=0)
    assert again.unet_evaluations == (STEPS * (3 + count) if count else STEPS * 2)
    assert np.array_equal(_pixels(again.image), _pixels(result.image))


@pytest.mark.parametrize("context", ["storygen", "memory"])
def test_kept_blank_features_draw_the_frame_of_recomputed_ones(tiny_sd, context):
    """The blank references' features are kept across frames: a memo of what a generator that keeps
    nothing (blank_reference_cache_mib=0) recomputes every step, equal up to the floating-point noise of
    the batch they were computed in (the kept ones came from another frame's pass)."""
    kept = _perturbed(tiny_sd, _config(tiny_sd, context=context))
    recomputed = _perturbed(tiny_sd, _config(tiny_sd, context=context, blank_reference_cache_mib=0))
    kept.generate("A blue square runs.", REFERENCES[:1], REFERENCE_TEXTS[:1], seed=7)  # fills part of it
    frames = [
        g.generate("A red circle waves.", REFERENCES[1:], REFERENCE_TEXTS[1:], seed=1)
        for g in (kept, recomputed)
    ]
    assert np.abs(_pixels(frames[0].image) - _pixels(frames[1].image)).max() <= 1
    assert recomputed.blank.kept == {} and kept.blank.kept_bytes > 0
    # What is kept for each timestep is that timestep's blank pass (and timesteps' passes differ).
    timesteps = sorted(kept.blank.kept)[-2:]
    with torch.no_grad():
        fresh = recomputed._record_blank(kept.model.encode_text([""])[0], timesteps)
    for layer, tokens in fresh.items():
        for position, t in enumerate(timesteps):
            torch.testing.assert_close(kept.blank.kept[t][layer], tokens[position], atol=1e-4, rtol=1e-4)
        assert not torch.allclose(tokens[0], tokens[1], atol=1e-3)
    assert frames[1].unet_evaluations == STEPS * (3 + 2) + _blank_passes(recomputed, 2)  # every step's
    assert frames[0].unet_evaluations < frames[1].unet_evaluations


@pytest.mark.parametrize("context", ["storygen", "storygen_exact", "memory"])
def test_a_batch_draws_each_frame_as_a_single_call_does(tiny_sd, context):
    """generate_batch: every frame from its own seed, equal to generating it alone up to floating-point
    batching noise (at most 2 of 255 on any pixel here), with the blank passes shared by the batch."""
    cfg = _config(tiny_sd, context=context)
    batched, single = _perturbed(tiny_sd, cfg), _perturbed(tiny_sd, cfg)
    requests = [
        FrameRequest("A red circle waves.", tuple(REFERENCES[:2]), tuple(REFERENCE_TEXTS[:2]), seed=1),
        FrameRequest("A blue square runs.", tuple(REFERENCES[1:]), tuple(REFERENCE_TEXTS[1:]), seed=2),
        FrameRequest("A red circle waves.", tuple(REFERENCES[:2]), tuple(REFERENCE_TEXTS[:2]), seed=3),
    ]
    results = batched.generate_batch(requests)
    alone = [
        single.generate(r.description, r.context_images, r.context_descriptions, seed=r.seed)
        for r in requests
    ]
    for result, expected in zip(results, alone, strict=True):
        assert np.abs(_pixels(result.image) - _pixels(expected.image)).max() <= 2
    assert not np.array_equal(_pixels(results[0].image), _pixels(results[2].image))  # seeds matter
    if context != "storygen_exact":  # one blank set for the whole batch; exact mode samples one per frame
        assert results[0].unet_evaluations == STEPS * 3 * (3 + 2) + _blank_passes(batched, 2)
    with pytest.raises(ValueError, match="equally many previous frames"):
        batched.generate_batch([requests[0], FrameRequest("A red circle.", seed=4)])


def test_untrained_context_leaves_the_unet_exactly_unchanged(generator, tiny_sd):
    """Zero-initialised output projections: with references attended, the UNet's output is bit-identical
    to a plain diffusers UNet loaded from the same folder."""
    plain = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").eval()
    model = generator.model
    torch.manual_seed(0)
    latents = torch.randn(2, 4, 16, 16)
    text, pooled = model.encode_text(["A red circle.", "A blue square."])
    record = StoryAttentionState(mode="record")
    with torch.no_grad():
        model.unet(
            torch.randn(6, 4, 16, 16),
            torch.tensor([5] * 6),
            encoder_hidden_states=text.repeat(3, 1, 1),
            cross_attention_kwargs={"story": record},
        )
        features = {k: v.reshape(2, 3, *v.shape[1:]) for k, v in record.features.items()}
        state = StoryAttentionState(
            "attend", features, torch.ones(2, 3, dtype=torch.bool), pooled, pooled[:, None].repeat(1, 3, 1)
        )
        ours = model.unet(
            latents, 500, encoder_hidden_states=text, cross_attention_kwargs={"story": state}
        ).sample
        reference = plain(latents, 500, encoder_hidden_states=text).sample
    assert torch.equal(ours, reference)


def test_untrained_model_with_references_gives_plain_sd_output(generator):
    plain = generator.generate("A red circle waves.", seed=3)
    with_references = generator.generate("A red circle waves.", REFERENCES, REFERENCE_TEXTS, seed=3)
    assert np.array_equal(_pixels(plain.image), _pixels(with_references.image))


def test_no_context_mode_is_diffusers_stable_diffusion(tiny_sd):
    """The seed paper's baseline: our loop without references is SD 1.5 as diffusers runs it."""
    ours = FrameGenerator.from_config(_config(tiny_sd)).generate("A red circle waves.", seed=5).image
    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_sd, safety_checker=None, requires_safety_checker=False
    )
    latents = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(5))
    theirs = pipe(
        "A red circle waves.",
        height=32,
        width=32,
        num_inference_steps=STEPS,
        guidance_scale=7.0,
        latents=latents,
    ).images[0]
    assert np.abs(_pixels(ours) - _pixels(theirs)).max() <= 1  # rounding of the final uint8 conversion only


def test_shared_reference_passes_are_bit_identical_to_per_branch_passes(generator, tiny_sd):
    cfg = dataclasses.replace(generator.cfg, blank_reference_cache_mib=0)  # count every blank pass
    trained_like = _perturbed(tiny_sd, cfg)  # non-zero outputs, so the references really matter
    shared = trained_like.generate("A red circle waves.", REFERENCES, REFERENCE_TEXTS, seed=1)
    naive = trained_like.generate(
        "A red circle waves.", REFERENCES, REFERENCE_TEXTS, seed=1, share_reference_passes=False
    )
    assert np.array_equal(_pixels(shared.image), _pixels(naive.image))
    blank = _blank_passes(trained_like, 3)
    assert (
        shared.unet_evaluations == STEPS * (3 + 3) + blank
        and naive.unet_evaluations == STEPS * (3 + 2 * 3) + blank
    )
    plain = trained_like.generate("A red circle waves.", seed=1)
    assert not np.array_equal(_pixels(shared.image), _pixels(plain.image))


def test_fast_mode_computes_reference_features_once(generator, tiny_sd):
    trained_like = _perturbed(tiny_sd, generator.cfg)
    fast = trained_like.generate(
        "A red circle waves.", REFERENCES, REFERENCE_TEXTS, seed=1, reference_features="once"
    )
    faithful = trained_like.generate("A red circle waves.", REFERENCES, REFERENCE_TEXTS, seed=1)
    assert fast.unet_evaluations == STEPS * 3 + 3 + 3  # the steps, then the real and blank references once
    assert not np.array_equal(_pixels(fast.image), _pixels(faithful.image))


def test_img2img_runs_the_tail_of_the_schedule(generator):
    init = REFERENCES[0]
    model = generator.model
    round_trip = _pixels(model.decode_latents(model.encode_images(model.images_to_tensor([init], 32)))[0])
    light = generator.generate("A red circle waves.", init_image=init, strength=0.25, seed=2)
    full = generator.generate("A red circle waves.", init_image=init, strength=1.0, seed=2)
    assert light.unet_evaluations == 2 * STEPS // 4 and full.unet_evaluations == 2 * STEPS
    # Less noise keeps more of the frame being edited (as the VAE sees it).
    assert np.abs(_pixels(light.image) - round_trip).mean() < np.abs(_pixels(full.image) - round_trip).mean()


def test_memory_attention_weights_the_frame_whose_sentence_matches(tiny_sd):
    model = StoryDiffusion.from_pretrained(tiny_sd, context="memory")
    _, pooled = model.encode_text(REFERENCE_TEXTS)  # (3, D)
    memory = next(iter(model.context_layers.values()))
    assert isinstance(memory, MemoryAttention)
    keys = pooled[None].repeat(3, 1, 1)  # each row: the same three previous sentences
    mask = torch.ones(3, 3, dtype=torch.bool)
    with torch.no_grad():
        weights = memory.weights(pooled, keys, mask)  # row j asks with sentence j
    assert torch.equal(weights.argmax(dim=1), torch.arange(3))
    assert torch.allclose(weights.sum(dim=1), torch.ones(3))
    mask[0, 0] = False  # a masked reference gets no weight, even when it matches
    mask[2] = False  # a row without references (the first frame) weighs nothing
    with torch.no_grad():
        masked = memory.weights(pooled, keys, mask)
    assert masked[0, 0] == 0 and masked[2].sum() == 0 and masked[0].sum() == pytest.approx(1.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"context_images": REFERENCES[:2], "context_descriptions": REFERENCE_TEXTS[:1]},
            "2 context images but 1",
        ),
        (
            {"context_images": REFERENCES * 2, "context_descriptions": REFERENCE_TEXTS * 2},
            "at most generator.max_references=3",
        ),
        ({"guidance_scale": -1.0}, "guidance scales must be >= 0"),
        ({"image_guidance_scale": -0.5}, "guidance scales must be >= 0"),
        ({"strength": 0.5}, "give init_image too"),
        ({"init_image": REFERENCES[0], "strength": 1.5}, r"strength must be in \(0, 1\]"),
        ({"context_images": [Image.new("RGB", (4, 4))], "context_descriptions": ["x"]}, "too small"),
        ({"description": " "}, "non-empty string"),
        ({"num_inference_steps": 0}, "num_inference_steps must be >= 1"),
    ],
)
def test_bad_inputs_are_rejected_before_any_work(generator, kwargs, message):
    arguments = {"description": "A red circle.", **kwargs}
    with pytest.raises(ValueError, match=message):
        generator.generate(**arguments)


def _perturbed(base, cfg: GeneratorConfig) -> FrameGenerator:
    """A generator whose context layers have small random output projections, like a trained model."""
    model = StoryDiffusion.from_pretrained(base, context=cfg.context)
    with torch.no_grad():
        torch.manual_seed(0)
        for layer in model.context_layers.values():
            layer.to_out.weight.normal_(std=0.05)
    return FrameGenerator(model, cfg)


def test_the_weights_dtype_defaults_to_float16_on_cuda_and_float32_on_a_cpu():
    assert GeneratorConfig().torch_dtype_name("cuda") == "float16"
    assert GeneratorConfig().torch_dtype_name("cpu") == "float32"
    assert GeneratorConfig(dtype="bfloat16").torch_dtype_name("cuda") == "bfloat16"
    with pytest.raises(ConfigError, match="dtype must be one of auto, float32, float16, bfloat16"):
        GeneratorConfig(dtype="float8")


@pytest.mark.parametrize("context", ["storygen", "storygen_exact", "memory"])
def test_half_precision_weights_draw_the_float32_frame(tiny_sd, context):
    """Every tensor the sampler makes follows the weights' dtype (a float32 noise tensor into a float16 UNet
    is an error), so the float16 path CUDA uses by default runs, here on the CPU, and draws the same frame."""
    frames = {}
    for dtype in ("float32", "float16"):
        generator = FrameGenerator.from_config(_config(tiny_sd, context=context, dtype=dtype))
        assert {p.dtype for p in generator.model.parameters()} == {getattr(torch, dtype)}
        frames[dtype] = _pixels(
            generator.generate("A red circle waves.", REFERENCES[:2], REFERENCE_TEXTS[:2], seed=3).image
        )
    assert np.abs(frames["float16"] - frames["float32"]).mean() < 2.0  # of 255


def test_the_reference_attention_passes_no_mask_when_every_reference_exists(monkeypatch):
    """No mask lets SDPA use its fused kernels (the generator says so with ``reference_mask=None``); with a
    missing reference the mask is still applied; an all-True mask gives the same numbers as none."""
    from storygen_ft import attention

    layer = attention.ReferenceCrossAttention(dim=16, heads=2)
    seen, real_sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def spy(*args, attn_mask=None, **kwargs):
        seen.append(attn_mask)
        return real_sdpa(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    hidden, features = torch.randn(2, 5, 16), torch.randn(2, 3, 4, 16)  # (rows, L, C), (rows, N, L_ref, C)
    everything = StoryAttentionState("attend", {"x": features}, reference_mask=None)
    all_true = StoryAttentionState(
        "attend", {"x": features}, reference_mask=torch.ones(2, 3, dtype=torch.bool)
    )
    one_missing = StoryAttentionState(
        "attend", {"x": features}, reference_mask=torch.tensor([[1, 1, 1], [1, 0, 1]]).bool()
    )
    unmasked = layer(hidden, everything, "x")
    layer(hidden, one_missing, "x")
    assert seen[0] is None and seen[1] is not None
    assert torch.allclose(layer(hidden, all_true, "x"), unmasked, atol=1e-6)
    # The same numbers as with an all-True mask.
    token_mask = torch.ones(2, 1, 1, 12, dtype=torch.bool)
    monkeypatch.setattr(
        attention.F,
        "scaled_dot_product_attention",
        lambda q, k, v, attn_mask=None: real_sdpa(q, k, v, attn_mask=token_mask),
    )
    assert torch.allclose(layer(hidden, everything, "x"), unmasked, atol=1e-6)


@pytest.mark.parametrize("context", ["storygen", "storygen_exact", "memory"])
def test_no_reference_mask_means_every_reference_exists(tiny_sd, context):
    """The generator passes ``reference_mask=None`` (no mask, no host sync); for every context kind that
    gives the numbers of an all-True mask, and differs from a row with no references (so the context
    layers do contribute here)."""
    model = StoryDiffusion.from_pretrained(tiny_sd, context=context).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.context_layers.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)  # non-zero output projections
        text, pooled = model.encode_text(["A red circle.", "A blue square."])  # (2, T, D), (2, D)
        record = StoryAttentionState(mode="record")
        model.unet(torch.randn(6, 4, 16, 16), torch.tensor([5] * 6), encoder_hidden_states=text.repeat(3, 1, 1),
                   cross_attention_kwargs={"story": record})  # fmt: skip
        features = {k: v.reshape(2, 3, *v.shape[1:]) for k, v in record.features.items()}  # (2, N, L, C)
        latents = torch.randn(2, 4, 16, 16)

        def attend(mask):
            state = StoryAttentionState("attend", features, mask, pooled, pooled[:, None].repeat(1, 3, 1))
            return model.unet(latents, torch.tensor([5, 5]), encoder_hidden_states=text,
                              cross_attention_kwargs={"story": state}).sample  # fmt: skip

        unmasked = attend(None)
        assert torch.allclose(unmasked, attend(torch.ones(2, 3, dtype=torch.bool)), atol=1e-5)
        assert not torch.allclose(unmasked, attend(torch.zeros(2, 3, dtype=torch.bool)), atol=1e-3)


@pytest.mark.parametrize("reference_features, projections", [("per_step", STEPS), ("once", 1)])
def test_reference_keys_and_values_are_projected_once_per_set(tiny_sd, reference_features, projections):
    """The image and all branches read one real set, so the keys come from 2 sets (blank, real), not 3
    branches; fast mode projects them once per frame, the faithful mode once per step."""
    generator = _perturbed(tiny_sd, _config(tiny_sd))
    layer = next(iter(generator.model.context_layers.values()))
    seen = []
    handle = layer.to_k.register_forward_hook(lambda module, args, output: seen.append(args[0].shape[0]))
    try:
        generator.generate(
            "A red circle waves.", REFERENCES, REFERENCE_TEXTS, seed=1, reference_features=reference_features
        )
    finally:
        handle.remove()
    assert seen == [2] * projections  # (S=2 sets, N*L, C) per projection
