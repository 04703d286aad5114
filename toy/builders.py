"""Tiny, randomly initialised models, built offline: the starting points of the toy trainers, and the
measuring models of the ``tiny`` preset and the tests (CLIP, an object detector, a causal LM).

Each builder writes a normal model folder atomically (``pipeline.io.atomic_write_folder``) that loads
through ``from_pretrained`` exactly like a real checkpoint, so the metric code is exercised end to end
without a download. The numbers these models give are meaningless; only the plumbing is real.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPProcessor,
    CLIPTextConfig,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    YolosConfig,
    YolosForObjectDetection,
)
from transformers.models.clip import CLIPImageProcessorPil
from transformers.models.yolos import YolosImageProcessorPil

from eval.baselines import STORY_PROMPT
from pipeline.io import atomic_write_folder
from pipeline.tiny_text import build_byte_bpe_tokenizer, tiny_corpus

# The tiny CLIP tokenizer's special tokens, as storygen_ft.model.TINY_TEXT_SPECIAL_TOKENS: "<pad>" first
# keeps the EOS id (3) away from 2, the id that makes CLIPTextModel fall back to its legacy
# (argmax-of-ids) pooling; with any other id it pools at the first EOS token.
TINY_CLIP_SPECIAL_TOKENS = {
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "bos_token": "<s>",
    "eos_token": "</s>",
}
TINY_CLIP_VOCAB = 512
TINY_CLIP_TEXT_LENGTH = 77  # CLIP's context length
TINY_CLIP_IMAGE_SIZE = 32
TINY_CLIP_PATCH = 8
TINY_CLIP_WIDTH = 32
TINY_CLIP_PROJECTION = 16

TINY_DETECTOR_IMAGE_SIZE = 32
TINY_DETECTOR_PATCH = 8
TINY_DETECTOR_WIDTH = 32
TINY_DETECTOR_TOKENS = 10  # detection tokens = the most objects one image can have
# A wide initialisation (the default is 0.02) so the random detector's scores spread over (0, 1) and depend
# on the image: at 0.02 every query scores ~1/(labels+1) and a threshold test would test nothing.
TINY_DETECTOR_INIT = 0.3
# A few COCO-like labels; the tiny detector's classes are arbitrary, the count is what the metric uses.
TINY_DETECTOR_LABELS = ("person", "car", "dog", "tree")


def build_tiny_clip(folder: str | Path, seed: int = 0) -> Path:
    """A tiny random CLIP (text + vision towers + projections) and its ``CLIPProcessor``, saved atomically.

    The tokenizer is an offline byte-level BPE (``pipeline.tiny_text``) with BOS/EOS around each text,
    and the image processor is CLIP's PIL backend (no torchvision), resizing to 32×32.
    """
    folder = Path(folder)
    tokenizer = build_byte_bpe_tokenizer(
        TINY_CLIP_VOCAB,
        tiny_corpus(),
        special_tokens=TINY_CLIP_SPECIAL_TOKENS,
        template=f"{TINY_CLIP_SPECIAL_TOKENS['bos_token']} $A {TINY_CLIP_SPECIAL_TOKENS['eos_token']}",
        model_max_length=TINY_CLIP_TEXT_LENGTH,
    )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": TINY_CLIP_IMAGE_SIZE},
        crop_size={"height": TINY_CLIP_IMAGE_SIZE, "width": TINY_CLIP_IMAGE_SIZE},
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    text = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TINY_CLIP_WIDTH,
        intermediate_size=4 * TINY_CLIP_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=TINY_CLIP_TEXT_LENGTH,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    vision = CLIPVisionConfig(
        hidden_size=TINY_CLIP_WIDTH,
        intermediate_size=4 * TINY_CLIP_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=TINY_CLIP_IMAGE_SIZE,
        patch_size=TINY_CLIP_PATCH,
    )
    config = CLIPConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=TINY_CLIP_PROJECTION
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)

    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)

    return atomic_write_folder(folder, write)


def build_tiny_detector(folder: str | Path, seed: int = 0) -> Path:
    """A tiny random YOLOS object detector and its PIL image processor, saved atomically.

    YOLOS (Fang et al. 2021) is a plain ViT with detection tokens and DETR's heads, so it needs no
    timm or torchvision backbone. Images are resized so their longer side is 32 pixels.
    """
    folder = Path(folder)
    labels = dict(enumerate(TINY_DETECTOR_LABELS))
    config = YolosConfig(
        hidden_size=TINY_DETECTOR_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=4 * TINY_DETECTOR_WIDTH,
        image_size=[TINY_DETECTOR_IMAGE_SIZE, TINY_DETECTOR_IMAGE_SIZE],
        patch_size=TINY_DETECTOR_PATCH,
        num_detection_tokens=TINY_DETECTOR_TOKENS,
        initializer_range=TINY_DETECTOR_INIT,
        id2label=labels,
        label2id={name: index for index, name in labels.items()},
    )
    image_processor = YolosImageProcessorPil(
        size={"shortest_edge": TINY_DETECTOR_IMAGE_SIZE, "longest_edge": TINY_DETECTOR_IMAGE_SIZE}
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = YolosForObjectDetection(config)
        # transformers leaves the class/detection tokens and position embeddings at zero (a checkpoint fills
        # them); the original YOLOS code draws them from a truncated normal. Zero detection tokens would
        # make every query identical.
        embeddings = model.vit.embeddings
        with torch.no_grad():
            for parameter in (
                embeddings.cls_token,
                embeddings.detection_tokens,
                embeddings.position_embeddings,
            ):
                torch.nn.init.trunc_normal_(parameter, std=TINY_DETECTOR_INIT)

    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        image_processor.save_pretrained(staging)

    return atomic_write_folder(folder, write)


def build_tiny_causal_lm(folder: str | Path, vocab_size: int = 512, seed: int = 0) -> Path:
    """A randomly initialised tiny Llama and its offline tokenizer, saved as a normal model folder."""
    special = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    tokenizer = build_byte_bpe_tokenizer(
        vocab_size, tiny_corpus(extra=[STORY_PROMPT]), special, template="<s> $A"
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)

    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)

    return atomic_write_folder(folder, write)
