"""``storypipe dry-run``: the real preset's code path at the real model sizes, with random weights.

Nothing is downloaded. From the configs shipped in ``storypipe/model_configs`` (LLaVA-1.5-7B: CLIP
ViT-L/14 at 336 px and Llama-2-7B dimensions, vocabulary 32064, image token 32000; SD 1.5: UNet, VAE and
the CLIP ViT-L/14 text encoder) it builds random-weight models with offline tokenizers, saves them with
two random LoRA adapters into a work folder, and then, in a fresh process, runs exactly what ``generate``
runs with the preset: ``from_pretrained`` loads (nf4 where the preset quantises), both adapters, one story
caption and one description, and one frame with three references. It reports per component the
parameters and bytes loaded against ``storypipe plan``'s prediction, the seconds each stage took, and
the measured peak against the plan's: CUDA's ``max_memory_allocated`` on a GPU, the process's peak RSS
above its baseline on a CPU.

On a CPU the language model is cut to ``language_layers`` decoder layers (default 2) so that it fits
2 cores and 24 GB; the report extrapolates its parameters, memory and caption time to the full depth and
says so. The plan it compares with is the plan of the models actually built.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipeline.errors import InputError
from pipeline.io import atomic_write_json
from storypipe import plan
from storypipe.config import StorypipeConfig, resolve_config

if TYPE_CHECKING:
    from torch import nn

CPU_LANGUAGE_LAYERS = 2  # the default cut on a CPU; a GPU runs all of them
LLAVA_FOLDER, SD_FOLDER = "llava-1.5-7b", "stable-diffusion-v1-5"
ADAPTER_FOLDERS = {"story": "story-adapter", "description": "description-adapter"}
TOKENIZER_TRAINING_VOCAB = 2000  # the offline BPE's own merges; filler tokens pad it to the image token
INIT_STD = 0.02  # the adapters' random LoRA weights (LoRA's B starts at zero otherwise)
RSS_SAMPLE_SECONDS = 0.01
OUTPUT_SHOWN = 60  # characters of each generated text the report shows
BUILT_FILE = "built.json"  # what a work folder holds, so a second run reuses its models
SEED_CAPTION = "We went to the fair on a sunny day."
REFERENCE_DESCRIPTIONS = ("A family walks in a fair.", "A girl holds a balloon.", "A ride spins at night.")


@dataclass(frozen=True)
class DryRunSettings:
    """What the dry run builds and runs; ``language_layers=None`` keeps the full depth."""

    language_layers: int | None = CPU_LANGUAGE_LAYERS
    resolution: int = 512
    steps: int = 2
    references: int = 3

    def __post_init__(self) -> None:
        if self.language_layers is not None and self.language_layers < 1:
            raise InputError(f"--language-layers must be >= 1, got {self.language_layers}")
        if self.resolution < 64 or self.resolution % 64:
            raise InputError(f"--resolution must be a multiple of 64, got {self.resolution}")
        if self.steps < 1 or not 0 <= self.references <= 3:
            raise InputError("--steps must be >= 1 and the references 0..3")


# --------------------------------------------------------------------------------------------
# 1. Build: random weights in the real configurations, saved as ordinary model folders
# --------------------------------------------------------------------------------------------


def build_llava(folder: Path, language_layers: int | None, lora_cfg) -> tuple[Path, dict[str, Path]]:
    """LLaVA-1.5-7B's configuration (its language model cut to ``language_layers``), random weights in
    fp16 as the real checkpoint stores them, its processor, and the two adapters; returns the folders."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from llava_ft.model import build_llava_tokenizer, llava_processor
    from llava_ft.train import add_lora

    config = LlavaConfig.from_pretrained(plan.SHIPPED_CONFIGS["llava-hf/llava-1.5-7b-hf"])
    if language_layers is not None:
        config.text_config.num_hidden_layers = language_layers
    tokenizer = build_llava_tokenizer(TOKENIZER_TRAINING_VOCAB, image_token_id=config.image_token_index)
    processor = llava_processor(tokenizer, config.vision_config.image_size, config.vision_config.patch_size)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).to(torch.float16)  # the library's own random init
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder / LLAVA_FOLDER)
    processor.save_pretrained(folder / LLAVA_FOLDER)
    adapters = {}
    for seed, (task, name) in enumerate(ADAPTER_FOLDERS.items(), start=1):
        peft_model = add_lora(model, lora_cfg)
        with torch.no_grad():
            generator = torch.Generator().manual_seed(seed)
            for parameter in peft_model.parameters():
                if parameter.requires_grad:  # LoRA's B starts at zero: make each adapter change something
                    parameter.normal_(0.0, INIT_STD, generator=generator)
        peft_model.save_pretrained(folder / name)
        model = peft_model.unload()
        adapters[task] = folder / name
    return folder / LLAVA_FOLDER, adapters


