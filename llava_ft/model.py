"""Loading a LLaVA base and its processor, and building the llava-1.5 prompt, for training and inference alike.

Every model goes through ``from_pretrained``, from a hub id or a local folder; tiny models are built
into a folder first (``build_tiny_llava``) and then load the same way as the real one.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import (
    AutoProcessor,
    BitsAndBytesConfig,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip import CLIPImageProcessorPil

from llava_ft.config import BASE_MODEL_ADVICE, CaptionerConfig, TinyLlavaSettings
from pipeline.config import in_cache
from pipeline.errors import model_load_error, require_model_folder
from pipeline.io import atomic_write_folder
from pipeline.prompts import IMAGE_TOKEN
from pipeline.tiny_text import build_byte_bpe_tokenizer, tiny_corpus

# llava-1.5's conversation format ("USER: <image>\n{question} ASSISTANT: {answer}"), as llava-hf's
# processors render it. Real checkpoints bring their own template; tiny ones get this one.
LLAVA_15_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'].upper() + ': ' }}"
    "{% for content in message['content'] if content['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] if content['type'] == 'text' %}{{ content['text'] + ' ' }}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


# The modules 4-bit loading keeps in the compute dtype. Patterns match from the start of a module name,
# so a leading ".*" finds the towers anywhere.
UNQUANTISED_MODULES = (r".*vision_tower", r".*multi_modal_projector", "lm_head")


def chat_prompt(processor: LlavaProcessor, question: str) -> str:
    """The user turn with one image and ``question``, ending where the assistant's answer starts."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def resolve_base_model(cfg: CaptionerConfig) -> str:
    """The base model's hub id or folder. The tiny preset's base is built into storypipe's cache on first
    use (``cfg.tiny`` and a folder in the cache); any other missing folder is an error."""
    if (
        cfg.tiny is not None
        and in_cache(cfg.base_model)
        and not Path(cfg.base_model, "config.json").is_file()
    ):
        build_tiny_llava(cfg.base_model, cfg.tiny)
    require_model_folder("captioner.base_model", cfg.base_model, BASE_MODEL_ADVICE)
    return cfg.base_model


def load_llava(
    name_or_path: str | Path,
    load_in_4bit: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Load a LLaVA model and its processor with ``from_pretrained``.

    With ``load_in_4bit`` the language model is quantised to nf4 (QLoRA's base); the vision tower,
    projector and LM head stay in ``dtype``.
    """
    quantization = None
    if load_in_4bit:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
            llm_int8_skip_modules=list(UNQUANTISED_MODULES),
        )
    try:
        processor = AutoProcessor.from_pretrained(name_or_path)
        model = LlavaForConditionalGeneration.from_pretrained(
            name_or_path,
            dtype=dtype,
            quantization_config=quantization,
            device_map={"": torch.device(device) if device is not None else "cpu"} if load_in_4bit else None,
        )
    except (OSError, ValueError) as exc:
        raise model_load_error(
            "LLaVA base",
            name_or_path,
            exc,
            "Set captioner.base_model to a local model folder or a reachable hub id, "
            "or use --preset tiny to build a tiny base offline.",
        ) from exc
    if device is not None and not load_in_4bit:
        model.to(device)
    return model, processor


# --------------------------------------------------------------------------------------------
# Tiny models (offline): a tiny CLIP vision tower + a tiny Llama + a byte-level BPE tokenizer
# --------------------------------------------------------------------------------------------


def build_llava_tokenizer(
    vocab_size: int, corpus: Iterable[str] | None = None, image_token_id: int | None = None
) -> PreTrainedTokenizerFast:
    """A byte-level BPE with LLaVA's special tokens, trained offline on ``corpus`` (default: the tiny
    corpus and the chat template). With ``image_token_id`` the image token gets that id (filler tokens
    pad the vocabulary up to it), as in a real checkpoint's tokenizer (llava-hf: 32000)."""
    tokenizer = build_byte_bpe_tokenizer(
        vocab_size,
        corpus if corpus is not None else tiny_corpus(extra=[LLAVA_15_CHAT_TEMPLATE, "USER: ASSISTANT:"]),
        special_tokens=SPECIAL_TOKENS,
        template=f"{SPECIAL_TOKENS['bos_token']} $A",
        extra_special_tokens=None if image_token_id is not None else {"image_token": IMAGE_TOKEN},
    )
    if image_token_id is not None:
        tokenizer.add_tokens([f"<filler_{i}>" for i in range(len(tokenizer), image_token_id)])
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        tokenizer.image_token = IMAGE_TOKEN
        if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != image_token_id:
            raise ValueError(
                f"the image token got id {tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)}, not {image_token_id}"
            )
    return tokenizer


def llava_processor(tokenizer: PreTrainedTokenizerFast, image_size: int, patch_size: int) -> LlavaProcessor:
    """LLaVA-1.5's processor around ``tokenizer``: CLIP preprocessing at ``image_size`` and the chat template."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",  # drops CLIP's class token...
        num_additional_image_tokens=1,  # ...which the processor must know to count image tokens right
        chat_template=LLAVA_15_CHAT_TEMPLATE,
    )


def build_tiny_llava(
    folder: str | Path, settings: TinyLlavaSettings, corpus: Iterable[str] | None = None
) -> Path:
    """Build a randomly initialised tiny LLaVA and its processor, and save them as a normal model folder.

    The folder is written atomically (built in a temporary folder, then renamed), so a crash never
    leaves a half-built model behind. It loads with ``load_llava(folder)`` like any real checkpoint.
    """
    folder = Path(folder)
    tokenizer = build_llava_tokenizer(settings.vocab_size, corpus)
    num_patches = (settings.image_size // settings.patch_size) ** 2
    processor = llava_processor(tokenizer, settings.image_size, settings.patch_size)
    vision = CLIPVisionConfig(
        hidden_size=settings.vision_hidden_size,
        intermediate_size=4 * settings.vision_hidden_size,
        num_hidden_layers=settings.vision_layers,
        num_attention_heads=settings.attention_heads,
        image_size=settings.image_size,
        patch_size=settings.patch_size,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings.text_hidden_size,
        intermediate_size=4 * settings.text_hidden_size,
        num_hidden_layers=settings.text_layers,
        num_attention_heads=settings.attention_heads,
        num_key_value_heads=settings.attention_heads,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=num_patches,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)

    atomic_write_folder(folder, write)
    return folder
