"""``storypipe plan``: the peak GPU memory a command needs, from configs alone.

Every model a purpose loads is built on the meta device (no weights are read or downloaded) from the
config folder the preset names: for the ``vist`` preset's hub ids, the real-size configs shipped in
``storypipe/model_configs`` (:data:`SHIPPED_CONFIGS`); for any other base, the local folder's own config
files (the tiny preset's folders are built on first use, as every stage does). Per component it counts
parameters and their bytes at the dtype and quantisation actually used, and adds the activation peak
traced by :mod:`storypipe.activations` at the configured resolution, references, guidance branches and
batch sizes.

A command runs in phases (``generate``: a caption, then a frame; ``eval``: :func:`storypipe.wiring.eval_phases`);
each phase lists what is resident then, and the plan's peak is its largest phase. ``runtime.offload``
changes what is resident: ``model`` keeps one model on the GPU at a time (plus the context layers, which
the UNet calls, and a 4-bit LLaVA, which hooks cannot move), ``sequential`` one layer.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import InputError
from storypipe.config import StorypipeConfig
from storypipe.wiring import memory_generator_config

if TYPE_CHECKING:
    from torch import nn

    from storygen_ft.config import GeneratorConfig

PURPOSES = ("generate", "finetune-llava", "finetune-storygen", "eval")
MODEL_CONFIGS = Path(__file__).resolve().parent / "model_configs"
# The hub ids whose real-size configs ship with storypipe, and their folders (no downloads to plan).
SHIPPED_CONFIGS = {
    "llava-hf/llava-1.5-7b-hf": MODEL_CONFIGS / "llava-1.5-7b",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": MODEL_CONFIGS / "stable-diffusion-v1-5",
}

GIB = 1024**3
BUDGET_UNITS = {"gib": GIB, "gb": 10**9, "mib": 1024**2, "mb": 10**6}
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
NF4_BITS = 4  # bitsandbytes nf4: one 4-bit code per weight
NF4_BLOCKSIZE = 64  # bitsandbytes' 4-bit default: one absmax per 64 weights
ABSMAX_BITS = 8  # double quantisation stores each absmax as an 8-bit code ...
ABSMAX_BLOCKSIZE = 256  # ... with one fp32 second-level absmax per 256 absmax values (QLoRA paper, 3)
SECOND_ABSMAX_BITS = 32
# Bits per quantised weight: 4 + 8/64 + 32/(64*256) = 4.127 (QLoRA: ~0.127 bit/param of constants).
NF4_BITS_PER_PARAM = (
    NF4_BITS + ABSMAX_BITS / NF4_BLOCKSIZE + SECOND_ABSMAX_BITS / (NF4_BLOCKSIZE * ABSMAX_BLOCKSIZE)
)
LLAVA_CUDA_DTYPE = "bfloat16"  # llava_ft.captioners loads the unquantised parts in bf16 on CUDA
# llava_ft.train loads unquantised in fp32, and peft's prepare_model_for_kbit_training upcasts a 4-bit
# model's unquantised parameters to fp32 as well: training keeps everything but the nf4 weights in fp32.
LLAVA_TRAIN_DTYPE = "float32"
LORA_DTYPE = (
    "float32"  # peft keeps adapter weights in fp32 over a bf16/fp16/nf4 base (autocast_adapter_dtype)
)
GRAD_BYTES = 4  # a trainable fp32 parameter's gradient
ADAMW_STATE_BYTES = 8  # torch AdamW: exp_avg + exp_avg_sq, fp32
ADAMW_8BIT_STATE_BYTES = 2  # bitsandbytes AdamW8bit: both states in 8 bits (block constants ignored)
UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # storygen_ft.train's LoRA on the UNet
MIXED_PRECISION_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "no": "float32"}
LARGEST_NAMED = 3  # how many of the largest items a "does not fit" verdict names
EVAL_CAPTION_BATCH = 4  # eval.runner describes a 5-frame story's 4 next frames in one batch
ACTIVATIONS = "activations"  # the dtype column of a traced activation peak
# Eval's metric and baseline models: no configs ship for them, so a hub id counts at its model card's
# size, rounded (parameters, stored dtype: transformers 5 loads a checkpoint in the dtype it was saved in).
PUBLISHED_SIZES = {
    "mosaicml/mpt-7b-instruct": (6_700_000_000, "bfloat16"),
    "Salesforce/blip-image-captioning-base": (247_000_000, "float32"),
    "sentence-transformers/all-roberta-large-v1": (355_000_000, "float32"),
    "openai/clip-vit-base-patch32": (151_000_000, "float32"),
    "hustvl/yolos-small": (31_000_000, "float32"),
}


@dataclass(frozen=True)
class PlanItem:
    """One line of the plan: a component's parameters and the bytes they take on the GPU (an activation
    peak has no parameters and dtype :data:`ACTIVATIONS`)."""

    component: str
    params: int
    dtype: str
    bytes: int


@dataclass(frozen=True)
class PlanPhase:
    """What is on the GPU at once during one phase of a command."""

    name: str
    items: tuple[PlanItem, ...]

    @property
    def total_bytes(self) -> int:
        return sum(item.bytes for item in self.items)


@dataclass(frozen=True)
class MemoryPlan:
    """A purpose's phases, its peak (the largest phase), and whether that fits ``budget_bytes``."""

    purpose: str
    phases: tuple[PlanPhase, ...]
    budget_bytes: int
    notes: tuple[str, ...] = ()
    suggestions: tuple[str, ...] = ()

    @property
    def peak(self) -> PlanPhase:
        return max(self.phases, key=lambda phase: phase.total_bytes)

    @property
    def items(self) -> tuple[PlanItem, ...]:
        return self.peak.items

    @property
    def total_bytes(self) -> int:
        return self.peak.total_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.budget_bytes

    def largest(self, count: int = LARGEST_NAMED) -> list[PlanItem]:
        return sorted(self.items, key=lambda item: item.bytes, reverse=True)[:count]

    def verdict(self) -> str:
        budget, total = self.budget_bytes / GIB, self.total_bytes / GIB
        where = f" (phase {self.peak.name})" if len(self.phases) > 1 else ""
        if self.fits:
            return f"fits in {budget:.1f} GiB: peak {total:.2f} GiB{where}, {budget - total:.2f} GiB to spare"
        largest = ", ".join(f"{item.component} ({item.bytes / GIB:.2f} GiB)" for item in self.largest())
        return f"does not fit in {budget:.1f} GiB: peak {total:.2f} GiB{where}; largest items {largest}"

    def lines(self) -> list[str]:
        """Per phase: the table (component, params, dtype, GiB) and its total; then the notes, the verdict
        and, when it does not fit, the suggestions."""
        items = [item for phase in self.phases for item in phase.items]
        width = max([len("component"), *(len(item.component) for item in items)])
        rows = []
        for phase in self.phases:
            if len(self.phases) > 1:
                rows.append(f"phase {phase.name}:")
            rows.append(f"{'component':<{width}}  {'params':>15}  {'dtype':<22}  {'GiB':>7}")
            rows += [
                f"{item.component:<{width}}  {item.params:>15,}  {item.dtype:<22}  {item.bytes / GIB:>7.3f}"
                for item in phase.items
            ]
            rows.append(f"{'total':<{width}}  {'':>15}  {'':<22}  {phase.total_bytes / GIB:>7.3f}")
        rows += [f"note: {note}" for note in self.notes]
        rows.append(self.verdict())
        if not self.fits:
            rows += [f"suggestion: {suggestion}" for suggestion in self.suggestions]
        return rows


