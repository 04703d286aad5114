"""LoRA-finetune LLaVA for one captioner task: ``train(run)``, top to bottom.

With ``run.full_parameters`` the same loop instead pretrains every parameter of a tiny base built
from ``captioner.tiny`` (the toy models, `storypipe pretrain-llava`), with ``captioner.pretrain``'s
settings, and saves a whole model folder instead of an adapter.

Runs unchanged on one CPU, one GPU, or several GPUs under ``accelerate launch``:

* each optimizer step takes a global batch of ``batch_size x gradient_accumulation_steps x processes``
  samples from a seeded per-epoch permutation, and each process takes its slice of it;
* on CUDA the base is 4-bit nf4 with bf16 compute (QLoRA); elsewhere it trains in fp32;
* a checkpoint (adapter, or every weight when pretraining; optimizer, scheduler, RNG, log) is written
  every ``checkpoint_every`` steps, complete or not at all (``pipeline.training.TrainingRun``), and
  ``resume=True`` continues from the newest with the same data order.

The output folder is a plain PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``)
plus ``config.yaml`` and ``train_log.jsonl`` (loss per step, eval loss on a held-out slice).
"""

from __future__ import annotations

import contextlib
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from peft import (
    LoraConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    prepare_model_for_kbit_training,
)
from safetensors.torch import load_file
from transformers import get_linear_schedule_with_warmup

from llava_ft.config import PRETRAIN_TASK, TASKS, CaptionerConfig, LoraSettings
from llava_ft.data import ConversationSample, collate, encode_sample, read_conversations
from llava_ft.model import build_tiny_llava, load_llava, resolve_base_model
from pipeline.config import save_resolved_config
from pipeline.errors import StorypipeError
from pipeline.training import TrainingRun, global_batch_indices

ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class FinetuneRun:
    """One finetuning job: which task, which data, where to write, and the config to record."""

    captioner: CaptionerConfig
    task: str
    data_file: Path
    images_dir: Path
    out_dir: Path
    resume: bool = False
    resolved_config: Any = None  # the whole resolved storypipe config, written into the run
    full_parameters: bool = False  # pretrain a tiny base from scratch instead of adding a LoRA

    def __post_init__(self) -> None:
        tasks = TASKS + (PRETRAIN_TASK,)
        if self.task not in tasks:
            raise StorypipeError(f"--task must be one of {', '.join(tasks)}, got {self.task!r}")
        self.data_file, self.images_dir, self.out_dir = (
            Path(self.data_file),
            Path(self.images_dir),
            Path(self.out_dir),
        )


