"""`storypipe finetune-storygen` and `storypipe convert-storysv` end to end, offline."""

from __future__ import annotations

from click.testing import CliRunner

from pipeline.data.vist import load_vist_split
from storygen_ft.model import StoryDiffusion
from storypipe.cli import app
from tests.test_storysv import write_flintstones

runner = CliRunner()


def test_finetune_storygen_with_the_tiny_preset(tmp_path, toy_stories, storypipe_cache):
    # The base does not exist yet: the tiny preset builds it on first use, in storypipe's cache only.
    base, out = storypipe_cache / tmp_path.name / "tiny-sd", tmp_path / "run"
    result = runner.invoke(app, [
        "finetune-storygen", "--data", str(toy_stories), "--out", str(out), "--preset", "tiny",
        "--set", f"generator.base_model={base}", "--set", "generator.train.max_steps=2",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"--set generator.base_model={out}" in result.output
    assert (base / "model_index.json").is_file()
    model = StoryDiffusion.from_pretrained(out)
    assert model.context_kind == "storygen" and len(model.context_layers) > 0
    assert "max_steps: 2" in (out / "config.yaml").read_text()

    result = runner.invoke(app, ["finetune-storygen", "--data", str(toy_stories), "--out", str(out), "--preset", "tiny",
                                 "--set", f"generator.base_model={base}", "--set", "generator.train.max_steps=3",
                                 "--set", "generator.train.checkpoint_every=1"])  # fmt: skip
    assert result.exit_code == 0  # a finished run leaves no checkpoints, so a new run may reuse the folder


def test_convert_storysv_cli_writes_a_vist_folder(tmp_path):
    write_flintstones(tmp_path / "src")
    result = runner.invoke(app, [
        "convert-storysv", "--dataset", "flintstones", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "out"),
        "--referential", "--preset", "tiny",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Wrote" in result.output and (tmp_path / "out" / "config.yaml").is_file()
    split = load_vist_split(tmp_path / "out", "train")
    assert split.stories and not split.dropped
    assert all(frame.labels is not None for story in split.stories for frame in story.frames)


def test_convert_storysv_rejects_an_unknown_dataset(tmp_path):
    result = runner.invoke(
        app, ["convert-storysv", "--dataset", "mugen", "--src", str(tmp_path), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2 and "'mugen' is not one of 'flintstones', 'pororo'" in result.output