def parse_memory(text: str) -> int:
    """``24GiB``, ``24 GB``, ``512MiB`` or a bare number of GiB, in bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if match is None or (unit and unit not in BUDGET_UNITS):
        raise InputError(f"--gpu-memory: expected a size like 24GiB, 24GB or 512MiB, got {text!r}")
    return int(float(match.group(1)) * BUDGET_UNITS.get(unit, GIB))


def count(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def dtype_item(component: str, module: nn.Module, dtype: str) -> PlanItem:
    params = count(module)
    return PlanItem(component, params, dtype, params * DTYPE_BYTES[dtype])


def trainable_items(component: str, params: int, use_8bit_adam: bool) -> list[PlanItem]:
    """Gradients and AdamW states of ``params`` trainable fp32 parameters (their weights are listed apart)."""
    optimizer, state = (
        ("AdamW8bit", ADAMW_8BIT_STATE_BYTES) if use_8bit_adam else ("AdamW", ADAMW_STATE_BYTES)
    )
    return [
        PlanItem(f"{component} gradients", params, "float32", params * GRAD_BYTES),
        PlanItem(f"{component} {optimizer} states", params, f"{optimizer} (2 states)", params * state),
    ]


# --------------------------------------------------------------------------------------------
# LLaVA
# --------------------------------------------------------------------------------------------


def llava_config_folder(cfg: StorypipeConfig) -> Path:
    if cfg.captioner.base_model in SHIPPED_CONFIGS:
        return SHIPPED_CONFIGS[cfg.captioner.base_model]
    from llava_ft.model import resolve_base_model

    return Path(resolve_base_model(cfg.captioner))


def meta_llava(folder: Path) -> nn.Module:
    """A LLaVA built from ``folder``'s config.json on the meta device."""
    from accelerate import init_empty_weights
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    with init_empty_weights():
        return LlavaForConditionalGeneration(LlavaConfig.from_pretrained(folder))