def train(run: FinetuneRun) -> Path:
    cfg = run.captioner
    if run.full_parameters and (cfg.pretrain is None or cfg.tiny is None):
        raise StorypipeError(
            "pretraining needs captioner.pretrain and captioner.tiny (the architecture to build); "
            "use --preset toy, or LoRA-finetune a pretrained base with finetune-llava instead"
        )
    tcfg = cfg.pretrain if run.full_parameters else cfg.train
    label = f"{'pretrain' if run.full_parameters else 'finetune'}-llava {run.task}"

    # 1. Devices and precision: QLoRA (4-bit base, bf16 compute) needs CUDA; the CPU trains in fp32.
    #    The seed fixes LoRA's initial A matrices and the dropout masks' stream.
    with TrainingRun(
        run.out_dir, label, checkpoint_every=tcfg.checkpoint_every, keep_checkpoints=tcfg.keep_checkpoints,
        resume=run.resume, mixed_precision=tcfg.mixed_precision, seed=tcfg.seed,
    ) as training:  # fmt: skip
        accelerator = training.accelerator
        quantize = cfg.load_in_4bit and training.device.type == "cuda" and not run.full_parameters

        # 2. Data: check every sample up front, then hold out a slice for the eval loss.
        samples = read_conversations(run.data_file, run.images_dir)
        train_samples, eval_samples = split_held_out(samples, tcfg.eval_fraction, tcfg.max_eval_samples)
        global_batch = tcfg.batch_size * tcfg.gradient_accumulation_steps * accelerator.num_processes
        steps_per_epoch = math.ceil(len(train_samples) / global_batch)
        total_steps = tcfg.max_steps or tcfg.epochs * steps_per_epoch

        # 3. Model: the base, optionally 4-bit, with LoRA on the language model's linear layers only;
        #    or, pretraining, a freshly built tiny base whose every parameter trains.
        if run.full_parameters:
            with tempfile.TemporaryDirectory() as scratch:
                build_tiny_llava(Path(scratch) / "init", cfg.tiny)
                model, processor = load_llava(Path(scratch) / "init", device=training.device)
            model.requires_grad_(True)
        else:
            model, processor = load_llava(
                resolve_base_model(cfg),
                load_in_4bit=quantize,
                dtype=torch.bfloat16 if quantize else torch.float32,
                device=training.device,
            )
        if quantize:
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=cfg.gradient_checkpointing
            )
        elif cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
        if not run.full_parameters:
            model = add_lora(model, cfg.lora)
        pad_token_id = processor.tokenizer.pad_token_id

        # 4. Optimizer and schedule (stepped once per optimizer step, on every process alike: registered
        #    for checkpoints, not prepared). A LoRA run's checkpoints keep the adapter only.
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=tcfg.learning_rate, weight_decay=tcfg.weight_decay)
        scheduler = get_linear_schedule_with_warmup(
            optimizer, min(tcfg.warmup_steps, total_steps), total_steps
        )
        model, optimizer = training.prepare(model, optimizer)
        accelerator.register_for_checkpointing(scheduler)

        # 5. Resume: trainable weights, optimizer, scheduler, RNG and log from the newest checkpoint.
        start_step = training.start(total_steps)
        if accelerator.is_main_process:
            save_resolved_config(run.resolved_config if run.resolved_config is not None else cfg, run.out_dir)

        # 6. The loop. Step s trains on batch s of the seeded order, whatever happened before it.
        for step in range(start_step, total_steps):
            model.train()
            indices = global_batch_indices(step, len(train_samples), global_batch, tcfg.seed)
            local = indices[accelerator.process_index :: accelerator.num_processes]
            micro_batches = [local[i : i + tcfg.batch_size] for i in range(0, len(local), tcfg.batch_size)]
            step_loss = 0.0
            for micro, batch_indices in enumerate(micro_batches):
                batch = batch_for(
                    processor, [train_samples[i] for i in batch_indices], pad_token_id, accelerator.device
                )
                last_micro = micro == len(micro_batches) - 1
                with contextlib.nullcontext() if last_micro else accelerator.no_sync(model):
                    loss = model(**batch).loss / len(micro_batches)
                    accelerator.backward(loss)
                step_loss += loss.detach()
            accelerator.clip_grad_norm_(trainable, tcfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            done = step + 1
            record = {
                "step": done,
                "loss": accelerator.reduce(torch.as_tensor(step_loss), "mean").item(),
                "lr": scheduler.get_last_lr()[0],
            }
            if done % tcfg.eval_every == 0 or done == total_steps:
                record["eval_loss"] = evaluate(
                    model, processor, eval_samples, tcfg.batch_size, pad_token_id, accelerator
                )
            training.log(record)
            training.maybe_checkpoint(done)

        # 7. Save the adapter as a plain PEFT folder and check it really holds the trained weights
        #    (pretraining: the whole model and its processor, a folder `load_llava` reads).
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            accelerator.unwrap_model(model).save_pretrained(run.out_dir)
            if run.full_parameters:
                processor.save_pretrained(run.out_dir)
            else:
                verify_adapter(run.out_dir, accelerator.unwrap_model(model))
        training.finish()  # the run is complete; the adapter supersedes the checkpoints
    return run.out_dir


# --------------------------------------------------------------------------------------------
# Pieces of the loop
# --------------------------------------------------------------------------------------------


def add_lora(model, settings: LoraSettings) -> PeftModel:
    """Wrap ``model`` with a fresh LoRA adapter; only the adapter's parameters train."""
    lora = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        modules_to_save=settings.modules_to_save or None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def split_held_out(
    samples: list[ConversationSample], fraction: float, max_samples: int
) -> tuple[list[ConversationSample], list[ConversationSample]]:
    """The last ``fraction`` of the samples (at most ``max_samples``, at least 1 when fraction > 0) is held out."""
    held_out = min(max_samples, math.ceil(len(samples) * fraction)) if fraction > 0 else 0
    if held_out >= len(samples):
        held_out = 0  # too few samples to hold any out: evaluate on the training samples
    train_samples = samples[: len(samples) - held_out]
    return train_samples, samples[len(samples) - held_out :] or train_samples


def batch_for(processor, samples: list[ConversationSample], pad_token_id: int, device: torch.device) -> dict:
    batch = collate([encode_sample(processor, sample) for sample in samples], pad_token_id)
    return {key: value.to(device) for key, value in batch.items()}


@torch.no_grad()
def evaluate(
    model, processor, samples, batch_size: int, pad_token_id: int, accelerator: Accelerator
) -> float:
    """Mean loss over the held-out samples (each process takes its share, then the results are averaged)."""
    model.eval()
    local = samples[accelerator.process_index :: accelerator.num_processes]
    total, count = torch.zeros((), device=accelerator.device), torch.zeros((), device=accelerator.device)
    for start in range(0, len(local), batch_size):
        chunk = local[start : start + batch_size]
        total += model(**batch_for(processor, chunk, pad_token_id, accelerator.device)).loss * len(chunk)
        count += len(chunk)
    total, count = accelerator.reduce(total, "sum"), accelerator.reduce(count, "sum")
    model.train()
    return (total / count.clamp(min=1)).item()


def verify_adapter(folder: Path, model) -> None:
    """Guard against empty adapters (as DeepSpeed ZeRO-3 can save): every LoRA tensor must be there, whole."""
    saved = load_file(str(folder / ADAPTER_WEIGHTS))
    expected = get_peft_model_state_dict(model)
    if len(saved) != len(expected) or any(
        saved[k].shape != v.shape or saved[k].numel() == 0 for k, v in expected.items() if k in saved
    ):
        raise StorypipeError(
            f"the adapter saved in {folder} is incomplete ({len(saved)} of {len(expected)} tensors)"
        )
