"""Import StoryGen's released UNet (haoningwu/StoryGen) as a storypipe generator folder.

StoryGen's checkpoint is a full SD 1.5 UNet whose transformer blocks also carry ``attn3`` (the image
cross-attention) and ``norm4`` (its LayerNorm) (haoningwu3639/StoryGen, model/attention.py). The
converter splits its state dict into the plain diffusers UNet and those added modules, maps the added
ones to our context layers, and writes a folder that :meth:`StoryDiffusion.from_pretrained` loads with
``generator.context=storygen_exact``; no StoryGen code is needed at run time.
"""

from __future__ import annotations

import json
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
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
UNET_CLASS = "UNet2DConditionModel"
# A bare UNet repo, or a pipeline repo's unet/ (StoryGen's inference loads `<folder>/unet`): not its VAE.
HUB_PATTERNS = (*(f"{prefix}{name}" for prefix in ("", "*unet/") for name in (UNET_CONFIG, *WEIGHT_FILES)),)
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
    """The UNet's weights, from safetensors or (tensors only) a torch pickle."""
    for name in WEIGHT_FILES:
        path = folder / name
        if path.is_file():
            if path.suffix == ".safetensors":
                return load_file(str(path))
            return torch.load(path, map_location="cpu", weights_only=True)
    raise DataError(f"{folder}: no {' or '.join(WEIGHT_FILES)}")


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
