"""Pieces every training script shares: data order, the JSONL log, and atomic, resumable checkpoints.

A checkpoint is a folder ``checkpoints/step_XXXXXXXX/`` holding whatever the script saves (trainable
weights, optimizer, scheduler) plus ``state.json`` (the step) and ``rng_{process}.pt`` per process.
It is written into a staging folder and renamed into place, so it is either complete or absent.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from pipeline.errors import StorypipeError

CHECKPOINTS_DIR = "checkpoints"
LOG_FILE = "train_log.jsonl"


def global_batch_indices(step: int, num_samples: int, global_batch: int, seed: int) -> list[int]:
    """Sample indices of optimizer step ``step``: a seeded permutation per epoch, wrapped to fill the last batch.

    Depends only on its arguments, so a resumed run sees exactly the batches it would have seen.
    """
    steps_per_epoch = math.ceil(num_samples / global_batch)
    epoch, position = divmod(step, steps_per_epoch)
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    wrapped = order * math.ceil((position + 1) * global_batch / num_samples)
    return wrapped[position * global_batch : (position + 1) * global_batch]


def append_log(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def read_log(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def truncate_log(path: Path, after_step: int) -> None:
    """Drop log lines of steps that a resumed run will redo."""
    if path.is_file():
        kept = [record for record in read_log(path) if record["step"] <= after_step]
        path.write_text("".join(json.dumps(record) + "\n" for record in kept), encoding="utf-8")


def write_checkpoint(folder: Path, step: int, write: Callable[[Path], None], keep: int) -> Path:
    """Main process: ``write(staging_dir)`` the trainable state, record the step, rename into place, prune."""
    target = folder / f"step_{step:08d}"
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=".staging-"))
    try:
        write(staging)
        (staging / "state.json").write_text(json.dumps({"step": step}))
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for old in sorted(folder.glob("step_*"))[:-keep]:
        shutil.rmtree(old)
    return target


def save_rng(checkpoint: Path, process_index: int) -> None:
    """Each process keeps its own RNG state (dropout masks and noise differ per process)."""
    state = {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    torch.save(state, checkpoint / f"rng_{process_index}.pt")


def latest_checkpoint(folder: Path) -> tuple[Path, int]:
    """The newest checkpoint folder and its step; a clear error when there is none."""
    candidates = sorted(folder.glob("step_*"))
    if not candidates:
        raise StorypipeError(f"--resume: no checkpoint in {folder}; start the run without --resume")
    latest = candidates[-1]
    return latest, json.loads((latest / "state.json").read_text())["step"]


def restore_rng(checkpoint: Path, process_index: int) -> None:
    rng_file = checkpoint / f"rng_{process_index}.pt"
    if rng_file.is_file():
        state = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(state["cpu"])
        if state["cuda"]:
            torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def cpu_threads(count: int | None) -> Iterator[None]:
    """Run the block with ``count`` torch intra-op CPU threads (None: leave torch's setting), then restore it.

    Tiny models train fastest on one thread: their matrices are too small for the split to pay off,
    and on a machine whose other cores are busy, extra threads wait on each other for far longer.
    """
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def warmup_cosine_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 over ``warmup_steps``, then cosine decay to 0 at ``total_steps``.

    The same multipliers as transformers' ``get_cosine_schedule_with_warmup``, whose import pulls in the
    trainer utilities (peft, bitsandbytes): seconds of start-up for a run that trains in a minute.
    """
    warmup_steps = min(warmup_steps, total_steps)

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