def lora_params(model: nn.Module, target_modules: str | list[str], rank: int) -> int:
    """LoRA's A and B matrices, ``rank * (in + out)``, on each Linear peft targets: a string is a regex
    peft matches in full against module names; a list names module-name suffixes."""
    from torch import nn

    def targeted(name: str) -> bool:
        if isinstance(target_modules, str):
            return re.fullmatch(target_modules, name) is not None
        return any(name == key or name.endswith(f".{key}") for key in target_modules)

    return sum(
        rank * (module.in_features + module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and targeted(name)
    )


def nf4_bytes(module: nn.Module, rest_dtype: str) -> tuple[int, int]:
    """``(params, bytes)`` of ``module`` quantised to nf4 with double quantisation: every Linear weight at
    :data:`NF4_BITS_PER_PARAM`, everything else (embeddings, norms, biases) at ``rest_dtype``."""
    from torch import nn

    quantised = sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))
    rest = count(module) - quantised
    return count(module), round(quantised * NF4_BITS_PER_PARAM / 8) + rest * DTYPE_BYTES[rest_dtype]


def llava_quantised(cfg: StorypipeConfig, device_type: str, training: bool = False) -> bool:
    """Whether the LLaVA base loads in nf4: the captioners quantise on any device (bitsandbytes has CPU
    kernels); llava_ft.train only on CUDA (QLoRA training needs it)."""
    return cfg.captioner.load_in_4bit and (device_type == "cuda" or not training)


