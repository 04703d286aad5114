"""A story folder that can be trusted (issue 13): containment, one writer at a time, what --overwrite may
delete, crash-consistent edits and insertions, honest resume, and clear errors for hostile input.

The pipeline here has fake models (tests.fakes), so each case runs in well under a second; the CLI cases
stop before any model loads, except the few that tell a story with the tiny models.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from rich.console import Console

from pipeline.config import load_config
from pipeline.errors import ConfigError, DataError, InputError
from pipeline.folder_lock import LOCK_FILE, FolderInUse
from pipeline.io import load_rgb
from pipeline.progress import ProgressReporter
from pipeline.story import Story
from pipeline.story_folder import UPDATE_DIR, open_for_writing
from storypipe.api import StoryPipeline
from storypipe.cli import app
from storypipe.config import StorypipeConfig, preset_path
from tests.fakes import FakeCaptioner, FakeIllustrator

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


@pytest.fixture(scope="module")
def config():
    return load_config(StorypipeConfig, preset_path("tiny"))


@pytest.fixture()
def pipe(config):
    return StoryPipeline(config, FakeCaptioner(), FakeIllustrator())


@pytest.fixture()
def seed_png(tmp_path):
    path = tmp_path / "seed.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(path)
    return path


@pytest.fixture()
def story_dir(tmp_path, pipe, seed_png):
    """A told story of 4 frames, in ``tmp_path / "story"``."""
    folder = tmp_path / "story"
    pipe.tell(seed_png, "Rosa waved hello.", frames=4, seed=3, save_to=folder)
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (links as the text they hold), to compare a folder before and after."""
    files = {}
    for path in sorted(folder.rglob("*")):
        key = path.relative_to(folder).as_posix()
        if path.is_symlink():
            files[key] = b"-> " + os.readlink(path).encode()
        elif path.is_file():
            files[key] = path.read_bytes()
    return files


def captions(folder: Path) -> list[str]:
    return [frame["story_caption"] for frame in json.loads((folder / "story.json").read_text())["frames"]]


def edit_story_json(folder: Path, change) -> None:
    data = json.loads((folder / "story.json").read_text())
    change(data)
    (folder / "story.json").write_text(json.dumps(data))


def cli(*arguments: str):
    return runner.invoke(app, [str(a) for a in arguments])


def one_line(output: str) -> str:
    return " ".join(output.split())


# --------------------------------------------------------------------------------------------
# 1. Containment: nothing outside the story folder is read or written
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("operation", ["edit", "insert", "resume"])
def test_an_image_path_out_of_the_folder_is_refused_before_anything_is_written(
    tmp_path, pipe, story_dir, operation
):
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(outside / "victim.png")
    edit_story_json(story_dir, lambda d: d["frames"][1].update(image="../outside/victim.png"))
    if operation == "resume":
        edit_story_json(story_dir, lambda d: d["metadata"].update(frames_requested=6))
    before, outside_before = snapshot(story_dir), snapshot(outside)

    with pytest.raises(DataError, match="leads out of the story folder"):
        if operation == "edit":
            pipe.edit(story_dir, 2, "Then it rained.")
        elif operation == "insert":
            pipe.insert(story_dir, 2, "A clown appeared.")
        else:
            pipe.resume(story_dir)
    assert snapshot(story_dir) == before and snapshot(outside) == outside_before


def test_a_path_to_a_system_file_never_becomes_a_frame(pipe, story_dir):
    edit_story_json(story_dir, lambda d: d["frames"][3].update(image="../../../../../../../../etc/passwd"))
    with pytest.raises(DataError, match="leads out of the story folder"):
        pipe.insert(story_dir, 0, "A clown appeared.")
    assert sorted(p.name for p in (story_dir / "frames").iterdir()) == [f"frame_0{i}.png" for i in range(4)]
    assert all((story_dir / "frames" / f"frame_0{i}.png").stat().st_nlink == 1 for i in range(4))


