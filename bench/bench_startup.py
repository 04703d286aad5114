"""Benchmark: start-up of `storypipe generate --preset toy` (the 5-frame toy story of `make demo`).

Every figure is a fresh process, timed from just before it is spawned:
* ``first model call``: until the first forward of any torch module in that process, the CLI's own
  `generate` command (a module forward pre-hook, torch's public ``register_module_forward_pre_hook``,
  prints the wall clock; importing torch first moves nothing, the first call needs torch anyway);
* ``whole story``: the same command to its exit;
* ``--help`` and an input error (a seed image that does not exist);
* the reference, ``import floor``: a bare interpreter importing only the libraries the toy models' first
  call needs (torch, transformers' LLaVA, peft for the adapters, diffusers' UNet and VAE).

Then one more run under ``python -X importtime`` lists the packages that take the most import time.
Run it from the repository root: ``python bench/bench_startup.py``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from timing import Timing, interleaved, ratio_line

REPO = Path(__file__).resolve().parents[1]
SEED_IMAGE = REPO / "examples" / "seed.png"
CAPTION = "Rosa waved hello in the green meadow."
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
WARMUP = 1
HEAVY_PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "bitsandbytes",
    "diffusers",
    "accelerate",
    "scipy",
    "storypipe",
)

FLOOR = (
    "import torch, transformers.models.llava.modeling_llava, peft, "
    "diffusers.models.unets.unet_2d_condition, diffusers.models.autoencoders.autoencoder_kl"
)
FIRST_CALL_DRIVER = """
import sys, time
import torch

def first_call(module, args):
    print(f"FIRST_MODEL_CALL {time.time()!r} {type(module).__name__}", file=sys.stderr, flush=True)
    hook.remove()

hook = torch.nn.modules.module.register_module_forward_pre_hook(first_call)
from storypipe.cli import main
sys.argv = ["storypipe", *sys.argv[1:]]
main()
"""


def spawn(*args: str, expect: int = 0) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=ENV, cwd=REPO)
    if done.returncode != expect:
        raise RuntimeError(f"{args[:3]} exited {done.returncode}, not {expect}:\n{done.stderr[-2000:]}")
    return done


def generate_args(out: Path) -> list[str]:
    return ["generate", "--preset", "toy", "--image", str(SEED_IMAGE), "--caption", CAPTION,
            "--out", str(out), "--overwrite"]  # fmt: skip


def import_breakdown(out: Path) -> list[tuple[str, float]]:
    """Seconds to import each heavy package in one `generate` run, as ``-X importtime`` reports its first
    import: cumulative, so it includes what that import pulled in that was not loaded yet."""
    done = spawn("-X", "importtime", "-m", "storypipe.cli", *generate_args(out))
    seconds = {}
    for line in done.stderr.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \|\s+(\S+)$", line)
        if match and match.group(2) in HEAVY_PACKAGES:
            seconds[match.group(2)] = int(match.group(1)) / 1e6
    return sorted(seconds.items(), key=lambda item: -item[1])


def main() -> None:
    first_calls = Timing("first model call", [])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "story"

        def first_call_run() -> None:
            started = time.time()
            done = spawn("-c", FIRST_CALL_DRIVER, *generate_args(out))
            stamp = re.search(r"FIRST_MODEL_CALL (\S+) (\S+)", done.stderr)
            if stamp is None:
                raise RuntimeError("the story ran no torch module")
            first_calls.seconds.append(float(stamp.group(1)) - started)

        timings = interleaved(
            {
                "import floor": lambda: spawn("-c", FLOOR),
                "whole story": first_call_run,
                "--help": lambda: spawn("-m", "storypipe.cli", "--help"),
                "input error": lambda: spawn(
                    "-m",
                    "storypipe.cli",
                    *generate_args(out)[:3],
                    "--image",
                    "missing.png",
                    "--caption",
                    CAPTION,
                    expect=2,
                ),  # fmt: skip
            }
        )
        first_calls.seconds = first_calls.seconds[WARMUP:]  # the warm-up run is not a sample
        timings[first_calls.name] = first_calls
        breakdown = import_breakdown(out)

    print("Start-up of `storypipe generate --preset toy` (5 frames), fresh processes:")
    for name in ("first model call", "whole story", "--help", "input error"):
        print("  " + ratio_line(timings, name, "import floor"))
    print("  " + ratio_line(timings, "import floor", "import floor"))
    print(
        "Import seconds of each package where it is first imported (cumulative), one `generate` run under -X importtime:"
    )
    print("  " + ", ".join(f"{package} {seconds:.2f}" for package, seconds in breakdown))


if __name__ == "__main__":
    main()
