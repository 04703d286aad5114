"""A wheel (not an editable install) in a fresh virtualenv tells a story from any directory: presets,
prompts and the shipped toy models come from the installed package. And a preset whose model folders
are missing is an error that names them, not a silent build."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("storypipe", "pipeline", "llava_ft", "storygen_ft", "eval", "toy", "configs", "prompts", "models")


def run(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh virtualenv with storypipe installed from a wheel; its dependencies come from the test's
    environment (a .pth file), so nothing is downloaded."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"  # a copy, so the build leaves nothing in the checkout
    source.mkdir()
    for name in SOURCES:
        shutil.copytree(
            ROOT / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__")
        )
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    pip = [sys.executable, "-m", "pip"]
    run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(work / "dist"), str(source)],
        work,
        env,
    )
    (wheel,) = (work / "dist").glob("storypipe-*.whl")

    environment = work / "venv"
    venv.create(environment, with_pip=False)
    site = Path(sysconfig.get_paths(vars={"base": str(environment), "platbase": str(environment)})["purelib"])
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(
        [*pip, "--python", str(environment / "bin" / "python"), "install", "--no-deps", "-q", str(wheel)],
        work,
        env,
    )
    return environment


def test_a_wheel_install_tells_a_story_from_another_directory(installed, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(ROOT / "examples" / "seed.png", elsewhere / "seed.png")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}

    where = run([str(installed / "bin" / "python"), "-c", "import storypipe, pipeline; print(storypipe.__file__); "
                 "print(pipeline.__file__)"], elsewhere, env).stdout.split()  # fmt: skip
    assert all(Path(path).is_relative_to(installed) for path in where), (
        where
    )  # the wheel's copy, not the checkout
    version = run([str(installed / "bin" / "storypipe"), "--version"], elsewhere, env).stdout
    assert version.startswith("storypipe ")

    story = tmp_path / "story"
    result = run([str(installed / "bin" / "storypipe"), "generate", "--preset", "toy", "--image", "seed.png",
                  "--caption", "Rosa waved hello in the green meadow.", "--frames", "2", "--out", str(story)],
                 elsewhere, env)  # fmt: skip
    assert f"Open {story / 'storyboard.html'}" in result.stdout
    assert (story / "frames" / "frame_01.png").is_file() and (story / "storyboard.html").is_file()
    assert "../models/toy" not in (story / "config.yaml").read_text()  # resolved to the installed models
    assert str(installed) in (story / "config.yaml").read_text()
    assert sorted(p.name for p in elsewhere.iterdir()) == ["seed.png"]  # nothing built or written here


def test_missing_model_folders_are_an_error_that_names_them_and_writes_nothing(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from storypipe.cli import app

    config = tmp_path / "configs" / "toy.yaml"  # the toy preset, away from the models it names
    config.parent.mkdir()
    shutil.copy(ROOT / "configs" / "toy.yaml", config)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["generate", "--config", str(config), "--image", str(ROOT / "examples" / "seed.png"),
                                      "--caption", "x", "--out", str(tmp_path / "story")])  # fmt: skip
    missing = (tmp_path / "models" / "toy" / "llava").resolve()
    assert result.exit_code == 2
    assert f"captioner.base_model: the model folder {missing} does not exist" in result.output
    assert "`make toy`" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["configs"]  # no model built, no story folder


def test_a_wheel_install_plans_the_vist_preset_from_its_shipped_configs(installed, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = run([str(installed / "bin" / "storypipe"), "plan", "--preset", "vist", "--for", "generate"],
                 tmp_path, env)  # fmt: skip
    assert "LLaVA language model" in result.stdout and "fits in 24.0 GiB: peak" in result.stdout
    assert "SD frame (3 refs, 512px) activations" in result.stdout