@pytest.mark.parametrize("inside", [False, True], ids=["to-outside", "to-inside"])
@pytest.mark.parametrize("linked", ["frames", "history"])
def test_a_symlinked_frames_or_history_folder_is_refused_up_front(tmp_path, pipe, story_dir, linked, inside):
    pipe.edit(story_dir, 1, "Then it rained.")  # history/ exists
    target = story_dir / "elsewhere" if inside else tmp_path / "elsewhere"
    shutil.move(story_dir / linked, target)
    (story_dir / linked).symlink_to(target, target_is_directory=True)
    before, target_before = snapshot(story_dir), snapshot(target)

    for change in (lambda: pipe.insert(story_dir, 1, "A clown appeared."), lambda: pipe.edit(story_dir, 2, "x"),
                   lambda: pipe.resume(story_dir), lambda: Story.load(story_dir)):  # fmt: skip
        with pytest.raises(
            DataError, match=f"{linked} is a symbolic link; a story folder's {linked}/ must be a real"
        ):
            change()
    assert snapshot(story_dir) == before and snapshot(target) == target_before


def test_a_frame_linked_to_a_file_outside_is_refused(tmp_path, pipe, story_dir):
    Image.new("RGB", (16, 16), (1, 2, 3)).save(tmp_path / "private.png")
    (story_dir / "frames" / "frame_02.png").unlink()
    (story_dir / "frames" / "frame_02.png").symlink_to(tmp_path / "private.png")
    for change in (lambda: pipe.edit(story_dir, 2, "x"), lambda: Story.load(story_dir)):
        with pytest.raises(DataError, match="symbolic link to .*private.png, outside the story folder"):
            change()


def test_a_lock_file_planted_as_a_link_is_refused_and_not_followed(tmp_path, pipe, story_dir):
    (story_dir / LOCK_FILE).symlink_to(tmp_path / "created-by-the-link")
    with pytest.raises(DataError, match="symbolic link"):
        pipe.edit(story_dir, 1, "x")
    assert not (tmp_path / "created-by-the-link").exists()


def test_a_planted_update_journal_cannot_move_or_delete_anything_outside(tmp_path, pipe, story_dir):
    (tmp_path / "precious.txt").write_text("mine")
    (story_dir / UPDATE_DIR).mkdir()
    (story_dir / UPDATE_DIR / "journal.json").write_text(
        json.dumps({"moves": [], "removals": ["../precious.txt"]})
    )
    before = snapshot(story_dir)
    for change in (lambda: pipe.edit(story_dir, 1, "x"), lambda: Story.load(story_dir)):
        with pytest.raises(DataError, match="journal that storypipe cannot use"):
            change()
    assert (tmp_path / "precious.txt").read_text() == "mine" and snapshot(story_dir) == before


def test_a_planted_update_file_or_a_garbage_lock_file_does_not_stop_a_writer(pipe, story_dir):
    (story_dir / UPDATE_DIR).write_text("not a folder")
    (story_dir / LOCK_FILE).write_text("\x1b[31m[/bold] not a pid")
    pipe.edit(story_dir, 1, "Then it rained.")
    assert captions(story_dir)[1] == "Then it rained."
    assert not (story_dir / UPDATE_DIR).exists() and not (story_dir / LOCK_FILE).exists()


@pytest.mark.parametrize("contents", ["[" * 100_000, '{"version": 1, "frames": "x"}', "\udcff", "null"])
def test_a_hostile_story_json_is_one_clear_error(story_dir, contents):
    (story_dir / "story.json").write_text(contents, errors="surrogateescape")
    with pytest.raises(DataError, match="story.json is not a valid story.json"):
        Story.load(story_dir)
    result = cli("edit", "--story", story_dir, "--frame", "1", "--caption", "x")
    assert result.exit_code == 2 and "is not a valid story.json" in one_line(result.output)


def test_a_config_yaml_bomb_in_a_story_folder_is_refused(story_dir):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{name}: &{name} [{', '.join([f'*{previous}'] * 9)}]\n"
        for previous, name in zip("abcdefgh", "bcdefghi", strict=True)
    )
    (story_dir / "config.yaml").write_text(bomb)  # 9**9 values once expanded
    with pytest.raises(ConfigError, match="config.yaml holds more than .* values once its aliases"):
        Story.load(story_dir)


