"""Benchmark: a 5-frame toy story on a busy machine, with one torch thread and with torch's default.

The story runs in this process through the Python API, with the models loaded once per thread setting.
"Busy" means two other single-threaded CPU-bound processes (``while True: pass``), started once and
paused (SIGSTOP) except while a busy run is timed (SIGCONT), so no run pays for starting them; each also
ends by itself after ``SPINNER_SECONDS``, and all are killed when the bench ends. Goal (issue 15): busy
<= 2x idle with the toy preset's default, ``runtime.num_threads=1``.

Run it from the repository root on an otherwise idle machine: ``python bench/bench_contention.py``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from timing import interleaved, ratio_line

from storypipe import StoryPipeline

REPO = Path(__file__).resolve().parents[1]
SEED_IMAGE = REPO / "examples" / "seed.png"
CAPTION = "Rosa waved hello in the green meadow."
FRAMES = 5
SPINNERS = 2
SPINNER_SECONDS = 1800  # a bound: a spinner outliving a killed bench stops by itself
SPINNER = f"import time\nend = time.monotonic() + {SPINNER_SECONDS}\nwhile time.monotonic() < end: pass"


@contextlib.contextmanager
def paused_spinners(count: int) -> Iterator[list[subprocess.Popen]]:
    """``count`` CPU-bound processes, paused; killed on exit."""
    spinners = [subprocess.Popen([sys.executable, "-c", SPINNER]) for _ in range(count)]
    try:
        for spinner in spinners:
            os.kill(spinner.pid, signal.SIGSTOP)
        yield spinners
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def story_run(pipe: StoryPipeline, spinners: list[subprocess.Popen] | None = None) -> Callable[[], None]:
    """One story with ``pipe``; with ``spinners`` running only for its duration."""

    def run() -> None:
        for spinner in spinners or ():
            os.kill(spinner.pid, signal.SIGCONT)
        try:
            pipe.tell(SEED_IMAGE, CAPTION, frames=FRAMES, seed=1)
        finally:
            for spinner in spinners or ():
                os.kill(spinner.pid, signal.SIGSTOP)

    return run


def main() -> None:
    default_threads = torch.get_num_threads()
    one = StoryPipeline.from_preset("toy", values={"runtime.num_threads": 1})
    default = StoryPipeline.from_preset("toy", values={"runtime.num_threads": "auto"})
    names = {1: "1 thread", "auto": f"torch default ({default_threads} threads)"}
    with paused_spinners(SPINNERS) as spinners:
        timings = interleaved(
            {
                f"idle, {names[1]}": story_run(one),
                f"busy, {names[1]}": story_run(one, spinners),
                f"idle, {names['auto']}": story_run(default),
                f"busy, {names['auto']}": story_run(default, spinners),
            }
        )
    print(f"A {FRAMES}-frame toy story, models loaded; busy = {SPINNERS} single-threaded CPU-bound processes "
          f"on {os.cpu_count()} cores:")  # fmt: skip
    for threads in names.values():
        print("  " + ratio_line(timings, f"busy, {threads}", f"idle, {threads}"))
    print("  " + ratio_line(timings, f"idle, {names['auto']}", f"idle, {names[1]}"))
    print("  " + ratio_line(timings, f"idle, {names[1]}", f"idle, {names[1]}"))
    print("Goal: busy <= 2x idle with 1 thread (the toy preset's default).")


if __name__ == "__main__":
    main()