def llava_items(
    cfg: StorypipeConfig, adapters: int, device_type: str, training: bool = False
) -> tuple[list[PlanItem], int]:
    """The LLaVA base's components and ``adapters`` LoRA adapters; returns them and one adapter's params."""
    from llava_ft.model import UNQUANTISED_MODULES

    model = meta_llava(llava_config_folder(cfg))
    dtype = LLAVA_CUDA_DTYPE if device_type == "cuda" and not training else LLAVA_TRAIN_DTYPE
    quantised = llava_quantised(cfg, device_type, training)
    parts = {
        "LLaVA vision tower": ("model.vision_tower", model.model.vision_tower),
        "LLaVA projector": ("model.multi_modal_projector", model.model.multi_modal_projector),
        "LLaVA language model": ("model.language_model", model.model.language_model),
        "LLaVA lm_head": ("lm_head", model.lm_head),
    }
    items = []
    for component, (name, module) in parts.items():
        skipped = any(re.match(pattern, name) for pattern in UNQUANTISED_MODULES)  # load_llava skips them
        if quantised and not skipped:
            params, size = nf4_bytes(module, dtype)
            items.append(PlanItem(component, params, "nf4 (double quant)", size))
        else:
            items.append(dtype_item(component, module, dtype))
    adapter = lora_params(model, cfg.captioner.lora.target_modules, cfg.captioner.lora.r)
    for number in range(adapters):
        items.append(PlanItem(f"LLaVA LoRA adapter {number + 1}", adapter, LORA_DTYPE, adapter * 4))
    return items, adapter


def modules_to_save_params(cfg: StorypipeConfig) -> int:
    """The whole modules the adapter trains and saves (peft's modules_to_save: name suffixes)."""
    if not cfg.captioner.lora.modules_to_save:
        return 0
    model = meta_llava(llava_config_folder(cfg))
    keys = cfg.captioner.lora.modules_to_save
    return sum(
        count(module)
        for name, module in model.named_modules()
        if any(name == key or name.endswith(f".{key}") for key in keys)
    )


# --------------------------------------------------------------------------------------------
# Stable Diffusion + context layers
# --------------------------------------------------------------------------------------------


def sd_config_folder(generator: GeneratorConfig) -> Path:
    if generator.base_model in SHIPPED_CONFIGS:
        return SHIPPED_CONFIGS[generator.base_model]
    from storygen_ft.model import resolve_base_model

    return Path(resolve_base_model(generator))


def meta_sd(folder: Path) -> tuple[nn.Module, nn.Module, nn.Module]:
    """The UNet, VAE and CLIP text encoder of an SD-1.5-layout folder, on the meta device."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    return unet, vae, text_encoder


def sd_items(
    generator: GeneratorConfig, dtype: str, label: str = "SD"
) -> tuple[list[PlanItem], nn.Module, int]:
    """The UNet, VAE, text encoder (at ``dtype``) and context layers (also ``dtype``) of a generator;
    returns them, the meta UNet and the context layers' params."""
    from accelerate import init_empty_weights

    from storygen_ft.attention import build_context_layers

    unet, vae, text_encoder = meta_sd(sd_config_folder(generator))
    with init_empty_weights():
        context = build_context_layers(unet, generator.context, text_encoder.config.hidden_size)
    items = [
        dtype_item(f"{label} UNet", unet, dtype),
        dtype_item(f"{label} VAE", vae, dtype),
        dtype_item(f"{label} text encoder", text_encoder, dtype),
        dtype_item(f"{label} context layers ({generator.context})", context, dtype),
    ]
    return items, unet, count(context)


# --------------------------------------------------------------------------------------------
# Activations and eval's other models
# --------------------------------------------------------------------------------------------


def activation_item(component: str, nbytes: int) -> PlanItem:
    return PlanItem(f"{component} activations", 0, ACTIVATIONS, nbytes)


def llava_generate_item(cfg: StorypipeConfig, device_type: str, batch: int = 1) -> PlanItem:
    import torch

    from storypipe.activations import llava_generate_activations

    dtype = LLAVA_CUDA_DTYPE if device_type == "cuda" else LLAVA_TRAIN_DTYPE
    model = meta_llava(llava_config_folder(cfg))
    nbytes = llava_generate_activations(model, cfg.captioner, getattr(torch, dtype), batch=batch)
    return activation_item("LLaVA caption" if batch == 1 else f"LLaVA captions (batch {batch})", nbytes)


