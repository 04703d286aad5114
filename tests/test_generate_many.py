"""`storypipe generate-many` / `StoryPipeline.tell_many`: the same story folders as `generate`, batched,
resumable, sharded, and every bad line named before any model loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.story import Story
from pipeline.story_folder import load_story
from storypipe import StoryPipeline
from storypipe.cli import app
from storypipe.config import resolve_config
from storypipe.many import BadLines
from tests.fakes import FakeCaptioner, FakeIllustrator

runner = CliRunner()

# Images from a batch may differ from the single-story ones by floating-point batching noise (a batched
# UNet sums in another order); texts may not differ at all. Per frame, in 8-bit levels: a mean |difference|
# of at most 1 level and no pixel off by more than 16 (noise near a rounding edge flips single pixels by a
# level or two; a different image would be tens of levels off almost everywhere).
MEAN_LEVELS, MAX_LEVELS = 1.0, 16

LINES = [
    {"image": "red.png", "caption": "Rosa waved hello.", "seed": 1, "id": "rosa"},
    {"image": "blue.png", "caption": "Bruno ran to the lake.", "seed": 2, "frames": 3},
    {"image": "red.png", "caption": "Gala jumped over the log.", "seed": 3, "frames": 5, "description": "A triangle."},
    {"image": "blue.png", "caption": "Pia sat under the tree.", "frames": 4, "id": "pia"},
    {"image": "red.png", "caption": "They all went home.", "seed": 5, "id": "home"},
]  # fmt: skip
IDS = ["rosa", "line-00002", "line-00003", "pia", "home"]


def write_seeds(folder: Path, lines: list, name: str = "seeds.jsonl") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), (200, 30, 30)).save(folder / "red.png")
    Image.new("RGB", (64, 64), (30, 30, 200)).save(folder / "blue.png")
    path = folder / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def fake_pipe(illustrator=None, captioner=None, frames=4) -> StoryPipeline:
    cfg = resolve_config(None, "tiny", (f"story.frames={frames}",))
    return StoryPipeline(cfg, captioner or FakeCaptioner(), illustrator or FakeIllustrator())


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes; story.json without its timings (wall times)."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.name == "story.json":
            story = json.loads(data)
            story["metadata"].pop("timings_s")
            data = json.dumps(story, sort_keys=True).encode()
        files[path.relative_to(folder).as_posix()] = data
    return files


# --------------------------------------------------------------------------------------------
# With the fakes: the loop, the folders, resuming, sharding
# --------------------------------------------------------------------------------------------


def test_each_line_gets_the_folder_tell_writes_and_frame_k_of_a_batch_is_one_call(tmp_path):
    seeds = write_seeds(tmp_path / "in", LINES)
    captioner, illustrator = FakeCaptioner(), FakeIllustrator()
    told = fake_pipe(illustrator, captioner).tell_many(seeds, tmp_path / "out", batch_size=3)
    assert [(o.seed.id, o.status, o.frames) for o in told.outcomes] == [
        ("rosa", "told", 4), ("line-00002", "told", 3), ("line-00003", "told", 5), ("pia", "told", 4),
        ("home", "told", 4),
    ]  # fmt: skip
    for line, story_id in zip(LINES, IDS, strict=True):
        alone = tmp_path / "alone" / story_id
        fake_pipe().tell(seeds.parent / line["image"], line["caption"], description=line.get("description"),
                         frames=line.get("frames"), seed=line.get("seed"), save_to=alone)  # fmt: skip
        assert tree(tmp_path / "out" / story_id) == tree(alone), story_id
    # Batches of 3 then 2: the seed descriptions (the one given is not asked for), then frame by frame; a
    # story that is done leaves the batch (line 2 has 3 frames, line 3 has 5).
    assert [size for task, size in captioner.batches if task == "description"][:1] == [2]
    assert illustrator.batches == [3, 3, 2, 1] + [2, 2, 2]


def test_a_rerun_is_bit_identical_and_a_finished_folder_is_skipped_untouched(tmp_path):
    seeds = write_seeds(tmp_path / "in", LINES)
    fake_pipe().tell_many(seeds, tmp_path / "first", batch_size=2)
    fake_pipe().tell_many(seeds, tmp_path / "second", batch_size=4)  # another batching: the same folders
    assert tree(tmp_path / "first") == tree(tmp_path / "second")
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "first").rglob("*")}
    illustrator = FakeIllustrator()
    again = fake_pipe(illustrator).tell_many(seeds, tmp_path / "first", batch_size=2)
    assert [o.status for o in again.outcomes] == ["complete"] * 5 and illustrator.calls == []
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "first").rglob("*")} == before


def test_an_interrupted_run_continues_each_story_from_its_last_frame(tmp_path):
    seeds = write_seeds(tmp_path / "in", LINES)
    fake_pipe().tell_many(seeds, tmp_path / "straight", batch_size=2)
    with pytest.raises(RuntimeError, match="simulated crash"):  # in the second batch, at its frame 3
        fake_pipe(FakeIllustrator(fail_at_call=9)).tell_many(seeds, tmp_path / "out", batch_size=2)
    partial = {i: len(load_story(tmp_path / "out" / i, complete_only=True).frames) for i in IDS[:4]}
    assert partial == {"rosa": 4, "line-00002": 3, "line-00003": 3, "pia": 3}
    assert not (tmp_path / "out" / "home").exists()

    resumed = fake_pipe().tell_many(seeds, tmp_path / "out", batch_size=2)
    assert [(o.status, o.resumed_at) for o in resumed.outcomes] == [
        ("complete", None), ("complete", None), ("resumed", 3), ("resumed", 3), ("told", None)
    ]  # fmt: skip
    assert tree(tmp_path / "out") == tree(tmp_path / "straight")


def test_shards_tell_every_story_exactly_once(tmp_path):
    seeds = write_seeds(tmp_path / "in", LINES)
    told = [
        fake_pipe().tell_many(seeds, tmp_path / "out", batch_size=2, shard=(index, 3)).outcomes
        for index in range(3)
    ]
    assert [[o.seed.id for o in outcomes] for outcomes in told] == [["rosa", "pia"], ["line-00002", "home"],
                                                                     ["line-00003"]]  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(IDS)
    fake_pipe().tell_many(seeds, tmp_path / "one", batch_size=2)
    assert tree(tmp_path / "out") == tree(tmp_path / "one")


# --------------------------------------------------------------------------------------------
# Bad input: named by line, before any model loads, nothing written
# --------------------------------------------------------------------------------------------

BAD_LINES = [
    ("{not json", "not valid JSON"),
    ('["image", "caption"]', "expected a JSON object, got list"),
    ({"image": "red.png"}, "missing 'caption'"),
    ({"image": "red.png", "caption": "x", "colour": "red"}, "unknown field(s) 'colour'"),
    ({"image": "nowhere.png", "caption": "x"}, "nowhere.png does not exist"),
    ({"image": "broken.png", "caption": "x"}, "does not decode as an image"),
    ({"image": "red.png", "caption": " \u200b "}, "the caption is empty"),
    ({"image": "red.png", "caption": "x", "frames": 1}, "frames must be in 2..20"),
    ({"image": "red.png", "caption": "x", "seed": -1}, "seed must be an integer"),
    ({"image": "red.png", "caption": "x", "id": "../up"}, "is not a plain name"),
    ({"image": "red.png", "caption": "x", "id": "rosa"}, "the id 'rosa' is also"),
]


@pytest.mark.parametrize(("bad", "message"), BAD_LINES)
def test_a_bad_line_is_named_before_any_model_loads_and_nothing_is_written(tmp_path, bad, message):
    seeds = write_seeds(tmp_path / "in", [LINES[0], bad, LINES[1]])
    (tmp_path / "in" / "broken.png").write_bytes(b"not a png")
    pipe = StoryPipeline(resolve_config(None, "tiny"))  # no models: loading one would fail here
    with pytest.raises(BadLines) as error:
        pipe.tell_many(seeds, tmp_path / "out")
    assert f"{seeds}:2: " in str(error.value) and message in str(error.value)
    assert len(error.value.bad) == 1 and pipe._captioners is None and pipe._generator is None
    assert not (tmp_path / "out").exists()


def test_a_folder_holding_another_story_or_other_files_is_a_bad_line(tmp_path):
    seeds = write_seeds(tmp_path / "in", LINES[:2])
    fake_pipe().tell_many(seeds, tmp_path / "out")
    other = write_seeds(
        tmp_path / "in", [{**LINES[0], "seed": 9}, {**LINES[1], "id": "notes"}], name="other.jsonl"
    )
    (tmp_path / "out" / "notes").mkdir()
    (tmp_path / "out" / "notes" / "notes.txt").write_text("mine")  # not storypipe's: never written beside
    with pytest.raises(BadLines) as error:
        fake_pipe().tell_many(other, tmp_path / "out")
    assert [str(line).split(": ", 1)[0] for line in error.value.bad] == [f"{other}:1", f"{other}:2"]
    assert "holds another story (seed caption 'Rosa waved hello.', seed 1" in str(error.value)
    assert "notes.txt" in str(error.value)


def test_skip_bad_tells_the_good_lines_and_names_the_bad_ones(tmp_path):
    seeds = write_seeds(tmp_path / "in", [LINES[0], "{oops", LINES[1], {"image": "red.png", "caption": ""}])
    notes = []
    from pipeline.orchestrator import StoryEvents

    told = fake_pipe().tell_many(
        seeds, tmp_path / "out", skip_bad=True, events=StoryEvents(on_note=notes.append)
    )
    assert [o.seed.id for o in told.outcomes] == ["rosa", "line-00003"]
    assert [line.where for line in told.bad] == [f"{seeds}:2", f"{seeds}:4"]
    assert notes == [f"skipping {line}" for line in told.bad]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["line-00003", "rosa"]


# --------------------------------------------------------------------------------------------
# The CLI with the tiny models: the same stories as `generate`, progress and summary lines
# --------------------------------------------------------------------------------------------


@pytest.fixture()
def models(tiny_llava, tiny_sd):
    return ["--preset", "tiny", "--set", f"captioner.base_model={tiny_llava}", "--set", f"generator.base_model={tiny_sd}",
            "--set", "captioner.max_new_tokens=8", "--steps", "3"]  # fmt: skip


def test_generate_many_tells_what_generate_tells_with_summary_lines(tmp_path, models):
    lines = [{**line, "frames": 3} for line in LINES[:3]]
    seeds = write_seeds(tmp_path / "in", lines)
    result = runner.invoke(app, ["generate-many", "--seeds", str(seeds), "--out", str(tmp_path / "out"),
                                 "--batch-size", "2", *models])  # fmt: skip
    assert result.exit_code == 0, result.output
    for story_id in IDS[:3]:
        assert f"{story_id}: 3 frames in {tmp_path / 'out' / story_id} (told; its batch took" in result.output
    assert f"3 stories in {tmp_path / 'out'}: 3 told, 0 resumed, 0 already complete" in result.output
    assert "stories: 3/3 (100%)" in result.output  # the overall progress (plain lines off a terminal)

    for line, story_id in zip(lines, IDS[:3], strict=True):
        single = tmp_path / "single" / story_id
        arguments = ["generate", "--image", str(seeds.parent / line["image"]), "--caption", line["caption"],
                     "--frames", "3", "--seed", str(line["seed"]), "--out", str(single), *models]  # fmt: skip
        if "description" in line:
            arguments += ["--description", line["description"]]
        assert runner.invoke(app, arguments).exit_code == 0
        many, alone = Story.load(tmp_path / "out" / story_id), Story.load(single)
        assert [(f.story_caption, f.description) for f in many.frames] == [
            (f.story_caption, f.description) for f in alone.frames
        ]
        for a, b in zip(many.frames, alone.frames, strict=True):
            difference = np.abs(np.asarray(a.image, dtype=int) - np.asarray(b.image, dtype=int))
            assert difference.mean() <= MEAN_LEVELS and difference.max() <= MAX_LEVELS

    again = runner.invoke(
        app, ["generate-many", "--seeds", str(seeds), "--out", str(tmp_path / "out"), *models]
    )
    assert again.exit_code == 0 and "rosa: already complete (3 frames), skipped" in again.output


def test_generate_many_exits_2_on_a_bad_line_and_writes_nothing(tmp_path):
    seeds = write_seeds(tmp_path / "in", [LINES[0], {"image": "red.png", "caption": "x", "frames": "five"}])
    result = runner.invoke(app, ["generate-many", "--seeds", str(seeds), "--out", str(tmp_path / "out"),
                                 "--preset", "tiny"])  # fmt: skip
    assert result.exit_code == 2
    assert (
        f"error: 1 line of the seeds file cannot be told, so nothing was written:\n  {seeds}:2: frames"
        in result.output
    )
    assert "--skip-bad" in result.output and not (tmp_path / "out").exists()
    shutil.rmtree(tmp_path / "in")
