"""Start-up: the heavy libraries load only where they are used (issue 15, section 2).

Each check runs in a fresh interpreter and reads its ``sys.modules``: what a command imports is a property of
the code, not a timing. ``bench/bench_startup.py`` measures the seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SEED_IMAGE = REPO / "examples" / "seed.png"

# Never needed to show help, refuse bad input or read a config: each costs seconds to import.
HEAVY = ("torch", "transformers", "diffusers", "peft", "bitsandbytes", "accelerate")


def imported_after(code: str, tmp_path: Path) -> dict:
    """Run ``code`` in a fresh interpreter (this checkout first on the path) and return which of the
    watched modules it imported, with what it printed."""
    report = f"print('IMPORTED ' + json.dumps(sorted(name for name in {HEAVY!r} if name in sys.modules)))"
    script = "import json, sys\n" + textwrap.dedent(code) + "\n" + report + "\n"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600
    )
    assert done.returncode == 0, done.stderr
    line = next(line for line in done.stdout.splitlines() if line.startswith("IMPORTED "))
    return {"modules": set(json.loads(line.removeprefix("IMPORTED "))), "stdout": done.stdout}


def run_cli(*args: str) -> str:
    """The CLI's ``main`` on ``args``, inside the child; prints its exit status."""
    return f"""
        from storypipe.cli import main
        sys.argv = ["storypipe", *{list(args)!r}]
        try:
            main()
        except SystemExit as exit:
            print(f"EXIT {{exit.code}}")
    """


def test_importing_the_cli_and_the_api_loads_no_model_library(tmp_path):
    seen = imported_after("import storypipe.cli, storypipe.api, storypipe.wiring, storypipe.tasks", tmp_path)
    assert seen["modules"].isdisjoint(HEAVY)


@pytest.mark.parametrize(
    "args",
    [
        ("--help",),
        ("generate", "--help"),
        ("show-config", "--preset", "toy"),
        ("check", "--preset", "toy", "--for", "generate"),
    ],
    ids=["help", "generate-help", "show-config", "check"],
)
def test_help_and_config_commands_load_no_model_library(args, tmp_path):
    seen = imported_after(run_cli(*args), tmp_path)
    assert "EXIT 0" in seen["stdout"]
    assert seen["modules"].isdisjoint(HEAVY)


@pytest.mark.parametrize(
    "args",
    [
        ("--image", "no-such-image.png", "--caption", "Rosa waved hello."),
        ("--image", str(SEED_IMAGE), "--caption", "   "),
        ("--image", str(SEED_IMAGE), "--caption", "Rosa waved hello.", "--frames", "0"),
    ],
    ids=["missing-image", "empty-caption", "bad-frames"],
)
def test_input_errors_load_no_model_library(args, tmp_path):
    """The toy preset sets torch's thread count before it checks the inputs, so torch may load; nothing
    that builds or runs a model does."""
    seen = imported_after(
        run_cli("generate", "--preset", "toy", *args, "--out", str(tmp_path / "s")), tmp_path
    )
    assert "EXIT 2" in seen["stdout"]
    assert seen["modules"].isdisjoint({"transformers", "diffusers", "peft", "bitsandbytes"})


def test_captioners_without_adapters_load_neither_peft_nor_bitsandbytes(tiny_llava, tmp_path):
    """peft loads only for a configured adapter, bitsandbytes only for a 4-bit base (a zero-shot, full
    precision captioner here); transformers and torch are what the caption needs."""
    seen = imported_after(
        f"""
        from PIL import Image
        from llava_ft.captioners import Captioners
        from llava_ft.config import CaptionerConfig
        cfg = CaptionerConfig(base_model={str(tiny_llava)!r}, load_in_4bit=False, max_new_tokens=4,
                              story_adapter=None, description_adapter=None)
        captioners = Captioners.from_config(cfg)
        print("CAPTION", captioners.next_story_caption(Image.new("RGB", (32, 32)), "Rosa waved hello."))
        """,
        tmp_path,
    )
    assert "CAPTION" in seen["stdout"]
    assert {"torch", "transformers"} <= seen["modules"]
    assert seen["modules"].isdisjoint({"peft", "bitsandbytes", "diffusers"})
