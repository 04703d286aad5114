"""finetune-storygen: the new layers learn, the output folder loads with one call, resume is exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from pipeline.config import ToyDataConfig
from pipeline.data.shapestories import generate_shapestories
from pipeline.data.vist import load_vist_split
from pipeline.errors import DataError, StorypipeError
from pipeline.training import read_log
from storygen_ft.config import GeneratorConfig, GeneratorTrainConfig
from storygen_ft.generator import FrameGenerator
from storygen_ft.model import StoryDiffusion
from storygen_ft.train import Example, StoryGenRun, make_batch, train
from tests.crash import crash_after_step
from tests.test_storygen import REFERENCE_TEXTS, REFERENCES


def _config(base, **train) -> GeneratorConfig:
    settings = {"max_steps": 15, "batch_size": 4, "learning_rate": 3e-3, "warmup_steps": 0, "checkpoint_every": 1000,
                "mixed_precision": "no", "gradient_checkpointing": False, "use_8bit_adam": False}  # fmt: skip
    settings.update(train)
    return GeneratorConfig(
        base_model=str(base), resolution=32, num_inference_steps=4, train=GeneratorTrainConfig(**settings)
    )


def fixed_batch_loss(folder, toy_stories) -> float:
    """The training loss on fixed batches (no dropout, fixed noise), averaged."""
    model = StoryDiffusion.from_pretrained(folder)
    cfg = _config(folder, text_dropout=0.0, reference_dropout=0.0)
    stories = load_vist_split(toy_stories, "train").stories
    examples = [Example(story, k) for story in stories for k in range(1, 5)]
    losses = []
    for index in range(4):
        batch = make_batch(
            model, examples[index * 8 : (index + 1) * 8], cfg, torch.Generator().manual_seed(index)
        )
        with torch.no_grad():
            losses.append(model(**batch, reference_timestep_divisor=cfg.reference_timestep_divisor).item())
    return sum(losses) / len(losses)


@pytest.fixture(scope="module")
def trained(tiny_sd, toy_stories, tmp_path_factory):
    out = tmp_path_factory.mktemp("storygen") / "run"
    train(StoryGenRun(_config(tiny_sd), toy_stories, out))
    return out


def test_training_reduces_the_loss_and_trains_only_the_new_layers(trained, tiny_sd, toy_stories):
    assert fixed_batch_loss(trained, toy_stories) < 0.97 * fixed_batch_loss(tiny_sd, toy_stories)
    base_unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").state_dict()
    trained_unet = UNet2DConditionModel.from_pretrained(trained, subfolder="unet").state_dict()
    assert all(torch.equal(base_unet[name], trained_unet[name]) for name in base_unet)
    model = StoryDiffusion.from_pretrained(trained)
    assert any(layer.to_out.weight.abs().sum() > 0 for layer in model.context_layers.values())
    log = read_log(trained / "train_log.jsonl")
    assert [r["step"] for r in log] == list(range(1, 16))
    for name in ("config.yaml", "context_layers.safetensors", "story_model.json", "model_index.json"):
        assert (trained / name).is_file()


def test_saved_model_reproduces_its_outputs(trained, tmp_path):
    first = FrameGenerator.from_config(_config(trained))
    image = first.generate("A red circle waves.", REFERENCES[:2], REFERENCE_TEXTS[:2], seed=4).image
    first.model.save_pretrained(tmp_path / "copy")
    again = FrameGenerator.from_config(_config(tmp_path / "copy")).generate(
        "A red circle waves.", REFERENCES[:2], REFERENCE_TEXTS[:2], seed=4
    )
    assert np.array_equal(np.asarray(image), np.asarray(again.image))
    plain = first.generate("A red circle waves.", seed=4).image
    assert not np.array_equal(
        np.asarray(image), np.asarray(plain)
    )  # the trained context does change the frame


def test_a_folder_trained_as_storygen_refuses_the_memory_context(trained):
    with pytest.raises(StorypipeError, match="trained with generator.context='storygen'"):
        StoryDiffusion.from_pretrained(trained, context="memory")


def test_resume_after_a_crash_reproduces_the_uninterrupted_losses(
    tiny_sd, toy_stories, tmp_path, monkeypatch
):
    cfg = _config(tiny_sd, max_steps=4, checkpoint_every=2, batch_size=2)
    train(StoryGenRun(cfg, toy_stories, tmp_path / "straight"))
    expected = read_log(tmp_path / "straight" / "train_log.jsonl")

    crash_after_step(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        train(StoryGenRun(cfg, toy_stories, tmp_path / "resumed"))
    # The checkpoint keeps the trainable context layers, never the frozen SD components.
    checkpoint = tmp_path / "resumed" / "checkpoints" / "step_00000002"
    saved = torch.load(checkpoint / "model_0.pt", weights_only=True)
    assert saved and all(name.startswith("context_layers.") for name in saved), sorted(saved)
    monkeypatch.undo()
    train(StoryGenRun(cfg, toy_stories, tmp_path / "resumed", resume=True))
    resumed = read_log(tmp_path / "resumed" / "train_log.jsonl")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in expected], rel=1e-5)


def test_unet_lora_option_trains_and_saves_a_plain_unet(tiny_sd, toy_stories, tmp_path):
    out = tmp_path / "lora"
    train(StoryGenRun(_config(tiny_sd, max_steps=2, unet_lora_rank=2, learning_rate=1e-2), toy_stories, out))
    base_unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").state_dict()
    trained_unet = UNet2DConditionModel.from_pretrained(out, subfolder="unet").state_dict()
    assert base_unet.keys() == trained_unet.keys()  # LoRA fused in: still a plain SD UNet
    changed = [name for name in base_unet if not torch.equal(base_unet[name], trained_unet[name])]
    assert changed and all("attn" in name for name in changed)


def test_empty_split_is_a_clear_error(tiny_sd, tmp_path):
    data = tmp_path / "one-story"
    generate_shapestories(data, ToyDataConfig(stories=1, image_size=32))  # val and test are empty
    with pytest.raises(DataError, match="no usable story in split 'test'"):
        train(StoryGenRun(_config(tiny_sd), data, tmp_path / "x", split="test"))


def test_gradient_checkpointing_does_not_change_the_losses(tiny_sd, toy_stories, tmp_path):
    losses = []
    for checkpointing in (False, True):
        out = tmp_path / f"gc-{checkpointing}"
        train(
            StoryGenRun(_config(tiny_sd, max_steps=2, gradient_checkpointing=checkpointing), toy_stories, out)
        )
        losses.append([record["loss"] for record in read_log(out / "train_log.jsonl")])
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
