"""Import StoryGen's released UNet (haoningwu/StoryGen) as a storypipe generator folder.

StoryGen's checkpoint is a full SD 1.5 UNet whose transformer blocks also carry ``attn3`` (the image
cross-attention) and ``norm4`` (its LayerNorm) (haoningwu3639/StoryGen, model/attention.py). The
converter splits its state dict into the plain diffusers UNet and those added modules, maps the added
ones to our context layers, and writes a folder that :meth:`StoryDiffusion.from_pretrained` loads with
``generator.context=storygen_exact``; no StoryGen code is needed at run time.

The weights may be one file or shards behind an ``*.index.json`` (its ``weight_map``), safetensors or a
torch pickle (loaded with ``weights_only=True``), in full precision or as the ``fp16`` variant, with
diffusers' file names (``diffusion_pytorch_model[.fp16].safetensors``,
``diffusion_pytorch_model.safetensors.index[.fp16].json``, ...). fp16 weights load into the float32 UNet.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from safetensors.torch import load_file

from pipeline.errors import DataError
from storygen_ft.attention import build_context_layers, layer_key
from storygen_ft.model import StoryDiffusion, load_sd_parts

EXACT_CONTEXT = "storygen_exact"
UNET_CONFIG = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model"
VARIANTS = (None, "fp16")  # full precision first


def variant_name(name: str, variant: str | None) -> str:
    """diffusers' naming: the variant goes before the last suffix (``a.safetensors.index.json`` ->
    ``a.safetensors.index.fp16.json``)."""
    if variant is None:
        return name
    stem, _, suffix = name.rpartition(".")
    return f"{stem}.{variant}.{suffix}"


# Looked for in this order: per variant, safetensors before pickles, one file before shards.
WEIGHT_FILES = tuple(
    variant_name(f"{WEIGHTS_NAME}.{kind}{index}", variant)
    for variant in VARIANTS
    for kind in ("safetensors", "bin")
    for index in ("", ".index.json")
)
UNET_CLASS = "UNet2DConditionModel"
# A bare UNet repo, or a pipeline repo's unet/ (StoryGen's inference loads `<folder>/unet`): not its VAE.
# The wildcard takes every weight format above (a repo with several downloads them all).
HUB_PATTERNS = tuple(
    f"{prefix}{name}" for prefix in ("", "*unet/") for name in (UNET_CONFIG, f"{WEIGHTS_NAME}*")
)
LISTED_KEYS = 20  # keys named per kind in a refusal
# StoryGen's added parameters per transformer block -> ours in ReferenceCrossAttention.
ADDED_KEYS = {
    "attn3.to_q.weight": "to_q.weight",
    "attn3.to_k.weight": "to_k.weight",
    "attn3.to_v.weight": "to_v.weight",
    "attn3.to_out.0.weight": "to_out.weight",
    "attn3.to_out.0.bias": "to_out.bias",
    "norm4.weight": "norm.weight",
    "norm4.bias": "norm.bias",
}


def find_unet_folder(checkpoint: str | Path) -> Path:
    """The folder holding StoryGen's UNet: ``checkpoint`` itself, a ``unet/`` below it, or the one UNet
    folder of a hub snapshot (downloaded when ``checkpoint`` is not a local folder)."""
    root = Path(checkpoint)
    if not root.is_dir():
        from huggingface_hub import snapshot_download

        try:
            root = Path(snapshot_download(str(checkpoint), allow_patterns=list(HUB_PATTERNS)))
        except (OSError, ValueError) as exc:  # offline, not found, not a valid repo id
            raise DataError(
                f"--checkpoint {checkpoint}: not a local folder, and the hub download failed ({exc})"
            ) from exc
    candidates = sorted(
        path.parent
        for path in root.rglob(UNET_CONFIG)
        if json.loads(path.read_text()).get("_class_name") == UNET_CLASS
    )
    if len(candidates) != 1:
        found = ", ".join(str(path) for path in candidates) or "none"
        raise DataError(f"--checkpoint {checkpoint}: expected one {UNET_CLASS} folder, found {found}")
    return candidates[0]


def load_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """The UNet's weights: the first of :data:`WEIGHT_FILES` in ``folder``, one file or an index's shards."""
    for name in WEIGHT_FILES:
        path = folder / name
        if path.is_file():
            return load_sharded(path) if name.endswith(".json") else load_weight_file(path)
    found = ", ".join(sorted(path.name for path in folder.iterdir())) or "nothing"
    raise DataError(
        f"{folder}: no UNet weights beside its {UNET_CONFIG}; expected one of {', '.join(WEIGHT_FILES)} "
        f"(found {found}). Download the weight files of StoryGen's unet/ into that folder, or point "
        "--checkpoint at the folder that has them."
    )


def load_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """One safetensors file, or a torch pickle of tensors only (``weights_only=True``: no code runs)."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise DataError(f"{path}: not a torch state dict of tensors ({exc})") from exc


