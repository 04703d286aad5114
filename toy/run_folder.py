"""The output folder of the tiny CLIP and text-only LM trainers: refused when foreign, written whole at the end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import save_resolved_config
from pipeline.errors import StorypipeError
from pipeline.io import atomic_write_folder, atomic_write_json
from pipeline.training import CHECKPOINTS_DIR, LOG_FILE, write_log


def refuse_foreign_folder(out_dir: Path, metrics_file: str, command: str) -> None:
    """Refuse a non-empty ``out_dir`` that is neither a finished run (it has ``metrics_file``) nor an
    interrupted one (it has checkpoints): it is someone else's folder, and the final write replaces it."""
    ours = (out_dir / metrics_file).is_file() or (out_dir / CHECKPOINTS_DIR).is_dir()
    if out_dir.is_dir() and any(out_dir.iterdir()) and not ours:
        raise StorypipeError(
            f"{out_dir} is not empty and holds no earlier {command} run; choose another output folder"
        )


def write_model_folder(
    out_dir: Path,
    model: Any,
    preprocessor: Any,
    config: Any,
    log: list[dict],
    metrics_file: str,
    metrics: dict[str, Any],
) -> None:
    """The model and its tokenizer or processor, ``config.yaml``, the log and the metrics, all at once:
    ``out_dir`` is replaced whole (its checkpoints too), so a crash leaves the previous folder as it was."""

    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        preprocessor.save_pretrained(staging)
        save_resolved_config(config, staging)
        write_log(staging / LOG_FILE, log)
        atomic_write_json(staging / metrics_file, metrics)

    atomic_write_folder(out_dir, write)
