"""`storypipe import-storygen`: StoryGen's checkpoint layout in, a generator folder in exact mode out.

The reference below re-implements one StoryGen transformer block in plain torch from their published
math (haoningwu3639/StoryGen, model/attention.py, ``BasicTransformerBlock.forward``), independently of
storypipe's processors.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from diffusers import DDIMScheduler, UNet2DConditionModel
from PIL import Image
from safetensors.torch import save_file

from pipeline.errors import DataError
from pipeline.orchestrator import FrameRequest
from storygen_ft.attention import StoryAttentionState, layer_key
from storygen_ft.config import GeneratorConfig
from storygen_ft.generator import FrameGenerator
from storygen_ft.import_storygen import import_storygen
from storygen_ft.model import StoryDiffusion
from storypipe.cli import app

TOLERANCE = 1e-5
REFERENCES = 2
ADDED_SCALE = 0.2  # random attn3/norm4 weights, large enough that a wrong block shows


def _storygen_checkpoint(folder, base, seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny random UNet in StoryGen's key layout: the plain UNet's keys plus attn3/norm4 per block."""
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    state = dict(unet.state_dict())
    generator = torch.Generator().manual_seed(seed)
    for key in [k for k in state if ".transformer_blocks." in k and ".norm" in k]:
        # LayerNorms start as the identity; random ones tell norm2(h) from h (and norm4 from norm2).
        state[key] = state[key] + torch.randn(state[key].shape, generator=generator) * ADDED_SCALE
    for key in [k for k in state if k.endswith("attn1.to_q.weight")]:
        block = key.removesuffix(".attn1.to_q.weight")
        width = state[key].shape[0]
        for name in ("to_q", "to_k", "to_v", "to_out.0"):
            state[f"{block}.attn3.{name}.weight"] = (
                torch.randn(width, width, generator=generator) * ADDED_SCALE
            )
        state[f"{block}.attn3.to_out.0.bias"] = torch.randn(width, generator=generator) * ADDED_SCALE
        state[f"{block}.norm4.weight"] = 1 + torch.randn(width, generator=generator) * ADDED_SCALE
        state[f"{block}.norm4.bias"] = torch.randn(width, generator=generator) * ADDED_SCALE
    folder.mkdir(parents=True)
    unet.save_config(folder)  # config.json
    save_file(
        {k: v.contiguous() for k, v in state.items()}, str(folder / "diffusion_pytorch_model.safetensors")
    )
    return state


# --- StoryGen's block, from their math -----------------------------------------------------------


