"""Benchmark: reference-feature computation in the frame generator, naive vs shared vs fast mode.

A small SD-1.5-layout model is built offline (larger than the test model) and its context layers get
small random output projections, so the references really change the frame, as after training. For one
frame with 3 references it reports, in one run:
* UNet passes per frame (a count of UNet evaluations, not time) for: per-branch reference passes with
  the blank references recomputed every step (naive), shared passes (the default) on a story's first
  frame and on later frames (once the blank features are kept), and fast mode, each as a ratio to naive;
* seconds per frame for the same three, as time ratios to naive (bench/timing.py: warmed up,
  interleaved, min / median of 3). The time ratio is not the pass ratio: a frame also spends time
  outside the UNet (text and VAE encoding, decoding), and not every pass costs the same;
* how far fast mode's decoded frame moves from the faithful one (mean absolute pixel difference, 0-255),
  next to how far the references move it at all (faithful vs no references).
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timing import interleaved, ratio_line

from storygen_ft.config import GeneratorConfig, TinyDiffusionSettings
from storygen_ft.generator import FrameGenerator
from storygen_ft.model import StoryDiffusion, build_tiny_diffusion

STEPS = 10
SETTINGS = TinyDiffusionSettings(
    resolution=64, block_channels=(64, 128), vae_channels=(32, 64), cross_attention_dim=64
)
REFERENCES = [Image.new("RGB", (64, 64), colour) for colour in ((200, 20, 20), (20, 20, 200), (20, 160, 20))]
REFERENCE_TEXTS = ["A red circle jumps.", "A blue square runs.", "A green triangle sits."]


def mean_abs_difference(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).mean())


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny_diffusion(Path(tmp) / "sd", SETTINGS)
        model = StoryDiffusion.from_pretrained(folder)
        with torch.no_grad():
            torch.manual_seed(0)
            for layer in model.context_layers.values():
                layer.to_out.weight.normal_(std=0.05)
        cfg = GeneratorConfig(base_model=str(folder), resolution=64, num_inference_steps=STEPS)
        keeping = FrameGenerator(model, cfg)  # the default: blank-reference features kept across frames
        recomputing = FrameGenerator(model, dataclasses.replace(cfg, blank_reference_cache_mib=0))
        modes = {  # (generator, options)
            "naive": (recomputing, {"share_reference_passes": False}),  # a pass per branch, blank every step
            "shared, first frame": (recomputing, {}),  # the default before any blank feature is kept
            "shared, later frames": (keeping, {}),  # the default once they are
            "fast": (keeping, {"reference_features": "once"}),
        }

        def generate(name: str):
            generator, options = modes[name]
            return generator.generate("A red circle waves.", REFERENCES, REFERENCE_TEXTS, seed=0, **options)

        generate("shared, later frames")  # keeps the blank features of this schedule
        results = {name: generate(name) for name in modes}
        naive_passes = results["naive"].unet_evaluations
        print(f"UNet passes per frame ({STEPS} steps, 3 references; a pass count, not time):")
        for name, result in results.items():
            print(f"  {name:>20}: {result.unet_evaluations} UNet passes ({result.unet_evaluations / naive_passes:.2f}x naive)")  # fmt: skip
        timings = interleaved({name: lambda name=name: generate(name) for name in modes})
        print("Seconds per frame (time):")
        for name in modes:
            print("  " + ratio_line(timings, name, "naive"))
        plain = keeping.generate("A red circle waves.", seed=0).image
        faithful = results["shared, later frames"].image
        print(f"fast-mode drift: {mean_abs_difference(results['fast'].image, faithful):.2f} mean |Δpixel| from the faithful frame; "
              f"the references themselves move it {mean_abs_difference(faithful, plain):.2f}")  # fmt: skip
        identical = np.array_equal(
            np.asarray(results["naive"].image), np.asarray(results["shared, first frame"].image)
        )
        print(f"shared passes bit-identical to naive: {identical}")


if __name__ == "__main__":
    main()
