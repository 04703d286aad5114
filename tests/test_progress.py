"""Progress without a terminal: plain lines, at most one per interval, and one when a task completes."""

from __future__ import annotations

import io

import pytest
from click.testing import CliRunner
from rich.console import Console

from pipeline import progress as progress_module
from pipeline.progress import ProgressReporter
from storypipe.cli import app


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress_module.time, "monotonic", clock)
    return clock


def test_lines_at_most_once_per_interval_and_once_at_the_end(clock):
    out = io.StringIO()
    with ProgressReporter(Console(file=out), interval_s=10) as reporter:
        assert reporter._bars is None  # not a terminal: no live bars
        task = reporter.task("train", total=100)
        for step in range(1, 101):
            clock.now = step * 0.5  # 50 s in all
            task.update(step, status=f"loss {1 / step:.2f}")
        task.update(100)  # updates after the end print nothing more
    lines = out.getvalue().splitlines()
    assert [line.split(":")[1].split(",")[0].strip() for line in lines] == [
        "1/100 (1%)", "21/100 (21%)", "41/100 (41%)", "61/100 (61%)", "81/100 (81%)", "100/100 (100%)",
    ]  # fmt: skip
    assert lines[1] == "train: 21/100 (21%), 10s elapsed, ~40s left, loss 0.05"


def test_a_task_that_starts_a_new_round_reports_its_end_again(clock):
    out = io.StringIO()
    with ProgressReporter(Console(file=out), interval_s=1000) as reporter:
        steps = reporter.task("denoising", total=3)
        for _ in range(2):  # two frames of three steps
            for step in (1, 2, 3):
                steps.update(step)
    assert out.getvalue().splitlines() == [
        "denoising: 1/3 (33%), 0s elapsed, ~0s left",
        "denoising: 3/3 (100%), 0s elapsed",
        "denoising: 3/3 (100%), 0s elapsed",
    ]


def test_a_disabled_reporter_prints_nothing(clock):
    out = io.StringIO()
    with ProgressReporter(Console(file=out), enabled=False) as reporter:
        reporter.task("train", total=2).update(2)
    assert out.getvalue() == ""


def test_a_cli_command_prints_progress_lines_without_a_terminal(tmp_path):
    result = CliRunner().invoke(
        app, ["toy-data", "--out", str(tmp_path / "toy"), "--stories", "12", "--preset", "tiny"]
    )
    assert result.exit_code == 0, result.output
    assert "ShapeStories: 12/12 (100%)" in result.output