def sd_generate_item(generator: GeneratorConfig, dtype: str, label: str = "SD") -> PlanItem:
    import torch

    from storypipe.activations import sd_generate_activations

    nbytes = sd_generate_activations(meta_sd(sd_config_folder(generator)), generator, getattr(torch, dtype))
    return activation_item(
        f"{label} frame ({generator.max_references} refs, {generator.resolution}px)", nbytes
    )


def other_model_item(component: str, spec: str | None) -> tuple[PlanItem | None, str | None]:
    """An eval metric or baseline model: a hub id at :data:`PUBLISHED_SIZES`, a local transformers folder
    from its config on the meta device (fp32); anything else is named in a note instead."""
    if spec is None:
        return None, None
    if spec in PUBLISHED_SIZES:
        params, dtype = PUBLISHED_SIZES[spec]
        return PlanItem(component, params, dtype, params * DTYPE_BYTES[dtype]), None
    folder = Path(spec)
    if (folder / "config.json").is_file():
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModel

        with init_empty_weights():
            model = AutoModel.from_config(AutoConfig.from_pretrained(folder))
        return dtype_item(component, model, "float32"), None
    return None, f"{component} ({spec}) is not counted: no shipped size and no local config.json"


def eval_group_items(
    cfg: StorypipeConfig, group: str, device_type: str, sd_dtype: str
) -> tuple[list[PlanItem], list[str]]:
    """The weights and activation peak of one of eval's model groups (:mod:`eval.phases`), and notes."""
    ecfg = cfg.eval
    if group == "captioners":
        items = llava_items(cfg, 2, device_type)[0]
        return [*items, llava_generate_item(cfg, device_type, batch=EVAL_CAPTION_BATCH)], []
    if group == "generator":
        return [*sd_items(cfg.generator, sd_dtype)[0], sd_generate_item(cfg.generator, sd_dtype)], []
    if group == "memory_generator":
        memory = memory_generator_config(cfg)
        return [
            *sd_items(memory, sd_dtype, "memory SD")[0],
            sd_generate_item(memory, sd_dtype, "memory SD"),
        ], []
    specs = {
        "caption_baseline": [("caption baseline", ecfg.caption_baseline_model)],
        "text_baseline": [("text baseline", ecfg.text_baseline_model)],
        "measures": [("sentence model", ecfg.sentence_model), ("CLIP", ecfg.clip_model),
                     ("detector", ecfg.detector_model), ("classifier", ecfg.classifier_model)],
    }[group]  # fmt: skip
    items, notes = [], []
    for component, spec in specs:
        item, note = other_model_item(component, spec)
        items += [item] if item else []
        notes += [note] if note else []
    if items:
        notes.append(f"{group}: activations are not traced (small next to the weights)")
    return items, notes


# --------------------------------------------------------------------------------------------
# Offload
# --------------------------------------------------------------------------------------------


def offloaded(items: list[PlanItem], activations: PlanItem, running: tuple[str, ...], mode: str,
              resident: tuple[str, ...]) -> list[PlanItem]:  # fmt: skip
    """What ``runtime.offload`` leaves on the GPU while the components named ``running`` (name prefixes)
    run: everything (``none``); the ``resident`` ones plus the running ones (``model``); the resident ones
    only (``sequential``, which streams one layer at a time)."""
    if mode == "none":
        return [*items, activations]
    on_gpu = resident if mode == "sequential" else (*resident, *running)  # sequential: see plan()'s note
    return [*(item for item in items if item.component.startswith(on_gpu)), activations]


# --------------------------------------------------------------------------------------------
# Purposes
# --------------------------------------------------------------------------------------------


