"""Kill a training run right after a chosen step, as a crash would: that step's log record is kept."""

from __future__ import annotations

import pytest

from pipeline.training import TrainingRun


def crash_after_step(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Every :class:`TrainingRun` raises ``KeyboardInterrupt`` once it has logged ``step``; undo with
    ``monkeypatch.undo()``."""
    real_log = TrainingRun.log

    def log(self, record, status=None):
        real_log(self, record, status)
        if record["step"] == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(TrainingRun, "log", log)