def _attention(state, prefix, x, context, heads):
    """Multi-head attention with StoryGen's projections: q/k/v without bias, output with bias."""
    q = x @ state[f"{prefix}.to_q.weight"].T  # (B, L, C)
    k = context @ state[f"{prefix}.to_k.weight"].T  # (B, S, C)
    v = context @ state[f"{prefix}.to_v.weight"].T  # (B, S, C)
    batch, length, width = q.shape
    split = lambda t: t.reshape(batch, -1, heads, width // heads).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)  # (B, heads, L|S, d)
    weights = (q @ k.transpose(-1, -2) / (width // heads) ** 0.5).softmax(dim=-1)  # (B, heads, L, S)
    out = (weights @ v).transpose(1, 2).reshape(batch, length, width)  # (B, L, C)
    return out @ state[f"{prefix}.to_out.0.weight"].T + state[f"{prefix}.to_out.0.bias"]


def _layer_norm(state, prefix, x):
    return F.layer_norm(x, x.shape[-1:], state[f"{prefix}.weight"], state[f"{prefix}.bias"])


def _post_self_attention(state, block, h, heads):
    normed = _layer_norm(state, f"{block}.norm1", h)
    return _attention(state, f"{block}.attn1", normed, normed, heads) + h  # (B, L, C)


def _storygen_block(state, block, h, text, references, heads):
    """h: (B, L, C), text: (B, T, D), references: (B, N*L_ref, C) or None (a reference frame's pass)."""
    h = _post_self_attention(state, block, h, heads)
    h_t = _attention(state, f"{block}.attn2", _layer_norm(state, f"{block}.norm2", h), text, heads) + h
    if references is None:
        h = h_t
    else:
        h_i = (
            _attention(state, f"{block}.attn3", _layer_norm(state, f"{block}.norm4", h), references, heads)
            + h
        )
        h = h_t + h_i  # h counted twice, as in StoryGen
    normed = _layer_norm(state, f"{block}.norm3", h)
    hidden, gate = (
        normed @ state[f"{block}.ff.net.0.proj.weight"].T + state[f"{block}.ff.net.0.proj.bias"]
    ).chunk(2, dim=-1)  # GEGLU
    return (hidden * F.gelu(gate)) @ state[f"{block}.ff.net.2.weight"].T + state[f"{block}.ff.net.2.bias"] + h


# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def imported(tiny_sd, tmp_path_factory):
    root = tmp_path_factory.mktemp("storygen")
    state = _storygen_checkpoint(root / "StoryGen" / "unet", tiny_sd)
    out = import_storygen(root / "StoryGen", root / "imported", tiny_sd)
    return state, StoryDiffusion.from_pretrained(out), out


def _block_inputs(model, block_name, seed=1):
    block = model.unet.get_submodule(block_name)
    width, text_width = block.attn1.to_q.in_features, model.text_encoder.config.hidden_size
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(2, 16, width, generator=generator)  # (B, L, C)
    text = torch.randn(2, 5, text_width, generator=generator)  # (B, T, D)
    references = torch.randn(2, REFERENCES, 9, width, generator=generator)  # (B, N, L_ref, C)
    return block, h, text, references


def _attend(references):
    return StoryAttentionState(
        mode="attend",
        features={},
        reference_mask=torch.ones(references.shape[:2], dtype=torch.bool),
    )


def test_imported_folder_selects_the_exact_mode(imported, tiny_sd):
    state, model, _ = imported
    assert model.context_kind == "storygen_exact"
    assert set(model.context_layers) == {
        layer_key(key.removesuffix(".norm4.weight")) for key in state if key.endswith(".norm4.weight")
    }
    # The UNet is a plain diffusers UNet: it loads without storypipe and has no added keys.
    assert not any("attn3" in key or "norm4" in key for key in model.unet.state_dict())


def test_one_transformer_block_computes_storygen_math(imported):
    state, model, _ = imported
    heads = model.unet.config.attention_head_dim  # SD 1.5's config names the head count so
    for block_name in (
        "down_blocks.0.attentions.0.transformer_blocks.0",
        "mid_block.attentions.0.transformer_blocks.0",
    ):
        block, h, text, references = _block_inputs(model, block_name)
        story = _attend(references)
        story.features[layer_key(block_name)] = references
        with torch.no_grad():
            ours = block(h, encoder_hidden_states=text, cross_attention_kwargs={"story": story})
            expected = _storygen_block(state, block_name, h, text, references.flatten(1, 2), heads)
        torch.testing.assert_close(ours, expected, atol=TOLERANCE, rtol=TOLERANCE)


def test_ours_differs_from_storygen_on_the_same_weights(imported):
    """The check above can fail: storypipe's own `storygen` processors (h added once, norm2(h) as the
    branch's input and as the reference features) do not match StoryGen's block."""
    state, _, folder = imported
    exact = StoryDiffusion.from_pretrained(folder)
    ours = StoryDiffusion(
        exact.vae,
        exact.text_encoder,
        exact.tokenizer,
        exact.unet,
        exact.scheduler,
        "storygen",
        exact.context_layers,
    )
    block_name = "down_blocks.0.attentions.0.transformer_blocks.0"
    block, h, text, references = _block_inputs(ours, block_name)
    story = _attend(references)
    story.features[layer_key(block_name)] = references
    with torch.no_grad():
        got = block(h, encoder_hidden_states=text, cross_attention_kwargs={"story": story})
        expected = _storygen_block(
            state, block_name, h, text, references.flatten(1, 2), exact.unet.config.attention_head_dim
        )
    assert (got - expected).abs().max() > 1e-2


def test_whole_unet_matches_a_direct_storygen_evaluation(imported, tiny_sd):
    """Reference pass (records the raw post-self-attention state) and current-frame pass, against the
    plain diffusers UNet with every transformer block replaced by the reference math above."""
    state, model, _ = imported
    heads = model.unet.config.attention_head_dim
    plain = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    plain.load_state_dict({k: v for k, v in state.items() if "attn3" not in k and "norm4" not in k})
    blocks = [name for name in model.context_layers]
    generator = torch.Generator().manual_seed(2)
    channels, side = plain.config.in_channels, plain.config.sample_size
    refs = torch.randn(REFERENCES, channels, side, side, generator=generator)  # (N, C, h, w)
    ref_text = torch.randn(REFERENCES, 5, model.text_encoder.config.hidden_size, generator=generator)
    latents = torch.randn(1, channels, side, side, generator=generator)
    text = torch.randn(1, 5, model.text_encoder.config.hidden_size, generator=generator)
    ref_t, t = torch.tensor([60, 30]), torch.tensor([300])

    recorded, hooks, references = {}, [], None

    def replace(name):
        block_name = name.replace("__", ".")

        def hook(module, args, kwargs, output):
            h = args[0] if args else kwargs["hidden_states"]
            context = kwargs["encoder_hidden_states"]
            if references is None:
                recorded[name] = _post_self_attention(state, block_name, h, heads)
            features = None if references is None else references[name].flatten(0, 1)[None]
            return _storygen_block(state, block_name, h, context, features, heads)

        return hook

    for name in blocks:
        hooks.append(
            plain.get_submodule(name.replace("__", ".")).register_forward_hook(
                replace(name), with_kwargs=True
            )
        )
    with torch.no_grad():
        plain(refs, ref_t, encoder_hidden_states=ref_text)
        references = dict(recorded)
        expected = plain(latents, t, encoder_hidden_states=text).sample
        record = StoryAttentionState(mode="record")
        model.unet(refs, ref_t, encoder_hidden_states=ref_text, cross_attention_kwargs={"story": record})
        for name in blocks:
            torch.testing.assert_close(
                record.features[name], references[name], atol=TOLERANCE, rtol=TOLERANCE
            )
        story = StoryAttentionState(
            mode="attend",
            features={name: tokens[None] for name, tokens in record.features.items()},  # (1, N, L, C)
            reference_mask=torch.ones(1, REFERENCES, dtype=torch.bool),
        )
        ours = model.unet(
            latents, t, encoder_hidden_states=text, cross_attention_kwargs={"story": story}
        ).sample
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(ours, expected, atol=TOLERANCE, rtol=TOLERANCE)


def test_a_checkpoint_with_missing_and_unexpected_keys_is_refused(tiny_sd, tmp_path):
    state = _storygen_checkpoint(tmp_path / "ckpt", tiny_sd)
    missing = "mid_block.attentions.0.transformer_blocks.0.attn3.to_k.weight"
    del state[missing]
    state["mid_block.attentions.0.transformer_blocks.0.attn4.to_q.weight"] = torch.zeros(1)
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        str(tmp_path / "ckpt" / "diffusion_pytorch_model.safetensors"),
    )
    with pytest.raises(DataError) as error:
        import_storygen(tmp_path / "ckpt", tmp_path / "out", tiny_sd)
    assert missing in str(error.value) and "attn4.to_q.weight" in str(error.value)
    assert "1 missing" in str(error.value) and "1 unexpected" in str(error.value)
    assert not (tmp_path / "out").exists()


def test_import_storygen_cli_and_bin_checkpoints(tiny_sd, tmp_path):
    state = _storygen_checkpoint(tmp_path / "ckpt", tiny_sd)
    (tmp_path / "ckpt" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(state, tmp_path / "ckpt" / "diffusion_pytorch_model.bin")
    result = CliRunner().invoke(app, [
        "import-storygen", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"),
        "--base", str(tiny_sd), "--preset", "tiny",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "generator.context=storygen_exact" in result.output
    assert json.loads((tmp_path / "out" / "story_model.json").read_text())["context"] == "storygen_exact"
    model = StoryDiffusion.from_pretrained(tmp_path / "out")
    expected = state["mid_block.attentions.0.transformer_blocks.0.norm4.weight"]
    torch.testing.assert_close(
        model.context_layers["mid_block__attentions__0__transformer_blocks__0"].norm.weight, expected
    )


# --- StoryGen's sampler (haoningwu3639/StoryGen, model/pipeline.py, ``__call__``) ---------------------

FRAMES = [Image.new("RGB", (32, 32), colour) for colour in ((200, 20, 20), (20, 20, 200))]
FRAME_TEXTS = ["A red circle.", "A blue square."]
SAMPLER_STEPS = 3


def _exact_generator(imported, monkeypatch, **overrides):
    """The exact-mode generator on the imported model, with every UNet call logged as
    ``(latents, t, text, state)``; ``overrides["attend"]`` replaces the current frame's pass."""
    _, model, folder = imported
    cfg = GeneratorConfig(
        base_model=str(folder), context="storygen_exact", resolution=32, num_inference_steps=SAMPLER_STEPS
    )
    generator = FrameGenerator(model, cfg)
    calls, real_unet = [], generator._unet

    def spy(latents, t, text, state):
        calls.append((latents.clone(), t, text.clone(), state))
        if state is not None and state.mode == "attend" and "attend" in overrides:
            return overrides["attend"](latents)
        return real_unet(latents, t, text, state)

    monkeypatch.setattr(generator, "_unet", spy)
    return generator, calls


def _storygen_reference_latents(model, frames, seed):
    """StoryGen's rule, computed here: after the starting noise, the blank image's posterior sample
    (once), the references' posterior samples, then one noise for every reference, branch and step."""
    generator = torch.Generator().manual_seed(seed)
    channels, side = model.unet.config.in_channels, 32 // model.vae_scale
    torch.randn((1, channels, side, side), generator=generator)  # the starting latents
    pixels = torch.stack([
        torch.from_numpy(np.array(frame.resize((32, 32), Image.Resampling.BICUBIC))).permute(2, 0, 1)
        for frame in frames
    ]).float() / 255  # (N, 3, H, W) in [0, 1], as torchvision's ToTensor  # fmt: skip

    def sample(images):
        posterior = model.vae.encode(images).latent_dist
        eps = torch.randn(posterior.mean.shape, generator=generator)
        latents = posterior.mean + posterior.std * eps  # latent_dist.sample()
        return latents * model.vae.config.scaling_factor

    with torch.no_grad():
        blank = sample(torch.zeros(1, 3, 32, 32))  # (1, C, h, w)
        references = sample(pixels)  # (N, C, h, w)
    noise = torch.randn((1, channels, side, side), generator=generator)  # (1, C, h, w)
    return blank, references, noise


def _add_noise(scheduler, latents, noise, timesteps):
    alphas = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)  # (N, 1, 1, 1)
    return alphas.sqrt() * latents + (1 - alphas).sqrt() * noise


def test_the_exact_mode_feeds_references_as_storygen_at_every_step(imported, monkeypatch):
    """Each step's reference passes get StoryGen's inputs: references in [0, 1], posterior samples, one
    blank latent, one noise shared by references, branches and steps, reference i of N at
    (t // 10) * (N - i), blank with empty captions and real with their own."""
    _, model, _ = imported
    generator, calls = _exact_generator(imported, monkeypatch)
    result = generator.generate("A red circle waves.", FRAMES, FRAME_TEXTS, seed=4)
    assert result.image.size == (32, 32) and result.unet_evaluations == SAMPLER_STEPS * (3 + 2 * len(FRAMES))
    blank, references, noise = _storygen_reference_latents(model, FRAMES, seed=4)
    empty, _ = model.encode_text(["", ""])
    captions, _ = model.encode_text(FRAME_TEXTS)
    records = [call for call in calls if call[3].mode == "record"]
    assert len(records) == 2 * SAMPLER_STEPS  # per step: the blank set, then the real set
    model.scheduler.set_timesteps(SAMPLER_STEPS)
    for step, t in enumerate(model.scheduler.timesteps):
        ref_t = torch.tensor([(int(t) // 10) * 2, (int(t) // 10) * 1])  # (N,), oldest noisiest
        passes = records[2 * step : 2 * step + 2]
        for (latents, timesteps, text, _), clean, branch_text in zip(
            passes, (blank.expand(2, -1, -1, -1), references), (empty, captions), strict=True
        ):
            assert torch.equal(timesteps, ref_t)
            # Tolerance: the VAE sees the pixels in another memory layout here (conv rounding).
            expected = _add_noise(model.scheduler, clean, noise, ref_t)
            torch.testing.assert_close(latents, expected, atol=1e-3, rtol=1e-3)
            torch.testing.assert_close(text, branch_text)


def test_the_exact_mode_combines_guidance_as_storygen(imported, monkeypatch):
    """Fake predictions for the current frame's three rows (uncond, image, all) go into DDIM's step as
    eps_uncond + s_img * (eps_image - eps_uncond) + s_txt * (eps_all - eps_image), with eta 0."""
    _, model, _ = imported
    fake = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(7))  # (3, C, h, w)
    generator, calls = _exact_generator(imported, monkeypatch, attend=lambda latents: fake.clone())
    stepped, real_step = [], model.scheduler.step

    def step(eps, t, latents, *args, **kwargs):
        stepped.append((eps.clone(), args, kwargs))
        return real_step(eps, t, latents, *args, **kwargs)

    monkeypatch.setattr(model.scheduler, "step", step)
    generator.generate(
        "A red circle waves.", FRAMES, FRAME_TEXTS, seed=0, guidance_scale=5.0, image_guidance_scale=2.0
    )
    uncond, image, full = fake.chunk(3)
    expected = uncond + 2.0 * (image - uncond) + 5.0 * (full - image)  # model/pipeline.py, "perform guidance"
    assert len(stepped) == SAMPLER_STEPS
    for eps, args, kwargs in stepped:
        torch.testing.assert_close(eps, expected)
        assert not args and kwargs.get("eta", 0.0) == 0.0
    text, _ = model.encode_text(["", "", "A red circle waves."])
    for latents, _, branch_text, state in (call for call in calls if call[3].mode == "attend"):
        torch.testing.assert_close(branch_text, text)  # uncond, uncond, cond
        assert torch.equal(latents[0], latents[1]) and torch.equal(latents[1], latents[2])
        # Two reference sets, (2, N, L, C): the blank one for the uncond row, the real one that the image
        # and all rows both read.
        assert state.set_of_row == (0, 1, 1)
        for tokens in state.features.values():
            assert tokens.shape[0] == 2 and not torch.equal(tokens[0], tokens[1])


def test_the_exact_mode_samples_with_storygens_ddim(imported):
    """StoryGen's inference: DDIM from SD 1.5's scheduler config, 40 steps, scales 7 and 3.5 (inference.py);
    diffusers 0.13's DDIM spaced its steps as 'leading' with the offset."""
    _, model, _ = imported
    assert isinstance(model.scheduler, DDIMScheduler)
    config = model.scheduler.config
    assert (config.steps_offset, config.set_alpha_to_one, config.clip_sample) == (1, False, False)
    assert (config.beta_schedule, config.beta_start, config.beta_end) == ("scaled_linear", 0.00085, 0.012)
    cfg = GeneratorConfig()
    defaults = (cfg.scheduler, cfg.num_inference_steps, cfg.guidance_scale, cfg.image_guidance_scale)
    assert defaults == ("ddim", 40, 7.0, 3.5) and cfg.reference_timestep_divisor == 10
    model.scheduler.set_timesteps(40)
    assert model.scheduler.timesteps.tolist() == [25 * i + 1 for i in range(39, -1, -1)]


def test_other_modes_keep_posterior_means_and_fresh_reference_noise(imported):
    """The StoryGen sampler quirks stay in the exact mode: ``storygen`` on the same weights encodes the
    references' posterior means in [-1, 1] and draws its reference noise per pass."""
    _, exact, _ = imported
    model = StoryDiffusion(
        exact.vae, exact.text_encoder, exact.tokenizer, exact.unet, exact.scheduler, "storygen"
    )
    cfg = GeneratorConfig(base_model="unused", resolution=32, num_inference_steps=SAMPLER_STEPS)
    request = FrameRequest("A red circle waves.", tuple(FRAMES), tuple(FRAME_TEXTS), seed=0)
    references = FrameGenerator(model, cfg)._encode_references([request], [torch.Generator().manual_seed(0)])
    assert references.noise is None
    torch.testing.assert_close(references.latents, model.encode_images(model.images_to_tensor(FRAMES, 32)))


def test_a_checkpoint_that_is_neither_a_folder_nor_reachable_is_refused(tiny_sd, tmp_path):
    # A missing path is not a valid hub id either: refused without any network access.
    with pytest.raises(DataError, match="not a local folder, and the hub download failed"):
        import_storygen(str(tmp_path / "no-such-folder"), tmp_path / "out", tiny_sd)
    (tmp_path / "two" / "a").mkdir(parents=True)
    _storygen_checkpoint(tmp_path / "two" / "b" / "unet", tiny_sd)
    UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").save_config(tmp_path / "two" / "a")
    with pytest.raises(DataError, match="expected one UNet2DConditionModel folder"):
        import_storygen(tmp_path / "two", tmp_path / "out", tiny_sd)


# --- Checkpoint formats: one file or shards, safetensors or pickles, full precision or fp16 ----------


def _save(path, tensors):
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    else:
        torch.save(tensors, path)


def _rewrite(folder, state, kind, sharded, variant):
    """The checkpoint in ``folder`` rewritten with diffusers' file names for that format."""
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    if variant is not None:
        state = {key: value.half() for key, value in state.items()}
    dot_variant = f".{variant}" if variant else ""
    if not sharded:
        _save(folder / f"diffusion_pytorch_model{dot_variant}.{kind}", state)
        return
    keys, weight_map = sorted(state), {}
    for number, part in enumerate((keys[::2], keys[1::2]), start=1):
        shard = f"diffusion_pytorch_model{dot_variant}-{number:05d}-of-00002.{kind}"
        _save(folder / shard, {key: state[key] for key in part})
        weight_map.update(dict.fromkeys(part, shard))
    index = folder / f"diffusion_pytorch_model.{kind}.index{dot_variant}.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize(
    "kind, sharded, variant",
    [
        ("safetensors", True, None),
        ("bin", True, None),
        ("safetensors", False, "fp16"),
        ("bin", False, "fp16"),
        ("safetensors", True, "fp16"),
    ],
)
def test_sharded_pickled_and_fp16_checkpoints_import_the_same_weights(
    tiny_sd, tmp_path, kind, sharded, variant
):
    state = _storygen_checkpoint(tmp_path / "ckpt", tiny_sd)
    _rewrite(tmp_path / "ckpt", state, kind, sharded, variant)
    model = StoryDiffusion.from_pretrained(import_storygen(tmp_path / "ckpt", tmp_path / "out", tiny_sd))
    if variant == "fp16":
        state = {key: value.half().float() for key, value in state.items()}  # what fp16 kept
    for key, value in model.unet.state_dict().items():
        assert torch.equal(value, state[key]), key
    block = "mid_block.attentions.0.transformer_blocks.0"
    layer = model.context_layers[layer_key(block)]
    assert torch.equal(layer.to_k.weight, state[f"{block}.attn3.to_k.weight"])
    assert torch.equal(layer.norm.bias, state[f"{block}.norm4.bias"])


def test_a_folder_without_weights_says_which_files_it_expected(tiny_sd, tmp_path):
    _storygen_checkpoint(tmp_path / "ckpt", tiny_sd)
    (tmp_path / "ckpt" / "diffusion_pytorch_model.safetensors").rename(tmp_path / "ckpt" / "weights.pt")
    with pytest.raises(DataError) as error:
        import_storygen(tmp_path / "ckpt", tmp_path / "out", tiny_sd)
    message = str(error.value)
    assert str(tmp_path / "ckpt") in message and "found config.json, weights.pt" in message
    for expected in (
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.bin.index.json",
        "diffusion_pytorch_model.fp16.safetensors",
        "diffusion_pytorch_model.safetensors.index.fp16.json",
    ):
        assert expected in message
    assert "point --checkpoint at the folder" in message


def test_an_index_naming_a_missing_shard_is_refused(tiny_sd, tmp_path):
    state = _storygen_checkpoint(tmp_path / "ckpt", tiny_sd)
    _rewrite(tmp_path / "ckpt", state, "safetensors", sharded=True, variant=None)
    (tmp_path / "ckpt" / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(DataError) as error:
        import_storygen(tmp_path / "ckpt", tmp_path / "out", tiny_sd)
    message = str(error.value)
    assert str(tmp_path / "ckpt" / "diffusion_pytorch_model.safetensors.index.json") in message
    assert "names 2 shards, but 1 are not in" in message
    assert "diffusion_pytorch_model-00002-of-00002.safetensors" in message
    assert "Download every shard" in message and not (tmp_path / "out").exists()
    (tmp_path / "ckpt" / "diffusion_pytorch_model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(DataError, match="not a sharded-checkpoint index"):
        import_storygen(tmp_path / "ckpt", tmp_path / "out", tiny_sd)