def plan(
    cfg: StorypipeConfig, purpose: str, gpu_memory: str = "24GiB", device_type: str = "cuda"
) -> MemoryPlan:
    """The phases of ``purpose`` (one of :data:`PURPOSES`) with ``cfg`` on a ``device_type`` GPU of
    ``gpu_memory``: per phase the weights and the activation peak resident at once."""
    if purpose not in PURPOSES:
        raise InputError(f"unknown plan purpose {purpose!r}; one of {', '.join(PURPOSES)}")
    budget = parse_memory(gpu_memory)
    captioner, generator = cfg.captioner, cfg.generator
    sd_dtype = generator.torch_dtype_name(device_type)
    mode = cfg.runtime.offload
    phases: list[PlanPhase] = []
    notes: list[str] = []
    if purpose == "generate":
        adapters = sum(path is not None for path in (captioner.story_adapter, captioner.description_adapter))
        llava = llava_items(cfg, adapters, device_type)[0]
        sd = sd_items(generator, sd_dtype)[0]
        quantised = llava_quantised(cfg, device_type)
        # A 4-bit LLaVA stays put (hooks cannot move bitsandbytes weights); the UNet calls the context layers.
        resident = ("SD context layers", *(("LLaVA",) if quantised else ()))
        weights = llava + sd
        phases = [
            PlanPhase("caption", tuple(offloaded(weights, llava_generate_item(cfg, device_type), ("LLaVA",),
                                                 mode, resident))),
            PlanPhase("frame", tuple(offloaded(weights, sd_generate_item(generator, sd_dtype), ("SD UNet",),
                                               mode, resident))),
        ]  # fmt: skip
        if mode == "sequential":
            notes.append("runtime.offload=sequential also holds one layer at a time (LLaVA's largest, "
                         "embed_tokens or lm_head, is 0.24 GiB in bf16)")  # fmt: skip
    if purpose == "eval":
        from storypipe.wiring import eval_phases

        load_phases = eval_phases(cfg)
        groups = dict.fromkeys(group for phase in load_phases for group in phase.models)
        for group in groups:  # each group once: several phases hold the captioners or the generator
            groups[group], group_notes = eval_group_items(cfg, group, device_type, sd_dtype)
            notes += group_notes
        phases = [
            PlanPhase(phase.name, tuple(item for group in phase.models for item in groups[group]))
            for phase in load_phases
        ]
    if purpose == "finetune-llava":
        import torch

        from storypipe.activations import llava_train_activations

        llava, adapter = llava_items(cfg, 1, device_type, training=True)
        items = list(llava)
        trained = adapter + modules_to_save_params(cfg)
        if trained > adapter:
            items.append(PlanItem("LLaVA modules_to_save copies", trained - adapter, LORA_DTYPE,
                                  (trained - adapter) * 4))  # fmt: skip
        items += trainable_items("LLaVA LoRA", trained, use_8bit_adam=False)
        quantised = llava_quantised(cfg, device_type, training=True)
        if quantised != captioner.load_in_4bit:
            captioner = dataclasses.replace(captioner, load_in_4bit=quantised)
        compute = torch.bfloat16 if quantised else None  # llava_ft.train: nf4 + bf16 compute, else fp32
        nbytes = llava_train_activations(meta_llava(llava_config_folder(cfg)), captioner,
                                         getattr(torch, LLAVA_TRAIN_DTYPE), compute)  # fmt: skip
        items.append(activation_item(f"LLaVA training step (batch {captioner.train.batch_size})", nbytes))
        phases = [PlanPhase("train", tuple(items))]
    if purpose == "finetune-storygen":
        import torch
        from diffusers import DDIMScheduler

        from storypipe.activations import sd_train_activations

        train = generator.train
        frozen = MIXED_PRECISION_DTYPES[train.mixed_precision] if device_type == "cuda" else "float32"
        sd, unet, context = sd_items(generator, frozen)
        sd[-1] = PlanItem(sd[-1].component, context, "float32", context * 4)  # trained: fp32 master weights
        trained = context
        if train.unet_lora_rank is not None:
            unet_lora = lora_params(unet, list(UNET_LORA_TARGETS), train.unet_lora_rank)
            sd.append(PlanItem("UNet LoRA", unet_lora, "float32", unet_lora * 4))
            trained += unet_lora
            notes.append("the UNet LoRA's activations are not traced (the context layers' are)")
        items = sd + trainable_items("trained", trained, use_8bit_adam=train.use_8bit_adam)
        folder = sd_config_folder(generator)
        scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
        compute = getattr(torch, frozen) if frozen != "float32" else None
        nbytes = sd_train_activations(meta_sd(folder), scheduler, generator, getattr(torch, frozen), compute)
        items.append(activation_item(f"SD training step (batch {train.batch_size})", nbytes))
        phases = [PlanPhase("train", tuple(items))]
    memory_plan = MemoryPlan(purpose, tuple(phases), budget, tuple(notes))
    return dataclasses.replace(memory_plan, suggestions=tuple(suggestions(cfg, memory_plan, device_type)))