def build_sd(folder: Path) -> Path:
    """SD 1.5's UNet, VAE and text encoder configurations with random fp16 weights, an offline CLIP-style
    tokenizer and SD 1.5's scheduler, as a diffusers pipeline folder."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from pipeline.tiny_text import build_byte_bpe_tokenizer, tiny_corpus
    from storygen_ft.model import TEXT_MAX_LENGTH, save_sd_components

    shipped = plan.SHIPPED_CONFIGS["stable-diffusion-v1-5/stable-diffusion-v1-5"]
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(shipped / "unet")).half()
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(shipped / "vae")).half()
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(shipped / "text_encoder")).half()
    tokenizer = build_byte_bpe_tokenizer(
        TOKENIZER_TRAINING_VOCAB, tiny_corpus(),
        special_tokens={"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
        template="<|startoftext|> $A <|endoftext|>", model_max_length=TEXT_MAX_LENGTH,
    )  # fmt: skip
    scheduler = PNDMScheduler.from_pretrained(shipped, subfolder="scheduler")
    save_sd_components(folder / SD_FOLDER, vae, text_encoder, tokenizer, unet, scheduler)
    return folder / SD_FOLDER


def build_models(folder: Path, settings: DryRunSettings, lora_cfg) -> dict[str, str]:
    """Both model families and the adapters in ``folder`` (kept from an earlier run with the same
    ``language_layers``, recorded in :data:`BUILT_FILE`); returns the config overrides that use them."""
    built = folder / BUILT_FILE
    paths = json.loads(built.read_text()) if built.is_file() else None
    if paths is None or paths.pop("language_layers") != settings.language_layers:
        llava, adapters = build_llava(folder, settings.language_layers, lora_cfg)
        paths = {
            "captioner.base_model": str(llava),
            "captioner.story_adapter": str(adapters["story"]),
            "captioner.description_adapter": str(adapters["description"]),
            "generator.base_model": str(build_sd(folder)),
        }
        atomic_write_json(built, {**paths, "language_layers": settings.language_layers})
    return paths


# --------------------------------------------------------------------------------------------
# 2. Run and measure
# --------------------------------------------------------------------------------------------


class PeakMemory:
    """The peak of the device's memory over a block: CUDA's allocator peak, or on a CPU the process's
    resident set, sampled every :data:`RSS_SAMPLE_SECONDS`, above its level when the block began."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = 0
        else:
            import psutil

            self.process = psutil.Process()
            self.base = self.process.memory_info().rss
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss - self.base)
            time.sleep(RSS_SAMPLE_SECONDS)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.running = False
            self.thread.join()
            self.peak = max(self.peak, self.process.memory_info().rss - self.base)


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of a loaded module's parameters and buffers, with bitsandbytes' 4-bit constants."""
    seen, total = set(), 0

    def add(tensor: torch.Tensor | None) -> None:
        nonlocal total
        if tensor is None or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()

    for tensor in (*module.parameters(), *module.buffers()):
        add(tensor)
        state = getattr(tensor, "quant_state", None)
        if state is not None:
            add(state.absmax)
            nested = getattr(state, "state2", None)  # double quantisation's second level
            add(nested.absmax if nested is not None else None)
    return total


def llava_components(captioners) -> dict[str, int]:
    """Bytes per plan component of the loaded captioners (LoRA weights by adapter)."""
    base = captioners.model.get_base_model() if captioners.adapters else captioners.model
    lora = {task: 0 for task in captioners.adapters}
    for name, parameter in captioners.model.named_parameters():
        for task in lora:
            if "lora_" in name and f".{task}." in name:
                lora[task] += parameter.numel() * parameter.element_size()
    parts = {
        "LLaVA vision tower": base.model.vision_tower,
        "LLaVA projector": base.model.multi_modal_projector,
        "LLaVA language model": base.model.language_model,
        "LLaVA lm_head": base.lm_head,
    }
    measured = {component: tensor_bytes(module) for component, module in parts.items()}
    measured["LLaVA language model"] -= sum(lora.values())  # the adapters sit inside the language model
    for number, task in enumerate(captioners.adapters, start=1):
        measured[f"LLaVA LoRA adapter {number}"] = lora[task]
    return measured


def sd_components(model, context_kind: str) -> dict[str, int]:
    return {
        "SD UNet": tensor_bytes(model.unet),  # the context layers hang off its processors, not its modules
        "SD VAE": tensor_bytes(model.vae),
        "SD text encoder": tensor_bytes(model.text_encoder),
        f"SD context layers ({context_kind})": tensor_bytes(model.context_layers),
    }


def measure(cfg: StorypipeConfig, settings: DryRunSettings, device: str) -> dict:
    """Load and run the preset's generate path once; seconds per stage, bytes per component, the peak."""
    from PIL import Image

    from storypipe.wiring import load_captioners, load_frame_generator

    torch.manual_seed(0)
    seed_image = Image.effect_noise((cfg.generator.resolution,) * 2, 64).convert("RGB")
    references = [Image.effect_noise((cfg.generator.resolution,) * 2, 32 + 16 * i).convert("RGB")
                  for i in range(settings.references)]  # fmt: skip
    seconds, outputs = {}, {}
    with PeakMemory(torch.device(device)) as peak:
        started = time.perf_counter()
        captioners = load_captioners(cfg, device)
        generator = load_frame_generator(cfg, device)
        seconds["load"] = time.perf_counter() - started
        started = time.perf_counter()
        outputs["story caption"] = captioners.next_story_caption(seed_image, SEED_CAPTION, seed=0)
        seconds["story caption"] = time.perf_counter() - started
        started = time.perf_counter()
        outputs["description"] = captioners.describe(
            seed_image, SEED_CAPTION, outputs["story caption"], seed=0
        )
        seconds["description"] = time.perf_counter() - started
        frame = generator.generate(
            outputs["description"], references, list(REFERENCE_DESCRIPTIONS[: settings.references]), seed=0
        )
        seconds["frame"] = frame.seconds
    components = {**llava_components(captioners), **sd_components(generator.model, cfg.generator.context)}
    return {"seconds": seconds, "components": components, "peak_bytes": peak.peak, "outputs": outputs,
            "frame_size": list(frame.image.size), "unet_evaluations": frame.unet_evaluations}  # fmt: skip


