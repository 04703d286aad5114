"""Progress for long work: bars on a terminal, periodic plain lines everywhere else (logs, CI, nohup).

Training scripts, the evaluation and the story loop all report through :class:`ProgressReporter`::

    with ProgressReporter() as progress:
        steps = progress.task("finetune-llava story", total=1200)
        for step in ...:
            steps.update(step + 1, status=f"loss {loss:.3f}")

On a terminal it is a rich progress display (one bar per task). When stdout is not a terminal, a bar
would print nothing useful, so each task prints a line at its first update, then at most one line every
``interval_s`` seconds, and one when it completes.
"""

from __future__ import annotations

import time
from types import TracebackType

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

LINE_INTERVAL_S = 10.0  # the most often a non-terminal task prints a line


class ProgressTask:
    """One line of progress: ``update(completed, total=None, status="")`` as the work advances."""

    def __init__(self, reporter: ProgressReporter, label: str, total: int | None, task_id: TaskID | None):
        self._reporter, self.label, self.total, self._task_id = reporter, label, total, task_id
        self.completed = 0
        self.status = ""
        self._started = time.monotonic()
        self._last_line = -float("inf")
        self._said_finished = False

    def update(
        self, completed: int, total: int | None = None, status: str | None = None, label: str | None = None
    ) -> None:
        self.completed = completed
        if total is not None:
            self.total = total
        if status is not None:
            self.status = status
        if label is not None:
            self.label = label
        self._reporter._show(self)

    @property
    def finished(self) -> bool:
        return self.total is not None and self.completed >= self.total

    def advance(self, amount: int = 1) -> None:
        self.update(self.completed + amount)

    def line(self) -> str:
        """``label: 3/10 (30%), 12s elapsed, ~28s left, status``: the plain-text form of the task."""
        elapsed = time.monotonic() - self._started
        parts = [f"{self.completed}/{self.total}" if self.total else str(self.completed)]
        if self.total:
            parts[0] += f" ({100 * self.completed / self.total:.0f}%)"
        parts.append(f"{elapsed:.0f}s elapsed")
        if self.total and 0 < self.completed < self.total:
            parts.append(f"~{elapsed / self.completed * (self.total - self.completed):.0f}s left")
        if self.status:
            parts.append(self.status)
        return f"{self.label}: " + ", ".join(parts)


class ProgressReporter:
    """A context manager that shows :class:`ProgressTask` s; ``enabled=False`` shows nothing (other processes)."""

    def __init__(
        self,
        console: Console | None = None,
        enabled: bool = True,
        interval_s: float = LINE_INTERVAL_S,
    ) -> None:
        self.console = console or Console(soft_wrap=True)
        self.enabled = enabled
        self.interval_s = interval_s
        self._bars: Progress | None = None
        if enabled and self.console.is_terminal:
            self._bars = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TimeRemainingColumn(), TextColumn("{task.fields[status]}"), console=self.console,
            )  # fmt: skip

    def __enter__(self) -> ProgressReporter:
        if self._bars is not None:
            self._bars.__enter__()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self._bars is not None:
            self._bars.__exit__(kind, error, trace)

    def task(self, label: str, total: int | None = None, completed: int = 0) -> ProgressTask:
        task_id = None
        if self._bars is not None:
            task_id = self._bars.add_task(escape(label), total=total, completed=completed, status="")
        task = ProgressTask(self, label, total, task_id)
        task.completed = completed
        return task

    def _show(self, task: ProgressTask) -> None:
        if not self.enabled:
            return
        if self._bars is not None:
            self._bars.update(
                task._task_id, completed=task.completed, total=task.total, status=escape(task.status),
                description=escape(task.label),
            )  # fmt: skip
            return
        now = time.monotonic()
        if task._said_finished and task.finished:
            return
        task._said_finished = False  # a task can start a new round (the denoising steps of the next frame)
        if task.finished or now - task._last_line >= self.interval_s:
            task._last_line, task._said_finished = now, task.finished
            self.console.print(task.line(), highlight=False, markup=False)