def load_sharded(index: Path) -> dict[str, torch.Tensor]:
    """The shards an ``*.index.json`` names in its ``weight_map`` (key -> shard file beside it), merged."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"{index}: not a sharded-checkpoint index (a JSON object with a weight_map)") from exc
    if any(not isinstance(shard, str) or Path(shard).name != shard for shard in shards):
        raise DataError(f"{index}: its weight_map must name shard files in the same folder")
    missing = [shard for shard in shards if not (index.parent / shard).is_file()]
    if missing:
        raise DataError(
            f"{index} names {len(shards)} shards, but {len(missing)} are not in {index.parent}: "
            f"{', '.join(missing)}. Download every shard its weight_map lists into that folder."
        )
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(load_weight_file(index.parent / shard))
    return state


def transformer_blocks(unet: UNet2DConditionModel) -> list[str]:
    """Names of the UNet's transformer blocks with a text cross-attention (the ones StoryGen extends)."""
    return [
        name
        for name, module in unet.named_modules()
        if isinstance(module, BasicTransformerBlock) and module.attn2 is not None
    ]


def split_state_dict(
    state: dict[str, torch.Tensor], unet: UNet2DConditionModel
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """StoryGen's state dict -> (plain UNet weights, our context-layer weights); a :class:`DataError`
    lists every missing and unexpected key."""
    added = {
        f"{block}.{theirs}": f"{layer_key(block)}.{ours}"
        for block in transformer_blocks(unet)
        for theirs, ours in ADDED_KEYS.items()
    }
    expected = set(unet.state_dict()) | set(added)
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise DataError(
            "not a StoryGen UNet checkpoint: "
            + "; ".join(
                f"{len(keys)} {kind} keys: {', '.join(keys[:LISTED_KEYS])}{' ...' if len(keys) > LISTED_KEYS else ''}"
                for kind, keys in (("missing", missing), ("unexpected", unexpected))
                if keys
            )
        )
    plain = {key: value for key, value in state.items() if key not in added}
    context = {ours: state[theirs] for theirs, ours in added.items()}
    return plain, context


def import_storygen(checkpoint: str | Path, out: str | Path, base: str | Path) -> Path:
    """Write ``out``: StoryGen's UNet as a plain diffusers UNet, its ``attn3``/``norm4`` as our context
    layers, the VAE, text encoder, tokenizer and scheduler of the SD 1.5 model ``base``, and a
    ``story_model.json`` selecting ``storygen_exact``."""
    folder = find_unet_folder(checkpoint)
    config = json.loads((folder / UNET_CONFIG).read_text())
    unet = UNet2DConditionModel.from_config(config)
    plain, context = split_state_dict(load_state_dict(folder), unet)
    vae, text_encoder, tokenizer, scheduler = load_sd_parts(base)
    if text_encoder.config.hidden_size != unet.config.cross_attention_dim:
        raise DataError(
            f"--base {base}: its text encoder is {text_encoder.config.hidden_size} wide, but the "
            f"checkpoint's UNet reads {unet.config.cross_attention_dim}-wide text"
        )
    layers = build_context_layers(unet, EXACT_CONTEXT, text_encoder.config.hidden_size)
    try:
        unet.load_state_dict(plain)
        layers.load_state_dict(context)
    except RuntimeError as exc:  # shapes that do not match config.json
        raise DataError(f"{folder}: weights do not match its {UNET_CONFIG}: {exc}") from exc
    model = StoryDiffusion(vae, text_encoder, tokenizer, unet, scheduler, EXACT_CONTEXT, layers)
    return model.save_pretrained(out)
