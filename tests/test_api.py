"""The Python API: stories in memory, the same folder as the CLI, typed errors with the CLI's messages,
and the README's example."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

import storypipe
from pipeline.errors import InputError
from storypipe import Frame, Story, StoryPipeline
from storypipe.cli import app

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


@pytest.fixture()
def tiny_overrides(tiny_llava, tiny_sd):
    return [
        f"captioner.base_model={tiny_llava}",
        f"generator.base_model={tiny_sd}",
        "captioner.max_new_tokens=8",
    ]


@pytest.fixture()
def seed_png(tmp_path):
    path = tmp_path / "seed.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(path)
    return path


def test_tell_returns_the_story_in_memory_and_writes_nothing(tmp_path, monkeypatch, tiny_overrides, seed_png):
    monkeypatch.chdir(tmp_path)
    pipe = StoryPipeline.from_preset("tiny", tiny_overrides, values={"generator.num_inference_steps": 2})
    streamed = []
    story = pipe.tell(Image.open(seed_png), "Rosa waved hello.", frames=3, seed=5, on_frame=streamed.append)

    assert isinstance(story, Story) and [f.index for f in story.frames] == [0, 1, 2]
    assert all(isinstance(frame.image, Image.Image) for frame in story.frames)
    assert story.frames[1].image.size == (32, 32)  # generator.resolution of the tiny preset
    assert streamed == story.frames  # on_frame saw each frame as it was finished
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seed.png"]  # no folder until save()
    # The same seed gives the same story, whether the seed image comes as a PIL image or a path.
    again = pipe.tell(seed_png, "Rosa waved hello.", frames=3, seed=5)
    assert [f.story_caption for f in again.frames] == [f.story_caption for f in story.frames]
    assert [f.image.tobytes() for f in again.frames] == [f.image.tobytes() for f in story.frames]


def test_save_writes_the_folder_the_cli_writes_for_the_same_seed(tmp_path, tiny_overrides, seed_png):
    cli_folder, api_folder = tmp_path / "cli", tmp_path / "api"
    sets = [argument for override in tiny_overrides for argument in ("--set", override)]
    result = runner.invoke(app, ["generate", "--image", str(seed_png), "--caption", "Rosa waved hello.",
                                 "--frames", "3", "--seed", "4", "--steps", "2", "--out", str(cli_folder),
                                 "--preset", "tiny", *sets])  # fmt: skip
    assert result.exit_code == 0, result.output

    pipe = StoryPipeline.from_preset("tiny", tiny_overrides, values={"generator.num_inference_steps": 2})
    pipe.tell(seed_png, "Rosa waved hello.", frames=3, seed=4).save(api_folder)

    def files(folder):
        return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())

    assert files(api_folder) == files(cli_folder)
    for name in files(cli_folder):
        if name == "story.json":  # the same story; only the wall-clock timings differ
            stories = [json.loads((folder / name).read_text()) for folder in (cli_folder, api_folder)]
            for data in stories:
                data["metadata"].pop("timings_s")
            assert stories[0] == stories[1]
        else:
            assert (api_folder / name).read_bytes() == (cli_folder / name).read_bytes(), name


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda pipe, story, paths: pipe.tell(paths["seed"], "   "), "the caption is empty"),
        (lambda pipe, story, paths: pipe.tell(paths["seed"], "x", frames=1), "frames must be in 2..20"),
        (lambda pipe, story, paths: pipe.tell(paths["missing"], "x"), "does not exist"),
        (lambda pipe, story, paths: pipe.edit(story, frame=7, caption="x"),
         "frame 7 is out of range: the story has frames 0..1"),
        (lambda pipe, story, paths: pipe.edit(story, frame=1, caption="x", strength=0), "strength must be in (0, 1]"),
        (lambda pipe, story, paths: pipe.insert(story, after=2, caption="x"), "after 2 is out of range"),
    ],
)  # fmt: skip
def test_bad_arguments_raise_a_typed_error_before_any_model_loads(tmp_path, seed_png, call, message):
    # Models that do not exist: an argument check that ran after loading would fail on them instead.
    missing = tmp_path / "none"
    pipe = StoryPipeline.from_preset(
        "tiny", [f"captioner.base_model={missing}", f"generator.base_model={missing}"]
    )
    story = Story([Frame(0, "x", "y", Image.new("RGB", (8, 8)), "seed"),
                   Frame(1, "x", "y", Image.new("RGB", (8, 8)), "generated")])  # fmt: skip
    with pytest.raises(InputError, match=re.escape(message)):
        call(pipe, story, {"seed": seed_png, "missing": tmp_path / "gone.png"})


def test_the_cli_shows_the_apis_message(tmp_path, seed_png):
    with pytest.raises(InputError) as info:
        StoryPipeline.from_preset("tiny").tell(seed_png, "  ")
    result = runner.invoke(app, ["generate", "--image", str(seed_png), "--caption", "  ", "--preset", "tiny",
                                 "--out", str(tmp_path / "s")])  # fmt: skip
    assert result.exit_code == 2 and result.output == f"error: {info.value}\n"
    assert not (tmp_path / "s").exists()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output == f"storypipe {storypipe.__version__}\n"
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", storypipe.__version__)


def readme_python_example() -> str:
    """The code block of the README's "Python API" section."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_the_readmes_python_example_runs(tmp_path, monkeypatch, capsys):
    (tmp_path / "examples").mkdir()
    shutil.copy(ROOT / "examples" / "seed.png", tmp_path / "examples" / "seed.png")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(readme_python_example(), "README.md", "exec"), namespace)  # noqa: S102

    story = namespace["story"]
    printed = capsys.readouterr().out.splitlines()
    assert printed[:5] == [f"{i} {caption}" for i, caption in enumerate(printed_captions(tmp_path))]
    assert len(story.frames) == 6 and story.frames[2].source == "inserted"  # edited, then a panel inserted
    assert (
        Story.load(tmp_path / "stories" / "demo").frames[0].story_caption
        == "Rosa waved hello in the green meadow."
    )


def printed_captions(tmp_path: Path) -> list[str]:
    """The story captions the example's first story was saved with."""
    saved = json.loads((tmp_path / "stories" / "demo" / "story.json").read_text())
    return [frame["story_caption"] for frame in saved["frames"]]
