"""Benchmark: one base + two adapters against two separately loaded models, and batched captioning.

Uses a small LLaVA built offline (bigger than the test model, so the base dominates as it does at 7B).
Reports, in one run:
* parameter bytes (not process memory): bytes of distinct parameter storage for one base + two adapters,
  against two models that each load the base with one adapter. The base's weights are one copy shared by
  both adapters; each adapter's LoRA matrices are its own. The ratio approaches 0.5 as the base outgrows
  the adapters. Activations, the KV cache and the allocator are not counted;
* speed: 8 captions in one batched call against 8 single calls (bench/timing.py: warmed up, interleaved,
  min / median of 3), every answer exactly ``NEW_TOKENS`` tokens long.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from peft import PeftModel
from PIL import Image
from timing import interleaved, ratio_line

from llava_ft.captioners import Captioners
from llava_ft.config import CaptionerConfig, LoraSettings, TinyLlavaSettings
from llava_ft.model import build_tiny_llava, load_llava
from llava_ft.train import add_lora

BATCH = 8
NEW_TOKENS = 24
SETTINGS = TinyLlavaSettings(image_size=64, patch_size=8, vision_hidden_size=128, vision_layers=4,
                             text_hidden_size=512, text_layers=8, attention_heads=8, vocab_size=1024)  # fmt: skip


def parameter_bytes(*models: torch.nn.Module) -> int:
    """Bytes of distinct parameter storages across ``models`` (shared tensors count once)."""
    storages = {}
    for model in models:
        for parameter in model.parameters():
            storage = parameter.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def main() -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        base_dir = build_tiny_llava(Path(tmp) / "base", SETTINGS)
        lora = LoraSettings(r=16, alpha=32, dropout=0.0)
        for task in ("story", "description"):
            model, _ = load_llava(base_dir)
            add_lora(model, lora).save_pretrained(Path(tmp) / task)
        cfg = CaptionerConfig(base_model=str(base_dir), load_in_4bit=False, temperature=0.0, max_new_tokens=NEW_TOKENS,
                              story_adapter=f"{tmp}/story", description_adapter=f"{tmp}/description")  # fmt: skip

        # 1. Memory: one base with both adapters vs two base+adapter models.
        shared = Captioners.from_config(cfg)
        separate = [
            PeftModel.from_pretrained(load_llava(base_dir)[0], f"{tmp}/{task}")
            for task in ("story", "description")
        ]
        shared_bytes, separate_bytes = parameter_bytes(shared.model), parameter_bytes(*separate)
        print(f"parameter bytes: one base + two adapters {shared_bytes / 2**20:.1f} MiB, two separate "
              f"base + adapter models {separate_bytes / 2**20:.1f} MiB: {shared_bytes / separate_bytes:.3f}x")  # fmt: skip
        del separate

        # 2. Speed: batched vs unbatched generation, min_new_tokens so every answer has the same length.
        shared.model.generation_config.min_new_tokens = NEW_TOKENS
        images = [Image.new("RGB", (64, 64), (30 * k, 200 - 20 * k, 90)) for k in range(BATCH)]
        captions = [f"Rosa ran very fast, number {k}." for k in range(BATCH)]

        def single_calls() -> None:
            for image, caption in zip(images, captions, strict=True):
                shared.next_story_caption(image, caption)

        timings = interleaved(
            {"batched": lambda: shared.next_story_captions(images, captions), "single calls": single_calls}
        )
        tokens = BATCH * NEW_TOKENS
        print(f"speed, {BATCH} captions of {NEW_TOKENS} new tokens each:")
        print("  " + ratio_line(timings, "batched", "single calls"))
        print("  " + ratio_line(timings, "single calls", "single calls"))
        print(f"  tokens/s (best run): batched {tokens / timings['batched'].min:.0f}, "
              f"single calls {tokens / timings['single calls'].min:.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
