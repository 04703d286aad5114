"""Tokenizers for tiny test models, trained offline with `tokenizers` (no download).

A byte-level BPE encodes any text (nothing is unknown) and is trained on the prompt templates and
ShapeStories' captions and descriptions, so the tiny models' vocabulary covers the toy world.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from pipeline.prompts import PromptTemplates

CORPUS_STORIES = 300  # ShapeStories stories whose captions train the tiny tokenizers


def tiny_corpus(extra: Iterable[str] = ()) -> list[str]:
    """The prompt templates, ShapeStories' captions and descriptions, and ``extra`` lines."""
    from pipeline.data.shapestories import describe_frame, plan_story, story_captions

    prompts = PromptTemplates.load()
    rng = random.Random(0)
    corpus = [prompts.story_next, prompts.description, *extra]
    for _ in range(CORPUS_STORIES):
        frames = plan_story(rng)
        corpus += story_captions(frames) + [describe_frame(frame) for frame in frames]
    return corpus


def build_byte_bpe_tokenizer(
    vocab_size: int,
    corpus: Iterable[str],
    special_tokens: dict[str, str],
    template: str,
    extra_special_tokens: dict[str, str] | None = None,
    model_max_length: int | None = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE; ``special_tokens`` (e.g. ``bos_token``...) get the first ids, in order.

    ``template`` is the post-processor's single-sequence template, e.g. ``"<s> $A"`` or ``"<s> $A </s>"``.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    extra = extra_special_tokens or {}
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[*special_tokens.values(), *extra.values()],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    template_tokens = [token for token in template.split() if token != "$A"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(token, tokenizer.token_to_id(token)) for token in template_tokens]
    )
    kwargs = {"model_max_length": model_max_length} if model_max_length is not None else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, extra_special_tokens=extra or None, **special_tokens, **kwargs
    )
