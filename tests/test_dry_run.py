"""storypipe dry-run's parts, fast: the real-size tokenizer and processor, the measuring, the report.

The whole dry run (the real configurations, random weights) takes minutes on a CPU: `make dry-run`."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image

from pipeline.errors import InputError
from storypipe import dry_run, plan
from storypipe.config import resolve_config


def test_the_real_size_tokenizer_and_processor_match_llava_15():
    """Image token 32000 and 576 image tokens per 336-px image, as llava-hf/llava-1.5-7b-hf's processor."""
    from llava_ft.model import build_llava_tokenizer, llava_processor

    config = plan.meta_llava(plan.SHIPPED_CONFIGS["llava-hf/llava-1.5-7b-hf"]).config
    tokenizer = build_llava_tokenizer(
        dry_run.TOKENIZER_TRAINING_VOCAB, image_token_id=config.image_token_index
    )
    assert (
        tokenizer.convert_tokens_to_ids("<image>") == 32000
        and len(tokenizer) <= config.text_config.vocab_size
    )
    processor = llava_processor(tokenizer, config.vision_config.image_size, config.vision_config.patch_size)
    inputs = processor(images=Image.new("RGB", (500, 375)), text="USER: <image>\nWhat is it? ASSISTANT:",
                       return_tensors="pt")  # fmt: skip
    assert inputs["pixel_values"].shape[-2:] == (336, 336)
    assert (torch.as_tensor(inputs["input_ids"]) == 32000).sum() == (336 // 14) ** 2 == 576


def test_settings_are_checked():
    for bad in ({"language_layers": 0}, {"resolution": 100}, {"steps": 0}, {"references": 4}):
        with pytest.raises(InputError):
            dry_run.DryRunSettings(**bad)


def test_peak_memory_sees_an_allocation():
    with dry_run.PeakMemory(torch.device("cpu")) as peak:
        block = torch.ones(64 * 1024 * 1024)  # 256 MiB, touched
        block.add_(1)
        del block
    assert peak.peak >= 200 * 1024**2


def test_measure_loads_what_the_plan_counts(tiny_llava, tiny_sd):
    """The measuring step on the tiny models: per component the bytes loaded match the plan's; it captions, describes and draws one frame with three references."""
    cfg = resolve_config(None, "tiny", (f"captioner.base_model={tiny_llava}", f"generator.base_model={tiny_sd}",
                                        "captioner.story_adapter=null", "captioner.description_adapter=null",
                                        "generator.num_inference_steps=1"), {})  # fmt: skip
    measured = dry_run.measure(cfg, dry_run.DryRunSettings(resolution=64, steps=1), "cpu")
    predicted = {item.component: item for phase in plan.plan(cfg, "generate", device_type="cpu").phases
                 for item in phase.items}  # fmt: skip
    assert set(measured["components"]) <= set(predicted)
    for component, nbytes in measured["components"].items():
        # The plan counts parameters; the loaded models also hold buffers (position ids, rotary tables).
        assert nbytes == pytest.approx(predicted[component].bytes, rel=0.01), component
    # Three guidance branches, the 3 real references, and one blank pass: at the one step, t=1, every
    # blank reference sits at timestep 0, so the blank set is one pass.
    assert measured["unet_evaluations"] == 3 + 3 + 1
    assert measured["frame_size"] == [cfg.generator.resolution] * 2
    assert all(isinstance(text, str) for text in measured["outputs"].values())
    assert measured["peak_bytes"] > 0


def test_the_report_extrapolates_a_cut_language_model_and_says_so(tiny_llava, tiny_sd):
    cfg = resolve_config(None, "vist", (), {})
    predicted = plan.plan(cfg, "generate", device_type="cpu")
    measured = {"components": {"SD VAE": 10}, "peak_bytes": predicted.total_bytes,
                "seconds": {"load": 1.0, "story caption": 2.0, "description": 2.0, "frame": 3.0},
                "outputs": {"story caption": "x" * 500}}  # fmt: skip
    cut = dry_run.DryRunReport(
        dry_run.DryRunSettings(language_layers=2), "cpu", measured, predicted, predicted, 32
    )
    text = "\n".join(cut.lines())
    assert "extrapolated to the full depth (32 language layers, not run)" in text and "about 32 s" in text
    assert "(+0%)" in text and "x" * (dry_run.OUTPUT_SHOWN + 1) not in text
    full = dataclasses.replace(cut, settings=dry_run.DryRunSettings(language_layers=None))
    assert "extrapolated" not in "\n".join(full.lines())
