"""``storypipe plan``: the GPU memory a command's model weights need, from configs alone.

Every model a purpose loads is built on the meta device (no weights are read or downloaded) from the
config folder the preset names: for the ``vist`` preset's hub ids, the real-size configs shipped in
``storypipe/model_configs`` (:data:`SHIPPED_CONFIGS`); for any other base, the local folder's own config
files (the tiny preset's folders are built on first use, as every stage does). Per component it counts
parameters and their bytes at the dtype and quantisation actually used. Activations are not counted yet.
"""

from __future__ import annotations

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
NOT_COUNTED = "activations are not counted yet"


@dataclass(frozen=True)
class PlanItem:
    """One line of the plan: a component's parameters and the bytes they take on the GPU."""

    component: str
    params: int
    dtype: str
    bytes: int


@dataclass(frozen=True)
class MemoryPlan:
    """The weights a purpose loads, and whether they fit ``budget_bytes``."""

    purpose: str
    items: tuple[PlanItem, ...]
    budget_bytes: int
    notes: tuple[str, ...] = ()

    @property
    def total_bytes(self) -> int:
        return sum(item.bytes for item in self.items)

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.budget_bytes

    def largest(self, count: int = LARGEST_NAMED) -> list[PlanItem]:
        return sorted(self.items, key=lambda item: item.bytes, reverse=True)[:count]

    def verdict(self) -> str:
        budget, total = self.budget_bytes / GIB, self.total_bytes / GIB
        if self.fits:
            return (
                f"weights fit in {budget:.1f} GiB with {budget - total:.2f} GiB left for activations, "
                f"which are not counted yet"
            )
        largest = ", ".join(f"{item.component} ({item.bytes / GIB:.2f} GiB)" for item in self.largest())
        return f"weights ({total:.2f} GiB) do not fit in {budget:.1f} GiB: largest items {largest}"

    def lines(self) -> list[str]:
        """The table (component, params, dtype, GiB), the total and the verdict."""
        width = max([len("component"), *(len(item.component) for item in self.items)])
        rows = [f"{'component':<{width}}  {'params':>15}  {'dtype':<22}  {'GiB':>7}"]
        rows += [
            f"{item.component:<{width}}  {item.params:>15,}  {item.dtype:<22}  {item.bytes / GIB:>7.3f}"
            for item in self.items
        ]
        rows.append(f"{'total':<{width}}  {'':>15}  {'':<22}  {self.total_bytes / GIB:>7.3f}")
        return [*rows, *(f"note: {note}" for note in self.notes), self.verdict()]


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


def llava_items(
    cfg: StorypipeConfig, adapters: int, device_type: str, training: bool = False
) -> tuple[list[PlanItem], int]:
    """The LLaVA base's components and ``adapters`` LoRA adapters; returns them and one adapter's params."""
    from llava_ft.model import UNQUANTISED_MODULES

    model = meta_llava(llava_config_folder(cfg))
    dtype = LLAVA_CUDA_DTYPE if device_type == "cuda" and not training else LLAVA_TRAIN_DTYPE
    quantised = cfg.captioner.load_in_4bit and device_type == "cuda"
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
# Purposes
# --------------------------------------------------------------------------------------------


def plan(
    cfg: StorypipeConfig, purpose: str, gpu_memory: str = "24GiB", device_type: str = "cuda"
) -> MemoryPlan:
    """The weights ``purpose`` (one of :data:`PURPOSES`) loads with ``cfg`` on a ``device_type`` GPU of
    ``gpu_memory``. Activations are not counted yet."""
    if purpose not in PURPOSES:
        raise InputError(f"unknown plan purpose {purpose!r}; one of {', '.join(PURPOSES)}")
    budget = parse_memory(gpu_memory)
    notes = [NOT_COUNTED]
    items: list[PlanItem] = []
    captioner, generator = cfg.captioner, cfg.generator
    sd_dtype = generator.torch_dtype_name(device_type)
    if purpose in ("generate", "eval"):
        adapters = sum(path is not None for path in (captioner.story_adapter, captioner.description_adapter))
        items += llava_items(cfg, adapters, device_type)[0]
        items += sd_items(generator, sd_dtype)[0]
    if purpose == "eval":
        memory = memory_generator_config(cfg)
        if memory is not None:
            items += sd_items(memory, sd_dtype, label="memory SD")[0]
        notes.append("eval's metric and baseline models are not counted yet")
    if purpose == "finetune-llava":
        llava, adapter = llava_items(cfg, 1, device_type, training=True)
        trained = adapter + modules_to_save_params(cfg)
        if trained > adapter:
            items.append(PlanItem("LLaVA modules_to_save copies", trained - adapter, LORA_DTYPE,
                                  (trained - adapter) * 4))  # fmt: skip
        items += llava + trainable_items("LLaVA LoRA", trained, use_8bit_adam=False)
    if purpose == "finetune-storygen":
        train = generator.train
        frozen = MIXED_PRECISION_DTYPES[train.mixed_precision] if device_type == "cuda" else "float32"
        sd, unet, context = sd_items(generator, frozen)
        sd[-1] = PlanItem(sd[-1].component, context, "float32", context * 4)  # trained: fp32 master weights
        trained = context
        if train.unet_lora_rank is not None:
            unet_lora = lora_params(unet, list(UNET_LORA_TARGETS), train.unet_lora_rank)
            sd.append(PlanItem("UNet LoRA", unet_lora, "float32", unet_lora * 4))
            trained += unet_lora
        items += sd + trainable_items("trained", trained, use_8bit_adam=train.use_8bit_adam)
    return MemoryPlan(purpose, tuple(items), budget, tuple(notes))