def suggestions(cfg: StorypipeConfig, memory_plan: MemoryPlan, device_type: str) -> list[str]:
    """Settings the config can express that lower this purpose's peak: only those that touch what the peak
    phase holds."""
    purpose, generator, captioner = memory_plan.purpose, cfg.generator, cfg.captioner
    peak = {item.component for item in memory_plan.items}
    has_sd, has_llava = "SD UNet" in peak, "LLaVA language model" in peak
    out = []
    if purpose in ("generate", "eval") and has_sd and generator.torch_dtype_name(device_type) == "float32":
        out.append("--set generator.dtype=float16 halves the SD weights and activations")
    if purpose == "generate" and cfg.runtime.offload == "none":
        out.append("--set runtime.offload=model loads the captioners and the generator in turn (one model on "
                   "the GPU at a time; slower); runtime.offload=sequential streams one layer at a time")  # fmt: skip
    if purpose in ("generate", "eval") and has_sd and generator.max_references > 1:
        out.append(f"fewer references (--set generator.max_references={generator.max_references - 1}) or a "
                   f"lower generator.resolution shrink the frame's activations")  # fmt: skip
    if purpose in ("generate", "eval") and has_sd and generator.reference_features != "once":
        out.append("--set generator.reference_features=once (the fast reference mode) runs the reference "
                   "passes once per frame instead of every step: faster, the same peak")  # fmt: skip
    if purpose in ("generate", "eval", "finetune-llava") and has_llava and not captioner.load_in_4bit:
        out.append("--set captioner.load_in_4bit=true stores the language model in nf4 (about a quarter)")
    if purpose == "eval":
        optional = {"text baseline": "eval.text_baseline_model", "caption baseline": "eval.caption_baseline_model",
                    "memory SD UNet": "eval.memory_generator_model"}  # fmt: skip
        out += [f"--set {key}=null leaves out the largest phase's {component} (and its rows)"
                for component, key in optional.items() if component in peak]  # fmt: skip
        out.append(f"smaller eval batches: eval describes one story's {EVAL_CAPTION_BATCH} next frames per batch "
                   "and draws one frame at a time, so what is left is leaving rows out (eval.rows)")  # fmt: skip
    if purpose == "finetune-llava" and captioner.train.batch_size > 1:
        out.append(f"--set captioner.train.batch_size={captioner.train.batch_size // 2} with twice the "
                   "captioner.train.gradient_accumulation_steps: the same global batch, smaller activations")  # fmt: skip
    if purpose == "finetune-llava" and not captioner.gradient_checkpointing:
        out.append("--set captioner.gradient_checkpointing=true recomputes activations in backward")
    if purpose == "finetune-storygen":
        train = generator.train
        if train.batch_size > 1:
            out.append(f"--set generator.train.batch_size={train.batch_size // 2} with twice the "
                       "generator.train.gradient_accumulation_steps")  # fmt: skip
        if not train.gradient_checkpointing:
            out.append("--set generator.train.gradient_checkpointing=true")
        if train.mixed_precision == "no":
            out.append("--set generator.train.mixed_precision=fp16 halves the frozen SD weights")
        if not train.use_8bit_adam:
            out.append("--set generator.train.use_8bit_adam=true shrinks the optimizer states fourfold")
    return out