def main(argv: list[str]) -> None:
    """The measuring process: ``python -m storypipe.dry_run SPEC.json``, the spec written by :func:`dry_run`."""
    spec = json.loads(Path(argv[0]).read_text())
    cfg = resolve_config(spec["config_file"], spec["preset"], tuple(spec["overrides"]), {})
    result = measure(cfg, DryRunSettings(**spec["settings"]), spec["device"])
    Path(spec["out"]).write_text(json.dumps(result))


# --------------------------------------------------------------------------------------------
# 3. The report
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DryRunReport:
    settings: DryRunSettings
    device: str
    measured: dict
    predicted: plan.MemoryPlan  # the plan of the models built
    full_depth: plan.MemoryPlan  # the plan of the real preset, for the extrapolation
    language_layers_full: int

    def lines(self) -> list[str]:
        items = {item.component: item for phase in self.predicted.phases for item in phase.items}
        width = max(len(name) for name in self.measured["components"])
        rows = [f"{'component':<{width}}  {'params':>15}  {'measured GiB':>12}  {'plan GiB':>8}"]
        for component, nbytes in self.measured["components"].items():
            item = items.get(component)
            params = f"{item.params:,}" if item else "?"
            predicted = f"{item.bytes / plan.GIB:8.3f}" if item else "       ?"
            rows.append(f"{component:<{width}}  {params:>15}  {nbytes / plan.GIB:12.3f}  {predicted}")
        peak, predicted_peak = self.measured["peak_bytes"], self.predicted.total_bytes
        kind = "max_memory_allocated" if self.device == "cuda" else "peak RSS above the baseline"
        rows.append(f"peak ({kind}): measured {peak / plan.GIB:.2f} GiB, plan {predicted_peak / plan.GIB:.2f} "
                    f"GiB ({(peak - predicted_peak) / predicted_peak:+.0%})")  # fmt: skip
        rows += [f"{stage}: {seconds:.1f} s" for stage, seconds in self.measured["seconds"].items()]
        rows += [
            f"{name} (random weights): {text[:OUTPUT_SHOWN]!r}"
            for name, text in self.measured["outputs"].items()
        ]
        layers = self.settings.language_layers
        if layers is not None and layers < self.language_layers_full:
            scale = self.language_layers_full / layers
            caption = self.measured["seconds"]["story caption"]
            rows.append(
                f"extrapolated to the full depth ({self.language_layers_full} language layers, not run): plan "
                f"peak {self.full_depth.total_bytes / plan.GIB:.2f} GiB; caption time about {caption * scale:.0f} s "
                f"(the language model's share scaled by {scale:.0f}, an upper estimate)"
            )
        return rows


