"""Benchmark at SD 1.5 size: one denoising step with 3 references at 512², against a plain SD step.

The model is SD 1.5 from the configs shipped in storypipe/model_configs, with random weights (nothing is
downloaded; built once into .cache/bench-sd15 by the dry run's builder), run in float32 on the CPU. The
context layers get small random output projections, as after training. Each mode draws a 3-step frame
and times its second step alone from the sampler's ``on_step`` marks (the first step carries the frame's
set-up, the last one runs at t=1, where every reference sits at timestep 0); the frame stops there. Rows:

* plain: no references, 2-branch text guidance: SD 1.5 itself, the reference of every ratio;
* naive: a reference pass per branch and the blank references recomputed every step;
* faithful, first frame: the default, one real pass for the image and all branches, blank references
  not yet kept (a story's first frame with these reference timesteps);
* faithful, later frames: the default once the blank features are kept (every later frame);
* fast: ``reference_features=once``, per step, and amortised over 40 steps with its once-per-frame
  reference passes.

Slow (about an hour on 2 CPU cores, more on a busy machine), so it is not part of `make bench` or CI:
`make bench-fullsize`.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
from PIL import Image
from timing import interleaved

from storygen_ft.config import GeneratorConfig
from storygen_ft.generator import FrameGenerator
from storygen_ft.model import StoryDiffusion

FOLDER = Path(".cache/bench-sd15")
RESOLUTION = 512
STEPS = 3  # the second of them is timed
FRAME_STEPS = 40  # what fast mode's once-per-frame work is spread over
REFERENCES = [Image.new("RGB", (RESOLUTION,) * 2, c) for c in ((200, 20, 20), (20, 20, 200), (20, 160, 20))]
REFERENCE_TEXTS = ["A red circle jumps.", "A blue square runs.", "A green triangle sits."]
DESCRIPTION = "A red circle waves."


def sd15_folder() -> Path:
    from storypipe.dry_run import SD_FOLDER, build_sd

    if not (FOLDER / SD_FOLDER / "model_index.json").is_file():
        build_sd(FOLDER)
    return FOLDER / SD_FOLDER


class TimedStepsDone(Exception):
    """Raised from ``on_step`` once the timed step is over: the rest of the frame is not needed."""


def timed_step(generator: FrameGenerator, references: bool = True, **options) -> tuple[float, float]:
    """(seconds of the frame's second step, seconds before its first step ended minus one step)."""
    marks = [time.perf_counter()]

    def mark(step: int, steps: int) -> None:
        marks.append(time.perf_counter())
        if step == 2:
            raise TimedStepsDone

    try:
        generator.generate(
            DESCRIPTION, REFERENCES if references else (), REFERENCE_TEXTS if references else (), seed=0,
            num_inference_steps=STEPS, on_step=mark, **options,
        )  # fmt: skip
    except TimedStepsDone:
        pass
    step = marks[2] - marks[1]
    return step, marks[1] - marks[0] - step


def main() -> None:
    torch.manual_seed(0)
    model = StoryDiffusion.from_pretrained(sd15_folder()).to(torch.float32)
    with torch.no_grad():
        for layer in model.context_layers.values():
            layer.to_out.weight.normal_(std=0.01)
    cfg = GeneratorConfig(base_model=str(FOLDER), resolution=RESOLUTION, num_inference_steps=STEPS)
    keeping = FrameGenerator(model, cfg)
    recomputing = FrameGenerator(model, dataclasses.replace(cfg, blank_reference_cache_mib=0))
    setup: dict[str, list[float]] = {"plain": [], "fast": []}

    def fast() -> float:
        step, before = timed_step(recomputing, reference_features="once")
        setup["fast"].append(before)
        return step

    def plain() -> float:
        step, before = timed_step(recomputing, references=False)
        setup["plain"].append(before)
        return step

    timings = interleaved(
        {
            "plain": plain,
            "naive": lambda: timed_step(recomputing, share_reference_passes=False)[0],
            "faithful, first frame": lambda: timed_step(recomputing)[0],
            "faithful, later frames": lambda: timed_step(keeping)[0],  # the warm-up keeps the blank features
            "fast": fast,
        },
        self_timed=True,
    )
    reference = timings["plain"]
    print(f"One denoising step at {RESOLUTION}² with 3 references, SD 1.5 size, float32 on the CPU "
          f"({torch.get_num_threads()} threads), against a plain SD step with 2-branch guidance:")  # fmt: skip
    print("| Mode | min s | median s | ratio (min) | ratio (median) |")
    print("|---|---|---|---|---|")
    for name, timing in timings.items():
        print(f"| {name} | {timing.min:.2f} | {timing.median:.2f} | {timing.min / reference.min:.2f}x | "
              f"{timing.median / reference.median:.2f}x |")  # fmt: skip
    # Fast mode's once-per-frame reference work: what its set-up takes beyond plain SD's, over 40 steps.
    extra = min(setup["fast"][1:]) - min(setup["plain"][1:])  # the warm-up's set-up is left out
    amortised = timings["fast"].min + max(0.0, extra) / FRAME_STEPS
    print(f"fast, its once-per-frame reference passes ({extra:.2f} s) spread over {FRAME_STEPS} steps: "
          f"{amortised / reference.min:.2f}x (min)")  # fmt: skip


if __name__ == "__main__":
    main()