# --------------------------------------------------------------------------------------------
# 2. One writer at a time
# --------------------------------------------------------------------------------------------

HOLD_LOCK = textwrap.dedent(
    """
    import sys, time
    from pipeline.folder_lock import FolderLock
    FolderLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(60)
    """
)


@contextmanager
def lock_held_by_another_process(folder: Path):
    """A process that holds ``folder``'s lock until the block ends with ``kill -9``."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_a_second_writer_is_refused_at_once_and_a_killed_holder_blocks_nobody(pipe, story_dir, seed_png):
    before = snapshot(story_dir)
    with lock_held_by_another_process(story_dir) as holder:
        message = f"story {story_dir} is in use by process {holder.pid}"
        for change in (lambda: pipe.edit(story_dir, 1, "x"), lambda: pipe.insert(story_dir, 0, "x"),
                       lambda: pipe.resume(story_dir), lambda: Story.load(story_dir).save(story_dir),
                       lambda: pipe.tell(seed_png, "x", save_to=story_dir, overwrite=True)):  # fmt: skip
            with pytest.raises(FolderInUse, match=message):
                change()
        # The CLI says the same in one line, exit 2, before any model loads.
        for arguments in (["edit", "--story", story_dir, "--frame", "1", "--caption", "x"],
                          ["insert", "--story", story_dir, "--after", "1", "--caption", "x"],
                          ["generate", "--resume", story_dir],
                          ["generate", "--image", seed_png, "--caption", "x", "--out", story_dir, "--overwrite", "--preset", "tiny"]):  # fmt: skip
            result = cli(*arguments)
            assert result.exit_code == 2 and f"error: {message}" in one_line(result.output), result.output
        assert snapshot(story_dir) == {**before, LOCK_FILE: f"{holder.pid}\n".encode()}
    # kill -9 left the lock file behind; the kernel released the lock, so the next writer goes ahead at once.
    assert (story_dir / LOCK_FILE).exists()
    edited = pipe.edit(story_dir, 1, "Then it rained.")
    assert captions(story_dir)[1] == "Then it rained." == edited.frames[1].story_caption
    assert not (story_dir / LOCK_FILE).exists()  # a finished writer leaves no lock file


def test_a_new_folder_being_written_is_refused_to_a_second_teller(tmp_path, pipe, seed_png):
    folder = tmp_path / "new"
    folder.mkdir()
    with lock_held_by_another_process(folder):
        with pytest.raises(FolderInUse):
            pipe.tell(seed_png, "x", save_to=folder)
    assert sorted(p.name for p in folder.iterdir()) == [LOCK_FILE]


# --------------------------------------------------------------------------------------------
# 3. --overwrite replaces only a story, and only once the new one is complete
# --------------------------------------------------------------------------------------------


def test_overwrite_refuses_a_folder_that_is_not_a_story(tmp_path, pipe, seed_png, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    for out in (".", tmp_path, seed_png.parent):  # the current directory; the seed image's own folder
        with pytest.raises(InputError, match="is not empty and holds no story"):
            pipe.tell(seed_png, "x", save_to=out, overwrite=True)
        result = cli(
            "generate", "--image", seed_png, "--caption", "x", "--out", out, "--overwrite", "--preset", "tiny"
        )
        assert result.exit_code == 2 and "--overwrite replaces only a story that storypipe wrote" in one_line(
            result.output
        )
    assert snapshot(tmp_path) == before


def test_saving_a_story_never_puts_it_beside_other_files(tmp_path, pipe, seed_png):
    (tmp_path / "notes.txt").write_text("mine")
    story = pipe.tell(seed_png, "x", frames=2)
    with pytest.raises(InputError, match="is not empty and holds no story"):
        story.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "seed.png"]


def test_overwrite_refuses_a_story_holding_the_seed_or_the_current_directory(pipe, story_dir, monkeypatch):
    seed_inside = story_dir / "frames" / "frame_00.png"
    before = snapshot(story_dir)
    with pytest.raises(InputError, match="the seed image .* is inside .*which --overwrite would replace"):
        pipe.tell(seed_inside, "x", save_to=story_dir, overwrite=True)
    monkeypatch.chdir(story_dir / "frames")
    with pytest.raises(InputError, match="holds the current directory"):
        pipe.tell(Image.new("RGB", (64, 64)), "x", save_to=story_dir, overwrite=True)
    assert snapshot(story_dir) == before


def test_a_crash_during_overwrite_leaves_the_old_story_intact(config, story_dir, seed_png):
    before = snapshot(story_dir)
    crashing = StoryPipeline(config, FakeCaptioner(), FakeIllustrator(fail_at_call=2))
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.tell(seed_png, "A new story.", frames=5, save_to=story_dir, overwrite=True)
    assert snapshot(story_dir) == before


def test_overwrite_replaces_the_story_whole_and_keeps_what_is_not_storypipes(pipe, story_dir, seed_png):
    pipe.edit(story_dir, 1, "Then it rained.")
    (story_dir / "my-notes.txt").write_text("mine")
    new = pipe.tell(seed_png, "A new story.", frames=2, save_to=story_dir, overwrite=True)
    assert captions(story_dir) == [f.story_caption for f in new.frames] and len(new.frames) == 2
    assert sorted(p.name for p in (story_dir / "frames").iterdir()) == ["frame_00.png", "frame_01.png"]
    assert not (story_dir / "history").exists()  # the old story's history went with it
    assert (story_dir / "my-notes.txt").read_text() == "mine"
    assert Story.load(story_dir).frames[1].image.tobytes() == new.frames[1].image.tobytes()


# --------------------------------------------------------------------------------------------
# 5 and 10. Edits and insertions are crash-consistent; a failed one leaves no history
# --------------------------------------------------------------------------------------------


class SimulatedCrash(BaseException):
    """Raised at a chosen write, as a kill would stop the process there (a BaseException: no ``except
    Exception`` catches it)."""


# Every call that changes the file system in the story folder's code (pathlib and shutil use these too).
WRITE_CALLS = ((os, "replace"), (os, "rename"), (os, "unlink"), (os, "rmdir"), (os, "mkdir"), (os, "open"),
               (os, "ftruncate"), (os, "pwrite"), (shutil, "copyfile"))  # fmt: skip


@contextmanager
def crash_at(write_number: int | None, counter: list[int]):
    """Raise :class:`SimulatedCrash` at the ``write_number``-th write call (never, for None); ``counter``
    gets the number of write calls made."""
    originals = {(module, name): getattr(module, name) for module, name in WRITE_CALLS}

    def wrap(function):
        def counted(*args, **kwargs):
            counter[0] += 1
            if counter[0] == write_number:
                raise SimulatedCrash
            return function(*args, **kwargs)

        return counted

    for (module, name), function in originals.items():
        setattr(module, name, wrap(function))
    try:
        yield
    finally:
        for (module, name), function in originals.items():
            setattr(module, name, function)


def state_of(folder: Path) -> tuple:
    story = Story.load(folder)
    return ([(f.story_caption, f.description, f.source, f.image.tobytes()) for f in story.frames],
            sorted(p.name for p in (folder / "history").iterdir()) if (folder / "history").exists() else [])  # fmt: skip


CHANGES = {
    "edit": lambda pipe, folder: pipe.edit(folder, 2, "Then it rained.", strength=0.5),
    "edit-propagate": lambda pipe, folder: pipe.edit(folder, 1, "Then it rained.", propagate=True),
    "insert": lambda pipe, folder: pipe.insert(folder, 1, "A clown appeared."),
}


@pytest.mark.parametrize("change", CHANGES)
def test_a_crash_at_any_write_leaves_the_old_story_or_the_new_one_and_a_rerun_finishes(
    tmp_path, pipe, story_dir, change
):
    pipe.edit(story_dir, 3, "An earlier edit.")  # a history entry already there
    pristine = tmp_path / "pristine"
    shutil.copytree(story_dir, pristine)
    old = state_of(pristine)
    counter = [0]
    with crash_at(None, counter):
        CHANGES[change](pipe, story_dir)
    new, writes = state_of(story_dir), counter[0]
    assert new != old and len(new[1]) == len(old[1]) + 1 and writes > 10

    outcomes = set()
    for write_number in range(1, writes + 1):
        folder = tmp_path / f"crash-{write_number}"
        shutil.copytree(pristine, folder)
        with pytest.raises(SimulatedCrash), crash_at(write_number, [0]):
            CHANGES[change](pipe, folder)
        # Whatever a reader finds is the old story or the new one, with its own history and nothing more.
        after = state_of(folder)
        assert after in (old, new), f"crash at write {write_number} left a mixed story"
        outcomes.add("old" if after == old else "new")
        if after == old:  # rerunning the same command finishes the operation, as an uninterrupted run did
            CHANGES[change](pipe, folder)
            assert state_of(folder) == new
        with open_for_writing(folder):  # the next writer clears what the crash left
            pass
        assert not [
            p for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name in (UPDATE_DIR, LOCK_FILE)
        ]
        shutil.rmtree(folder)
    assert outcomes == {"old", "new"}  # crashes both before and after the commit point were tried


def test_a_failed_edit_leaves_no_history_entry(pipe, story_dir, monkeypatch):
    before = snapshot(story_dir)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("pipeline.story_folder.atomic_save_image", refuse)  # the new frame cannot be written
    with pytest.raises(PermissionError):
        pipe.edit(story_dir, 1, "Then it rained.")
    monkeypatch.undo()
    assert not (story_dir / "history").exists()
    with open_for_writing(story_dir):
        pass
    assert snapshot(story_dir) == before


def test_an_edit_into_a_read_only_frames_folder_is_refused_before_it_commits(pipe, story_dir, monkeypatch):
    before = snapshot(story_dir)
    writable = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: writable(path, mode) and Path(path).name != "frames")
    with pytest.raises(DataError, match=r"cannot write into .*frames: it is read-only"):
        pipe.edit(story_dir, 1, "Then it rained.")
    assert snapshot(story_dir) == before  # no history entry, no staging left behind


def test_an_update_interrupted_after_its_commit_is_finished_by_the_next_reader(tmp_path, pipe, story_dir):
    pristine = tmp_path / "pristine"
    shutil.copytree(story_dir, pristine)
    pipe.insert(story_dir, 0, "A clown appeared.")
    expected = state_of(story_dir)
    for write_number in range(1, 200):  # the first crash that leaves a committed journal behind
        folder = tmp_path / f"crash-{write_number}"
        shutil.copytree(pristine, folder)
        with pytest.raises(SimulatedCrash), crash_at(write_number, [0]):
            pipe.insert(folder, 0, "A clown appeared.")
        if (folder / UPDATE_DIR / "journal.json").is_file():
            break
    assert (
        json.loads((folder / "story.json").read_text())["frames"][1]["story_caption"] != "A clown appeared."
    )
    assert state_of(folder) == expected  # Story.load finished the update
    assert not (folder / UPDATE_DIR).exists()


# --------------------------------------------------------------------------------------------
# 6, 7, 8. Resume continues the story with its own settings; seeds; a first write that died
# --------------------------------------------------------------------------------------------


def test_resume_refuses_every_option_that_would_change_the_story(story_dir, seed_png):
    before = snapshot(story_dir)
    result = cli("generate", "--resume", story_dir, "--steps", "3", "--frames", "8", "--seed", "9",
                 "--image", seed_png, "--caption", "y", "--set", "story.frames=6")  # fmt: skip
    assert result.exit_code == 2, result.output
    line = one_line(result.output)
    for flag in ("--image", "--caption", "--frames", "--seed", "--set", "--steps"):
        assert flag in line.split("so ")[1], line
    assert "with its own config.yaml" in line and snapshot(story_dir) == before


def test_resume_through_the_api_refuses_other_settings(config, story_dir):
    other = load_config(StorypipeConfig, preset_path("tiny"), values={"generator.num_inference_steps": 3})
    edit_story_json(story_dir, lambda d: d["frames"].pop())
    with pytest.raises(InputError, match=r"generator.num_inference_steps is 3 here, 10 there\).*from_story"):
        StoryPipeline(other, FakeCaptioner(), FakeIllustrator()).resume(story_dir)
    assert len(captions(story_dir)) == 3
    StoryPipeline(config, FakeCaptioner(), FakeIllustrator()).resume(story_dir)  # its own settings: fine
    assert len(captions(story_dir)) == 4


@pytest.mark.parametrize("value", ["lots", 1, 21, True, 2.5])
def test_frames_requested_read_from_a_folder_is_validated_like_frames(pipe, story_dir, value):
    edit_story_json(story_dir, lambda d: d["metadata"].update(frames_requested=value))
    with pytest.raises(DataError, match=r"frames_requested must be an integer in 2\.\.20"):
        pipe.resume(story_dir)
    result = cli("generate", "--resume", story_dir)
    assert result.exit_code == 2 and "story.json is not a valid story.json" in one_line(result.output)


@pytest.mark.parametrize("seed", [99999999999999999999, -1, 2**63])
def test_a_seed_out_of_range_is_refused_before_any_model_loads(tmp_path, seed_png, seed, config):
    out = tmp_path / "story"
    result = cli("generate", "--image", seed_png, "--caption", "x", "--out", out, "--seed", seed, "--preset", "tiny",
                 "--set", f"captioner.base_model={tmp_path / 'no-model'}")  # fmt: skip
    assert result.exit_code == 2 and f"seed must be an integer in 0..{2**63 - 1}" in one_line(result.output)
    assert not out.exists()
    with pytest.raises(InputError, match="seed must be an integer"):
        StoryPipeline(config, FakeCaptioner(), FakeIllustrator()).tell(seed_png, "x", seed=seed)


def test_a_first_write_that_died_is_reported_and_can_be_told_again(tmp_path, pipe, seed_png):
    folder = tmp_path / "story"
    (folder / "frames").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(folder / "frames" / "frame_00.png")
    (folder / "config.yaml").write_text("story: {}\n")
    (folder / ".story.json.0123abcd.tmp").write_text('{"vers')  # the write that died
    with pytest.raises(DataError, match="holds no story: its first write never finished"):
        pipe.resume(folder)
    result = cli("generate", "--resume", folder)
    assert (
        result.exit_code == 2
        and f"tell the story again with `storypipe generate --out {folder}`" in one_line(result.output)
    )
    assert not (folder / ".story.json.0123abcd.tmp").exists()  # removed by the next run
    story = pipe.tell(seed_png, "Rosa waved hello.", frames=3, save_to=folder)  # no --overwrite needed
    assert captions(folder) == [f.story_caption for f in story.frames]


# --------------------------------------------------------------------------------------------
# 11-14. Clear errors, faithful input, normal permissions
# --------------------------------------------------------------------------------------------


def test_out_that_is_a_file_or_cannot_be_created_is_a_clear_error(tmp_path, pipe, seed_png):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(DataError, match="is a file, not a story folder"):
        pipe.tell(seed_png, "x", save_to=tmp_path / "a-file")
    with pytest.raises(DataError, match="cannot create the folder"):
        pipe.tell(seed_png, "x", save_to=tmp_path / "a-file" / "story")
    unwritable = Path("/proc/storypipe-cannot-write-here/story")
    result = cli("generate", "--image", seed_png, "--caption", "x", "--out", unwritable, "--preset", "tiny",
                 "--set", f"captioner.base_model={tmp_path / 'no-model'}")  # fmt: skip
    assert result.exit_code == 2 and f"cannot create the folder {unwritable}" in one_line(result.output)


def test_a_failure_before_the_first_write_leaves_no_folder(tmp_path, config, seed_png):
    class Broken(FakeIllustrator):
        def exceeds_prompt_limit(self, text):
            raise RuntimeError("the model failed to load")

    out = tmp_path / "a" / "b" / "story"
    with pytest.raises(RuntimeError):
        StoryPipeline(config, FakeCaptioner(), Broken()).tell(seed_png, "x", save_to=out)
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("caption", ["\u200b\u200f", " \u2060\ufeff ", "\u3164", "\u00a0\u202e"])
def test_a_caption_of_invisible_characters_is_refused_like_an_empty_one(pipe, seed_png, caption):
    with pytest.raises(InputError, match="the caption is empty .*only invisible characters"):
        pipe.tell(seed_png, caption)
    result = cli("generate", "--image", seed_png, "--caption", caption, "--preset", "tiny")
    assert result.exit_code == 2 and "the caption is empty" in result.output


@pytest.mark.parametrize("caption", ["Rosa\x1b[2J waved", "Rosa\x00", "Rosa \udcff"])
def test_a_caption_with_control_characters_is_refused(pipe, seed_png, caption):
    with pytest.raises(InputError, match="holds the control character U\\+"):
        pipe.tell(seed_png, caption)


def test_an_image_that_is_a_directory_says_so(tmp_path, pipe):
    with pytest.raises(InputError, match="is a directory, not an image file"):
        pipe.tell(tmp_path, "x")


def test_a_16_bit_seed_is_scaled_to_8_bits_not_saturated(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)  # (H, W)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I;16")
    pixels = np.asarray(load_rgb(tmp_path / "deep.png"))  # (H, W, 3)
    assert pixels[0, 0].tolist() == [0, 0, 0] and pixels[-1, -1].tolist() == [255, 255, 255]
    assert abs(pixels.mean() - 127.5) < 1.0  # today's convert("RGB") clips: a mean near 254


def test_files_get_normal_permissions_under_the_umask(tmp_path, pipe, seed_png):
    previous = os.umask(0o022)
    try:
        pipe.tell(seed_png, "x", frames=2, save_to=tmp_path / "story")
        pipe.edit(tmp_path / "story", 1, "y")
    finally:
        os.umask(previous)
    files = [p for p in (tmp_path / "story").rglob("*") if p.is_file()]
    assert {p.relative_to(tmp_path / "story").as_posix() for p in files} >= {"story.json", "config.yaml", "storyboard.html", "frames/frame_01.png", "history/001-edit-frame-01/story.json"}  # fmt: skip
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {"0o644"}
    folders = [p for p in (tmp_path / "story").rglob("*") if p.is_dir()]
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in folders} == {"0o755"}


def test_user_text_with_rich_markup_is_printed_as_written(tmp_path, tiny_llava, tiny_sd):
    seed = tmp_path / "in[" / "x]" / "seed[b].png"
    seed.parent.mkdir(parents=True)
    Image.new("RGB", (64, 64), (200, 30, 30)).save(seed)
    out = tmp_path / "out" / "m[/x]"
    result = cli("generate", "--image", seed, "--caption", "Rosa [/bold] waved [red]hi", "--frames", "2", "--out", out,
                 "--preset", "tiny", "--set", f"captioner.base_model={tiny_llava}", "--set", f"generator.base_model={tiny_sd}",
                 "--set", "captioner.max_new_tokens=4", "--steps", "2")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"Open {out / 'storyboard.html'}" in one_line(result.output)
    assert captions(out)[0] == "Rosa [/bold] waved [red]hi"
    # An error that quotes user text shows it as written too.
    result = cli("edit", "--story", out, "--frame", "9", "--caption", "[/bold]")
    assert result.exit_code == 2 and "frame 9 is out of range" in result.output
    result = cli("edit", "--story", out / "[/bold]", "--frame", "1", "--caption", "x")
    assert result.exit_code == 2 and f"{out / '[/bold]'}" in one_line(result.output)


def test_progress_lines_show_markup_as_written_on_a_terminal():
    screen = io.StringIO()
    with ProgressReporter(Console(file=screen, force_terminal=True, width=200)) as progress:
        task = progress.task("frames [/x]", total=2)
        task.update(1, label="frame 1: [/bold] caption", status="[red]loss")
        task.update(2)
    assert "frame 1: [/bold] caption" in screen.getvalue() and "[red]loss" in screen.getvalue()
