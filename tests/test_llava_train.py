"""finetune-llava: LoRA on the language model only, answer-only labels, exact resume, clear data errors."""

from __future__ import annotations

import json

import pytest
import torch

from llava_ft.config import LoraSettings
from llava_ft.data import IGNORE_INDEX, encode_sample, read_conversations
from llava_ft.model import load_llava
from llava_ft.train import FinetuneRun, add_lora, train
from pipeline.errors import DataError, StorypipeError
from pipeline.training import global_batch_indices, read_log
from tests.crash import crash_after_step
from tests.llava_fixtures import DESCRIPTIONS, tiny_captioner_config


def test_only_lora_parameters_of_the_language_model_train(tiny_llava):
    model, _ = load_llava(tiny_llava)
    model = add_lora(model, LoraSettings())
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable, "LoRA added no trainable parameter"
    assert all("lora_" in name and "language_model" in name for name in trainable), trainable
    # Every linear layer of every language-model block is adapted (q, k, v, o, gate, up, down) x layers.
    adapted = {name.split(".lora_")[0] for name in trainable}
    assert len(adapted) == 7 * model.config.text_config.num_hidden_layers
    assert not any("vision_tower" in name or "projector" in name for name in adapted)


def test_labels_mask_exactly_the_prompt_and_image_positions(tiny_llava, llava_samples):
    _, processor = load_llava(tiny_llava)
    sample = read_conversations(llava_samples / "description.json", llava_samples / "images")[0]
    encoded = encode_sample(processor, sample)
    input_ids, labels = encoded["input_ids"], encoded["labels"]
    supervised = labels != IGNORE_INDEX
    # The supervised positions are one contiguous run at the end: the answer and EOS.
    first = int(supervised.nonzero()[0])
    assert supervised[first:].all() and not supervised[:first].any()
    assert torch.equal(labels[supervised], input_ids[supervised])
    assert (
        processor.tokenizer.decode(input_ids[first:]).strip()
        == DESCRIPTIONS[0] + processor.tokenizer.eos_token
    )
    # Every image token is masked, and the prompt before the answer is the chat template's.
    image_positions = input_ids == processor.tokenizer.convert_tokens_to_ids("<image>")
    assert image_positions.sum() == 16 and not supervised[image_positions].any()
    assert processor.tokenizer.decode(input_ids[:first]).rstrip().endswith("ASSISTANT:")


def test_resume_after_a_crash_reproduces_the_uninterrupted_losses(
    tiny_llava, llava_samples, tmp_path, monkeypatch
):
    # Dropout on and batch 1, so both the RNG state and the data order must be restored exactly.
    cfg = tiny_captioner_config(
        tiny_llava, lora_dropout=0.1, max_steps=6, batch_size=1, checkpoint_every=2, eval_every=3
    )
    data, images = llava_samples / "story.json", llava_samples / "images"
    train(FinetuneRun(cfg, "story", data, images, tmp_path / "straight"))
    expected = read_log(tmp_path / "straight" / "train_log.jsonl")

    crash_after_step(monkeypatch, 5)  # killed after step 5; the newest checkpoint is step 4
    with pytest.raises(KeyboardInterrupt):
        train(FinetuneRun(cfg, "story", data, images, tmp_path / "resumed"))
    checkpoints = tmp_path / "resumed" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000002", "step_00000004"]
    # A checkpoint keeps the adapter, never the frozen base.
    saved = torch.load(checkpoints / "step_00000004" / "model_0.pt", weights_only=True)
    assert saved and all("lora_" in name for name in saved), sorted(saved)
    monkeypatch.undo()
    with pytest.raises(StorypipeError, match="already holds a run; pass --resume"):
        train(FinetuneRun(cfg, "story", data, images, tmp_path / "resumed"))
    train(FinetuneRun(cfg, "story", data, images, tmp_path / "resumed", resume=True))
    resumed = read_log(tmp_path / "resumed" / "train_log.jsonl")

    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for want, got in zip(expected, resumed, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-6)
        assert ("eval_loss" in got) == ("eval_loss" in want)
    assert resumed[-1]["eval_loss"] == pytest.approx(expected[-1]["eval_loss"], rel=1e-5)
    assert not (tmp_path / "resumed" / "checkpoints").exists()  # a finished run keeps only the adapter
    for name in ("adapter_config.json", "adapter_model.safetensors", "config.yaml", "train_log.jsonl"):
        assert (tmp_path / "resumed" / name).is_file()


def test_resume_without_checkpoint_is_a_clear_error(tiny_llava, llava_samples, tmp_path):
    cfg = tiny_captioner_config(tiny_llava, max_steps=1)
    with pytest.raises(StorypipeError, match="no checkpoint"):
        train(
            FinetuneRun(
                cfg, "story", llava_samples / "story.json", llava_samples / "images", tmp_path, resume=True
            )
        )


def test_data_order_is_a_seeded_permutation_per_epoch():
    epoch0 = [i for step in range(3) for i in global_batch_indices(step, 6, 2, seed=0)]
    epoch1 = [i for step in range(3, 6) for i in global_batch_indices(step, 6, 2, seed=0)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(6)) and epoch0 != epoch1
    assert global_batch_indices(4, 6, 2, seed=0) == global_batch_indices(4, 6, 2, seed=0)
    # 5 samples, batches of 4: the last batch is the 5th sample, then wraps to the first three again.
    assert global_batch_indices(1, 5, 4, seed=0)[1:] == global_batch_indices(0, 5, 4, seed=0)[:3]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda samples: samples.clear(), "holds no samples"),
        (
            lambda samples: samples[1].update(image="missing.jpg"),
            "sample 's_1': image .*missing.jpg does not exist",
        ),
        (lambda samples: samples[0].pop("conversations"), "sample 's_0': expected an object with"),
        (lambda samples: samples[1]["conversations"].reverse(), r"sample 's_1': \"conversations\" must be"),
        (
            lambda samples: samples[0]["conversations"][0].update(value="no image token"),
            "sample 's_0': the human turn",
        ),
    ],
)
def test_bad_training_data_names_the_file_and_the_sample(llava_samples, tmp_path, mutate, message):
    samples = json.loads((llava_samples / "story.json").read_text())
    mutate(samples)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(samples))
    with pytest.raises(DataError, match=f"bad.json.*{message}" if samples else message):
        read_conversations(bad, llava_samples / "images")


def test_non_list_json_is_rejected(llava_samples, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"id": "x"}))
    with pytest.raises(DataError, match="bad.json must hold a list of LLaVA conversation samples"):
        read_conversations(bad, llava_samples / "images")
