"""The scaffolding every training loop shares: :class:`TrainingRun`, the data order and the JSONL log.

Each training script still reads top to bottom; it calls the scaffold where it needs devices, progress,
the log, checkpoints and resume::

    with TrainingRun(out_dir, "train-clip", checkpoint_every=100, keep_checkpoints=2, resume=resume) as training:
        model = build()                                   # on training.device
        optimizer, scheduler = ...
        model, optimizer = training.prepare(model, optimizer)
        training.accelerator.register_for_checkpointing(scheduler)
        start = training.start(total_steps)               # 0, or the newest checkpoint's step, restored
        for step in range(start, total_steps):
            ...                                           # batch global_batch_indices(step, ...)
            training.log({"step": step + 1, "loss": loss.item()})
            training.maybe_checkpoint(step + 1)
        save(model)
        training.finish()                                 # the finished model supersedes the checkpoints

A checkpoint is a folder ``checkpoints/step_XXXXXXXX/`` written by accelerate's ``save_state``: the
optimizers, the schedulers registered with ``register_for_checkpointing`` (not prepared: a prepared
scheduler steps once per process), and every process's RNG state. Beside them: each prepared model's
tensors (``model_{i}.pt``), the log so far (``train_log.jsonl``) and ``state.json`` (the step and the
run's label). A model whose every parameter trains is kept whole (buffers too: BatchNorm statistics); a
model with frozen parameters (a LoRA over a 7B base, context layers over Stable Diffusion) keeps only
the parameters that were trainable when it was prepared, through accelerate's save/load pre-hooks as
diffusers' LoRA training scripts do.

Checkpoints are complete or absent. accelerate's automatic naming (``ProjectConfiguration(
automatic_checkpoint_naming=True, total_limit=N)``) is not: it deletes the oldest checkpoint *before*
writing the new one, in place, and ``load_state()`` then picks the highest-numbered folder whether or not
its write finished. So ``save_state`` writes into a staging folder that is renamed into place once
whole, resume only considers renamed folders, and pruning to ``keep_checkpoints`` happens after.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from accelerate import Accelerator

from pipeline.errors import StorypipeError
from pipeline.progress import ProgressReporter, ProgressTask
from pipeline.seeds import derive_seed

CHECKPOINTS_DIR = "checkpoints"
LOG_FILE = "train_log.jsonl"
STATE_FILE = "state.json"  # in a checkpoint: its step and the label of the run that wrote it
STAGING_PREFIX = ".staging-"  # a checkpoint being written; never resumed from


class TrainingRun:
    """One training run's devices, progress, log, checkpoints, resume and RNG; the loop stays the caller's.

    ``out_dir`` is the run's folder (its checkpoints go to ``out_dir/checkpoints``). Creating the run
    checks the folder at once, before any model loads: without ``resume`` a folder that holds a
    checkpoint is refused; with it, a folder that holds none. ``mixed_precision`` applies on CUDA only,
    ``cpu_threads`` (torch intra-op threads, None: torch's setting) on the CPU only, for the ``with``
    block. ``seed`` seeds torch's global RNG (initial weights, dropout). ``log_file=False`` keeps the
    log in memory (:attr:`records`) and in checkpoints only, for runs that write their folder at the end.
    """

    def __init__(
        self,
        out_dir: str | Path,
        label: str,
        *,
        checkpoint_every: int,
        keep_checkpoints: int,
        resume: bool = False,
        mixed_precision: str = "no",
        cpu_threads: int | None = None,
        seed: int | None = None,
        log_file: bool = True,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.checkpoints = self.out_dir / CHECKPOINTS_DIR
        self.label = label
        self.checkpoint_every, self.keep_checkpoints = checkpoint_every, keep_checkpoints
        self.log_file = self.out_dir / LOG_FILE if log_file else None
        self.records: list[dict[str, Any]] = []  # the log, restored with a checkpoint
        self.total_steps: int | None = None  # set by start()
        newest = complete_checkpoints(self.checkpoints)
        if newest and not resume:
            raise StorypipeError(
                f"{self.out_dir} already holds a run; pass --resume to continue it or choose another --out"
            )
        if resume and not newest:
            raise StorypipeError(
                f"--resume: no checkpoint in {self.checkpoints}; start the run without --resume"
            )
        self._resume_from = newest[-1] if newest else None

        on_cuda = torch.cuda.is_available()
        self.accelerator = Accelerator(mixed_precision=mixed_precision if on_cuda else "no", cpu=not on_cuda)
        self.accelerator.register_save_state_pre_hook(self._save_models)
        self.accelerator.register_load_state_pre_hook(self._load_models)
        self._cpu_threads = None if on_cuda else cpu_threads
        self._trainable: list[set[str] | None] = []  # per prepared model: the names a checkpoint keeps
        self.progress = ProgressReporter(enabled=self.accelerator.is_main_process)
        self._task: ProgressTask | None = None
        self._exit_stack = contextlib.ExitStack()
        if seed is not None:
            torch.manual_seed(seed)

    def __enter__(self) -> TrainingRun:
        self._exit_stack.enter_context(cpu_threads(self._cpu_threads))
        self._exit_stack.enter_context(self.progress)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._exit_stack.close()

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    def prepare(self, *objects: Any) -> Any:
        """``accelerator.prepare`` the models and optimizers; each model's trainable parameters are noted now.

        Every model must be prepared here (not with the accelerator directly): a checkpoint keeps of each
        exactly the parameters that trained, even when some are frozen later (a VAE after its phase).
        """
        for obj in objects:
            if isinstance(obj, torch.nn.Module):
                names = [name for name, _ in obj.named_parameters()]
                trainable = {name for name, p in obj.named_parameters() if p.requires_grad}
                self._trainable.append(None if len(trainable) == len(names) else trainable)
        return self.accelerator.prepare(*objects)

    def start(self, total_steps: int) -> int:
        """The step to start from: 0, or when resuming the newest checkpoint's, with every state restored."""
        self.total_steps = total_steps
        step = 0
        if self._resume_from is not None:
            saved = json.loads((self._resume_from / STATE_FILE).read_text())
            if saved.get("run") != self.label:  # another command's run, or an older storypipe's layout
                written_by = repr(saved["run"]) if "run" in saved else "an earlier version of storypipe"
                raise StorypipeError(
                    f"--resume: {self._resume_from} was written by {written_by}, not by {self.label!r}"
                )
            self.accelerator.load_state(str(self._resume_from))
            self.records = read_log(self._resume_from / LOG_FILE)
            step = saved["step"]
        if self.is_main_process:
            if self._resume_from is None:  # then no checkpoint here is whole (else __init__ refused)
                shutil.rmtree(self.checkpoints, ignore_errors=True)
            for stale in self.checkpoints.glob(f"{STAGING_PREFIX}*"):
                shutil.rmtree(stale)  # a checkpoint whose write was interrupted
            if self.log_file is not None:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                write_log(self.log_file, self.records)  # the log up to the step this run starts from
        self._task = self.progress.task(self.label, total=total_steps, completed=step)
        return step

    def log(self, record: dict[str, Any], status: str | None = None) -> None:
        """Record a step (``record["step"]`` counts from 1), in the log and the progress display."""
        self.records.append(record)
        if self.log_file is not None and self.is_main_process:
            append_log(self.log_file, record)
        if self._task is not None:
            if status is None and "loss" in record:
                status = f"loss {record['loss']:.4f}"
            self._task.update(record["step"], status=status)

    def maybe_checkpoint(self, step: int) -> bool:
        """Checkpoint after ``step`` steps if it is a multiple of ``checkpoint_every`` and not the last step."""
        if self.total_steps is None:
            raise RuntimeError("TrainingRun.start() comes before the first checkpoint")
        if step % self.checkpoint_every or step >= self.total_steps:
            return False
        self.save_checkpoint(step)
        return True

    def save_checkpoint(self, step: int) -> Path:
        """Every process: write the state after ``step`` steps into a staging folder, rename it, prune."""
        target = self.checkpoints / f"step_{step:08d}"
        staging = self.checkpoints / f"{STAGING_PREFIX}{target.name}"
        self.accelerator.wait_for_everyone()
        if self.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        # The models (through _save_models), optimizers, registered schedulers, every process's RNG.
        self.accelerator.save_state(str(staging))
        if self.is_main_process:
            write_log(staging / LOG_FILE, self.records)
            (staging / STATE_FILE).write_text(json.dumps({"step": step, "run": self.label}))
        self.accelerator.wait_for_everyone()
        if self.is_main_process:
            shutil.rmtree(target, ignore_errors=True)  # only there if an earlier run of this step was kept
            os.replace(staging, target)
            for old in complete_checkpoints(self.checkpoints)[: -self.keep_checkpoints]:
                shutil.rmtree(old)
        self.accelerator.wait_for_everyone()
        return target

    def finish(self) -> None:
        """After the trained model is saved: the checkpoints are superseded, so they go."""
        self.accelerator.wait_for_everyone()
        if self.is_main_process:
            shutil.rmtree(self.checkpoints, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    # accelerate's save_state/load_state pre-hooks: the models' tensors are written and read here.

    def _checked_models(self, models: list) -> list[torch.nn.Module]:
        if len(models) != len(self._trainable):
            raise RuntimeError("prepare every model with TrainingRun.prepare, not with the accelerator")
        return [self.accelerator.unwrap_model(model) for model in models]

    def _save_models(self, models: list, weights: list, output_dir: str) -> None:
        for index, model in enumerate(self._checked_models(models)):
            trainable = self._trainable[index]
            if trainable is None:
                state = model.state_dict()
            else:
                state = {name: p.detach() for name, p in model.named_parameters() if name in trainable}
            if self.is_main_process:
                torch.save(state, Path(output_dir) / f"model_{index}.pt")
        weights.clear()  # saved above: accelerate must not write the whole models (a frozen 7B base) again

    def _load_models(self, models: list, input_dir: str) -> None:
        for index, model in enumerate(self._checked_models(models)):
            saved = torch.load(Path(input_dir) / f"model_{index}.pt", map_location="cpu", weights_only=True)
            trainable = self._trainable[index]
            if trainable is None:
                model.load_state_dict(saved)
                continue
            if set(saved) != trainable:
                raise StorypipeError(
                    f"{input_dir} holds {len(saved)} trainable tensors for model {index}, this run trains "
                    f"{len(trainable)}: resume with the settings that started the run"
                )
            with torch.no_grad():
                for name, parameter in model.named_parameters():
                    if name in saved:
                        parameter.copy_(saved[name])
        models.clear()  # loaded above


def complete_checkpoints(folder: Path) -> list[Path]:
    """The checkpoints in ``folder`` whose write finished, oldest first (staging folders never count)."""
    return sorted(path for path in folder.glob("step_*") if (path / STATE_FILE).is_file())


def global_batch_indices(step: int, num_samples: int, global_batch: int, seed: int) -> list[int]:
    """Sample indices of optimizer step ``step``: a seeded permutation per epoch, wrapped to fill the last batch.

    Depends only on its arguments, so a resumed run sees exactly the batches it would have seen.
    """
    steps_per_epoch = math.ceil(num_samples / global_batch)
    epoch, position = divmod(step, steps_per_epoch)
    generator = torch.Generator().manual_seed(derive_seed(seed, "data order", epoch))
    order = torch.randperm(num_samples, generator=generator).tolist()
    wrapped = order * math.ceil((position + 1) * global_batch / num_samples)
    return wrapped[position * global_batch : (position + 1) * global_batch]


def seeded_generator(seed: int, purpose: str, *parts: int) -> torch.Generator:
    """A CPU generator seeded by ``derive_seed(seed, purpose, *parts)``: one step's noise, say, from its step."""
    return torch.Generator().manual_seed(derive_seed(seed, purpose, *parts))


def append_log(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def write_log(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")


def read_log(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


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
