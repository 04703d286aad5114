"""Benchmark: `storypipe generate-many` throughput on the toy preset (the shipped toy models, one CPU thread).

Reports, in one run, each as stories per second with min/median over interleaved rounds (bench/timing.py):
* batching, in one process: ``--batch-size 8`` against one story at a time (``--batch-size 1``), through
  ``StoryPipeline.tell_many`` with the models loaded once (goal: >= 3x);
* processes: 16 stories by the CLI under ``torchrun --nproc_per_node 2`` (each process tells every other story) against
  the CLI as one process, start-up included in both (goal: >= 1.6x on two cores).

Every round tells the same stories into a fresh folder. The machine's other load shows in the figures:
say how busy it was when you quote them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from timing import interleaved, ratio_line  # bench/timing.py: this script's folder is on sys.path

from storypipe import StoryPipeline

ROOT = Path(__file__).resolve().parent.parent
STORIES, FRAMES, BATCH = 8, 5, 8
PROCESS_STORIES = 16  # enough work that each process's start-up (the same in both runs) weighs less
CAPTIONS = ["Rosa waved hello in the green meadow.", "Bruno ran to the lake.", "Gala jumped over the log.",
            "Pia sat under the tree.", "Rosa and Bruno played in the sand.", "Gala spun around in the forest.",
            "Bruno fell asleep by the lake.", "Pia danced to the music."]  # fmt: skip
BIN = Path(sys.executable).parent


def write_seeds(folder: Path, stories: int, frames: int) -> Path:
    shutil.copy(ROOT / "examples" / "seed.png", folder / "seed.png")
    path = folder / "seeds.jsonl"
    lines = [
        {"image": "seed.png", "caption": CAPTIONS[k % len(CAPTIONS)], "seed": k, "frames": frames}
        for k in range(stories)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def stories_per_second(timings: dict, stories: int) -> dict:
    """The timings of ``interleaved`` as seconds per story, so that ratios read as throughput ratios."""
    for timing in timings.values():
        timing.seconds = [seconds / stories for seconds in timing.seconds]
    return timings


def throughput_line(timings: dict, name: str, reference: str, goal: float) -> str:
    """Stories per second of both, and ``name``'s throughput as a multiple of ``reference``'s."""
    own, ref = timings[name], timings[reference]
    return (
        f"stories/s (min / median time): {reference} {1 / ref.min:.2f} / {1 / ref.median:.2f}, {name} "
        f"{1 / own.min:.2f} / {1 / own.median:.2f}; throughput {ref.min / own.min:.2f}x / "
        f"{ref.median / own.median:.2f}x (goal >= {goal}x)"
    )


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        seeds = write_seeds(tmp, STORIES, FRAMES)
        rounds = iter(range(10**6))

        # 1. Batching, in one process with the models loaded once.
        pipe = StoryPipeline.from_preset("toy")

        def tell(batch_size: int):
            return lambda: pipe.tell_many(seeds, tmp / f"out-{next(rounds)}", batch_size=batch_size)

        timings = stories_per_second(
            interleaved({"batch-1": tell(1), f"batch-{BATCH}": tell(BATCH)}), STORIES
        )
        print(f"batching ({STORIES} toy stories of {FRAMES} frames, one process; seconds per story):")
        print("  " + ratio_line(timings, f"batch-{BATCH}", "batch-1"))
        print("  " + throughput_line(timings, f"batch-{BATCH}", "batch-1", goal=3.0))

        # 2. Processes: the CLI as one process against two under torchrun, start-up included.
        seeds = write_seeds(tmp, PROCESS_STORIES, FRAMES)
        environment = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
        command = ["-m", "storypipe.cli", "generate-many", "--preset", "toy", "--seeds", str(seeds),
                   "--batch-size", str(BATCH)]  # fmt: skip

        def cli(*launcher: str):
            def run() -> None:
                out = tmp / f"out-{next(rounds)}"
                subprocess.run([*launcher, *command, "--out", str(out)], env=environment, check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
                assert (
                    len(list(out.iterdir())) == PROCESS_STORIES
                )  # every story once, from one process or two

            return run

        timings = stories_per_second(
            interleaved({
                "1-process": cli(sys.executable),
                "2-processes": cli(str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", "29511"),
            }),
            PROCESS_STORIES,
        )  # fmt: skip
        print(
            f"processes ({PROCESS_STORIES} toy stories, --batch-size {BATCH}, the CLI with start-up; seconds per story):"
        )
        print("  " + ratio_line(timings, "2-processes", "1-process"))
        print("  " + throughput_line(timings, "2-processes", "1-process", goal=1.6))


if __name__ == "__main__":
    main()
