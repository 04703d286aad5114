"""storypipe plan: the shipped real-size configs, and the planner's counts and bytes against real models."""

from __future__ import annotations

import dataclasses

import pytest
from click.testing import CliRunner

from storypipe import plan
from storypipe.cli import app
from storypipe.config import resolve_config

runner = CliRunner()

# The published parameter totals of the vist preset's models.
LLAVA_15_7B = 7_063_427_072
SD15_UNET = 859_520_964
SD15_VAE = 83_653_863
SD15_TEXT_ENCODER = 123_060_480  # CLIP ViT-L/14's text model


def tiny_config(tiny_llava, tiny_sd, *overrides: str):
    """The tiny preset on the conftest's tiny model folders."""
    return resolve_config(
        None,
        "tiny",
        (f"captioner.base_model={tiny_llava}", f"generator.base_model={tiny_sd}", *overrides),
        {},
    )


def by_component(memory_plan: plan.MemoryPlan) -> dict[str, plan.PlanItem]:
    return {item.component: item for item in memory_plan.items}


def test_the_shipped_configs_have_the_published_parameter_counts():
    llava = plan.meta_llava(plan.SHIPPED_CONFIGS["llava-hf/llava-1.5-7b-hf"])
    unet, vae, text_encoder = plan.meta_sd(
        plan.SHIPPED_CONFIGS["stable-diffusion-v1-5/stable-diffusion-v1-5"]
    )
    assert next(llava.parameters()).device.type == "meta"
    assert plan.count(llava) == LLAVA_15_7B
    assert (plan.count(unet), plan.count(vae), plan.count(text_encoder)) == (
        SD15_UNET,
        SD15_VAE,
        SD15_TEXT_ENCODER,
    )


def test_the_tiny_plan_counts_what_the_stages_build(tiny_llava, tiny_sd):
    from transformers import LlavaForConditionalGeneration

    from llava_ft.train import add_lora
    from storygen_ft.model import StoryDiffusion

    cfg = tiny_config(
        tiny_llava, tiny_sd, "captioner.story_adapter=null", "captioner.description_adapter=null"
    )
    items = by_component(plan.plan(cfg, "finetune-llava"))
    llava = LlavaForConditionalGeneration.from_pretrained(tiny_llava)
    llava_parts = ("LLaVA vision tower", "LLaVA projector", "LLaVA language model", "LLaVA lm_head")
    assert sum(items[part].params for part in llava_parts) == sum(p.numel() for p in llava.parameters())
    lora = add_lora(llava, cfg.captioner.lora)
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert items["LLaVA LoRA adapter 1"].params == trainable > 0

    items = by_component(plan.plan(cfg, "generate"))
    model = StoryDiffusion.from_pretrained(tiny_sd, context=cfg.generator.context)
    assert items["SD UNet"].params == sum(p.numel() for p in model.unet.parameters())
    assert items["SD VAE"].params == sum(p.numel() for p in model.vae.parameters())
    assert items["SD text encoder"].params == sum(p.numel() for p in model.text_encoder.parameters())
    context = items[f"SD context layers ({cfg.generator.context})"]
    assert context.params == sum(p.numel() for p in model.context_layers.parameters())
    assert "LLaVA LoRA adapter 1" not in items  # no adapter is set: none is loaded


def test_nf4_weight_bytes_follow_the_double_quantisation_formula(tiny_llava, tiny_sd):
    from torch import nn

    quantised = by_component(
        plan.plan(tiny_config(tiny_llava, tiny_sd, "captioner.load_in_4bit=true"), "generate")
    )
    plain = by_component(
        plan.plan(tiny_config(tiny_llava, tiny_sd, "captioner.load_in_4bit=false"), "generate")
    )
    language_model = plan.meta_llava(tiny_llava).model.language_model
    linear = sum(m.weight.numel() for m in language_model.modules() if isinstance(m, nn.Linear))
    rest = plan.count(language_model) - linear
    assert plan.NF4_BITS_PER_PARAM == pytest.approx(4.127, abs=0.001)
    assert quantised["LLaVA language model"].bytes == round(linear * plan.NF4_BITS_PER_PARAM / 8) + rest * 2
    assert plain["LLaVA language model"].bytes == plan.count(language_model) * 2  # bf16 on CUDA
    for skipped in ("LLaVA vision tower", "LLaVA projector", "LLaVA lm_head"):  # load_llava's skip list
        assert quantised[skipped] == plain[skipped]
        assert quantised[skipped].dtype == "bfloat16"
    # On a CPU nothing is quantised and everything is fp32; the SD parts follow generator.dtype.
    cpu = by_component(plan.plan(tiny_config(tiny_llava, tiny_sd, "captioner.load_in_4bit=true"), "generate",
                                 device_type="cpu"))  # fmt: skip
    assert cpu["LLaVA language model"].bytes == plan.count(language_model) * 4
    assert quantised["SD UNet"].dtype == "float16" and cpu["SD UNet"].dtype == "float32"


def test_a_budget_too_small_names_the_largest_items(tiny_llava, tiny_sd):
    memory_plan = plan.plan(tiny_config(tiny_llava, tiny_sd), "generate", gpu_memory="1MiB")
    assert not memory_plan.fits
    largest = max(memory_plan.items, key=lambda item: item.bytes)
    assert "do not fit in" in memory_plan.verdict() and largest.component in memory_plan.verdict()
    roomy = dataclasses.replace(memory_plan, budget_bytes=memory_plan.total_bytes)
    assert roomy.fits and "not counted yet" in roomy.verdict()


def test_gpu_memory_sizes():
    assert plan.parse_memory("24GiB") == 24 * 1024**3
    assert plan.parse_memory("80 GB") == 80 * 10**9
    assert plan.parse_memory("512MiB") == 512 * 1024**2
    assert plan.parse_memory("24") == 24 * 1024**3
    with pytest.raises(Exception, match="24GiB"):
        plan.parse_memory("lots")


def test_cli_plan_for_the_vist_preset_fits_24gib():
    result = runner.invoke(app, ["plan", "--preset", "vist", "--for", "generate", "--gpu-memory", "24GiB"])
    assert result.exit_code == 0, result.output
    assert "LLaVA language model" in result.output and "nf4 (double quant)" in result.output
    assert f"{SD15_UNET:,}" in result.output
    assert "weights fit in 24.0 GiB with" in result.output
    assert "activations, which are not counted yet" in result.output


def test_cli_plan_with_too_small_a_budget_says_do_not_fit():
    result = runner.invoke(
        app, ["plan", "--preset", "vist", "--for", "finetune-storygen", "--gpu-memory", "2GiB"]
    )
    assert result.exit_code == 0, result.output
    assert "do not fit in 2.0 GiB: largest items SD UNet (1.60 GiB)" in result.output