def dry_run(
    settings: DryRunSettings,
    preset: str | None = "vist",
    config_file: str | Path | None = None,
    overrides: tuple[str, ...] = (),
    work_dir: Path | None = None,
    device: str | None = None,
) -> DryRunReport:
    """Build, run and measure (see the module docstring) with the config ``preset`` or ``config_file``
    and ``overrides`` give, its models replaced by the built ones; ``work_dir`` keeps those."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    config_file = str(config_file) if config_file is not None else None
    base = resolve_config(config_file, preset, overrides, {})
    with tempfile.TemporaryDirectory(prefix="storypipe-dry-run-") as scratch:
        folder = Path(work_dir or scratch)
        folder.mkdir(parents=True, exist_ok=True)
        paths = build_models(folder, settings, base.captioner.lora)
        overrides = (
            *overrides,
            *(f"{key}={value}" for key, value in paths.items()),
            f"generator.resolution={settings.resolution}",
            f"generator.num_inference_steps={settings.steps}",
            "runtime.require_gpu=false",
        )
        cfg = resolve_config(config_file, preset, overrides, {})
        # A fresh process: the builders' freed memory would otherwise hide the loads from the RSS peak.
        out, spec = folder / "measured.json", folder / "measure.json"
        spec.write_text(json.dumps({"config_file": config_file, "preset": preset, "overrides": overrides,
                                    "settings": dataclasses.asdict(settings), "device": device,
                                    "out": str(out)}))  # fmt: skip
        quiet = {"TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error",
                 "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONWARNINGS": "ignore"}  # fmt: skip
        child = subprocess.run([sys.executable, "-m", "storypipe.dry_run", str(spec)],
                               env={**quiet, **os.environ}, check=False)  # fmt: skip
        if child.returncode != 0:
            raise RuntimeError(f"the dry run's measuring process failed (exit code {child.returncode})")
        measured = json.loads(out.read_text())
        predicted = plan.plan(cfg, "generate", device_type=device)
    full = plan.plan(dataclasses.replace(cfg, captioner=base.captioner), "generate", device_type=device)
    full_layers = plan.meta_llava(plan.SHIPPED_CONFIGS["llava-hf/llava-1.5-7b-hf"]).config.text_config
    return DryRunReport(settings, device, measured, predicted, full, full_layers.num_hidden_layers)


if __name__ == "__main__":
    main(sys.argv[1:])
