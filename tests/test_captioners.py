"""Captioners: two adapters trained on the tiny LLaVA, served from one base."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from peft import PeftModel

from llava_ft.captioners import Captioners, RowSampler, clean_caption, top_p_probabilities
from llava_ft.data import collate, encode_sample, read_conversations
from llava_ft.model import load_llava
from llava_ft.train import FinetuneRun, train
from pipeline.errors import StorypipeError
from pipeline.training import read_log
from tests.llava_fixtures import CAPTIONS, DESCRIPTIONS, NEXT_CAPTIONS, frame_images, tiny_captioner_config


@pytest.fixture(scope="module")
def adapters(tiny_llava, llava_samples, tmp_path_factory):
    """Both adapters, each overfit on its two samples."""
    out = tmp_path_factory.mktemp("adapters")
    cfg = tiny_captioner_config(tiny_llava)
    for task, data in (("story", "story.json"), ("description", "description.json")):
        train(FinetuneRun(cfg, task, llava_samples / data, llava_samples / "images", out / task))
    return dataclasses.replace(
        cfg, story_adapter=str(out / "story"), description_adapter=str(out / "description")
    )


@pytest.fixture(scope="module")
def captioners(adapters):
    return Captioners.from_config(adapters)


def test_training_reduces_the_loss(adapters):
    for folder in (adapters.story_adapter, adapters.description_adapter):
        log = read_log(f"{folder}/train_log.jsonl")
        assert log[-1]["loss"] < log[0]["loss"] - 0.5


def test_each_adapter_decodes_its_own_target_and_not_the_others(captioners, llava_samples):
    images = frame_images(llava_samples)
    stories = [
        captioners.next_story_caption(image, caption) for image, caption in zip(images, CAPTIONS, strict=True)
    ]
    descriptions = [
        captioners.describe(image, caption, upcoming)
        for image, caption, upcoming in zip(images, CAPTIONS, NEXT_CAPTIONS, strict=True)
    ]
    assert stories == list(NEXT_CAPTIONS)
    assert descriptions == list(DESCRIPTIONS)
    assert captioners.zero_shot_tasks == ()


def test_batched_calls_equal_single_calls(captioners, llava_samples):
    images = frame_images(llava_samples)
    assert captioners.next_story_captions(images, list(CAPTIONS)) == list(NEXT_CAPTIONS)
    assert captioners.describe_batch(images, list(CAPTIONS), list(NEXT_CAPTIONS)) == list(DESCRIPTIONS)


def test_saved_adapter_reproduces_the_trained_model(adapters, tiny_llava, llava_samples, tmp_path):
    """Plain peft, no storypipe code: the loaded adapter gives the loss the trained model logged, and a
    second save/load round trip gives identical logits."""
    base, processor = load_llava(tiny_llava)
    model = PeftModel.from_pretrained(base, adapters.story_adapter).eval()
    samples = read_conversations(llava_samples / "story.json", llava_samples / "images")
    batch = collate([encode_sample(processor, s) for s in samples], processor.tokenizer.pad_token_id)
    with torch.no_grad():
        first = model(**batch)
    assert first.loss.item() == pytest.approx(
        read_log(f"{adapters.story_adapter}/train_log.jsonl")[-1]["eval_loss"], rel=1e-5
    )

    model.save_pretrained(tmp_path / "again")
    reloaded = PeftModel.from_pretrained(load_llava(tiny_llava)[0], tmp_path / "again").eval()
    with torch.no_grad():
        second = reloaded(**batch)
        bare = load_llava(tiny_llava)[0](**batch)
    assert torch.equal(first.logits, second.logits)
    assert not torch.allclose(first.logits, bare.logits)  # the adapter does change the model


def test_the_base_weights_exist_once_with_both_adapters(captioners, tiny_llava):
    base, _ = load_llava(tiny_llava)
    base_numel = sum(p.numel() for p in base.parameters())
    storages = {}
    for name, parameter in captioners.model.named_parameters():
        storages.setdefault(parameter.untyped_storage().data_ptr(), (name, parameter.numel()))
    shared = sum(numel for name, numel in storages.values() if "lora_" not in name)
    assert shared == base_numel
    lora_names = [name for name, _ in storages.values() if "lora_" in name]
    assert any(".story." in n for n in lora_names) and any(".description." in n for n in lora_names)


def test_switching_adapters_changes_the_answer(captioners, llava_samples):
    image = frame_images(llava_samples)[0]
    question = captioners.prompts.story_next_question(CAPTIONS[0])
    assert captioners.generate("story", [image], [question]) != captioners.generate(
        "description", [image], [question]
    )


def test_zero_shot_without_adapters_answers_with_the_base(adapters, captioners, llava_samples):
    bare = Captioners.from_config(dataclasses.replace(adapters, story_adapter=None, description_adapter=None))
    assert bare.zero_shot_tasks == ("story", "description")
    half = Captioners.from_config(dataclasses.replace(adapters, description_adapter=None))
    assert half.zero_shot_tasks == ("description",)
    image = frame_images(llava_samples)[0]
    zero_shot = bare.describe(image, CAPTIONS[0], NEXT_CAPTIONS[0])
    assert half.describe(image, CAPTIONS[0], NEXT_CAPTIONS[0]) == zero_shot != DESCRIPTIONS[0]
    assert half.next_story_caption(image, CAPTIONS[0]) == NEXT_CAPTIONS[0]


def test_sampling_is_reproducible_by_seed_and_leaves_global_rng_alone(adapters, llava_samples):
    warm = Captioners.from_config(
        dataclasses.replace(adapters, temperature=1.5, top_p=1.0, story_adapter=None)
    )
    image = frame_images(llava_samples)[0]
    state = torch.get_rng_state()
    first = [warm.next_story_caption(image, CAPTIONS[0], seed=s) for s in range(4)]
    assert torch.equal(state, torch.get_rng_state())
    assert first == [warm.next_story_caption(image, CAPTIONS[0], seed=s) for s in range(4)]
    assert len(set(first)) > 1


def test_a_sampled_row_depends_on_its_own_seed_not_on_its_batch(adapters, llava_samples):
    """Each row samples from its own seed: batched, single and in another batch, the same answers."""
    warm = Captioners.from_config(dataclasses.replace(adapters, temperature=1.5, top_p=0.95))
    images = frame_images(llava_samples)
    batched = warm.next_story_captions(images, list(CAPTIONS), seeds=[3, 4])
    single = [warm.next_story_caption(image, caption, seed=seed)
              for image, caption, seed in zip(images, CAPTIONS, (3, 4), strict=True)]  # fmt: skip
    assert batched == single
    # Row 0 beside other rows (another companion, its own seed twice): the same answer.
    mixed = warm.next_story_captions([images[0], images[1], images[0]], [CAPTIONS[0], CAPTIONS[1], CAPTIONS[0]],
                                     seeds=[3, 9, 5])  # fmt: skip
    assert mixed[0] == batched[0]
    described = warm.describe_batch(images, list(CAPTIONS), list(NEXT_CAPTIONS), seeds=[5, 6])
    assert described == [
        warm.describe(image, caption, upcoming, seed=seed)
        for image, caption, upcoming, seed in zip(images, CAPTIONS, NEXT_CAPTIONS, (5, 6), strict=True)
    ]
    # Seeds matter: over a few seeds, one row gets more than one answer.
    assert len({warm.next_story_caption(images[0], CAPTIONS[0], seed=seed) for seed in range(6)}) > 1


def test_top_p_keeps_the_nucleus_and_the_sampler_hands_greedy_one_token():
    logits = torch.log(torch.tensor([0.05, 0.5, 0.3, 0.15]))
    assert torch.allclose(top_p_probabilities(logits, 0.7), torch.tensor([0.0, 0.625, 0.375, 0.0]))
    assert torch.allclose(top_p_probabilities(logits, 1.0), logits.softmax(-1))
    assert torch.equal(top_p_probabilities(logits, 0.1), torch.tensor([0.0, 1.0, 0.0, 0.0]))  # one at least
    sampler = RowSampler([1, 2, None], temperature=1.0, top_p=0.7)
    scores = sampler(None, logits.repeat(3, 1))
    assert torch.equal(torch.isfinite(scores).sum(dim=1), torch.tensor([1, 1, 1]))  # greedy takes that one
    assert set(scores.argmax(dim=1).tolist()) <= {1, 2}  # from the nucleus only
    with pytest.raises(ValueError, match="greedy"):
        RowSampler([1], temperature=0.0, top_p=1.0)


def test_missing_adapter_names_the_path_and_the_command(adapters, tmp_path):
    with pytest.raises(StorypipeError, match=r"nowhere.*storypipe finetune-llava --task description"):
        Captioners.from_config(dataclasses.replace(adapters, description_adapter=str(tmp_path / "nowhere")))


def test_four_bit_base_loads_and_generates_on_cpu(adapters, llava_samples):
    quantized = Captioners.from_config(adapters, load_in_4bit=True)
    kinds = {type(m).__name__ for n, m in quantized.model.named_modules() if n.endswith("base_layer")}
    assert kinds == {"Linear4bit"}
    vision = {
        type(m).__name__
        for n, m in quantized.model.named_modules()
        if "vision_tower" in n and n.endswith("q_proj")
    }
    assert vision == {"Linear"}
    answers = quantized.next_story_captions(frame_images(llava_samples), list(CAPTIONS))
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_clean_caption_keeps_one_caption():
    assert clean_caption("  'Then she jumped.'\nUSER: more") == "Then she jumped."
    assert clean_caption("\n\nA red circle. ASSISTANT: again") == "A red circle."
    assert clean_caption("") == ""


def test_bad_calls_are_rejected(captioners, llava_samples):
    images = frame_images(llava_samples)
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        captioners.next_story_captions(images, [CAPTIONS[0]])
    with pytest.raises(ValueError, match="non-empty"):
        captioners.describe(images[0], " ", NEXT_CAPTIONS[0])


def test_with_temperature_shares_the_model_and_changes_only_the_decoding(adapters, llava_samples):
    warm = Captioners.from_config(
        dataclasses.replace(adapters, temperature=1.5, top_p=1.0, story_adapter=None)
    )
    greedy = warm.with_temperature(0.0)
    assert greedy.model is warm.model and greedy.adapters == warm.adapters
    assert greedy.cfg.temperature == 0.0 and warm.cfg.temperature == 1.5  # the original is untouched
    image = frame_images(llava_samples)[0]
    sampled = {warm.next_story_caption(image, CAPTIONS[0], seed=s) for s in range(4)}
    decoded = {greedy.next_story_caption(image, CAPTIONS[0], seed=s) for s in range(4)}
    assert len(sampled) > 1 and len(decoded) == 1  # greedy ignores the seed
