"""The toy models: pretraining from scratch (both bases), and the shipped weights telling a story."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from eval.classifier import FrameClassifier
from llava_ft.config import CaptionerTrainConfig, TinyLlavaSettings
from llava_ft.model import build_tiny_llava, load_llava
from llava_ft.train import FinetuneRun, train
from pipeline.errors import StorypipeError
from pipeline.training import read_log
from storygen_ft.config import GeneratorConfig, GeneratorPretrainConfig, TinyDiffusionSettings
from storygen_ft.model import STORY_MODEL_FILE, StoryDiffusion
from storygen_ft.pretrain import PretrainRun, pretrain
from storypipe.cli import app
from tests.crash import crash_after_step
from tests.llava_fixtures import tiny_captioner_config

REPO = Path(__file__).resolve().parent.parent
SEED_IMAGE = REPO / "examples" / "seed.png"
SEED_CAPTION = "Rosa waved hello in the green meadow."  # Rosa is the red circle


def test_pretrain_llava_trains_every_parameter_of_a_fresh_base(llava_samples, tmp_path):
    settings = TinyLlavaSettings(vision_layers=2, text_layers=1)
    cfg = tiny_captioner_config(tmp_path / "unused-base")
    cfg.tiny = settings
    cfg.pretrain = CaptionerTrainConfig(
        max_steps=12, batch_size=2, gradient_accumulation_steps=1, learning_rate=5e-3, warmup_steps=0,
        checkpoint_every=1000, eval_every=1000, eval_fraction=0.0,
    )  # fmt: skip
    out = train(
        FinetuneRun(cfg, "caption", llava_samples / "description.json", llava_samples / "images",
                    tmp_path / "base", full_parameters=True)
    )  # fmt: skip
    trained, _ = load_llava(out)  # a whole model folder, not an adapter
    initial, _ = load_llava(build_tiny_llava(tmp_path / "init", settings))
    init_state = initial.state_dict()
    changed = {
        name for name, value in trained.state_dict().items() if not torch.equal(value, init_state[name])
    }
    # Every part moved: the vision tower, the projector and the language model.
    for part in ("vision_tower", "multi_modal_projector", "language_model"):
        assert any(part in name for name in changed), part
    losses = [record["loss"] for record in read_log(out / "train_log.jsonl")]
    assert len(losses) == 12 and losses[-1] < losses[0]


def test_pretraining_without_its_settings_is_a_clear_error(llava_samples, tmp_path):
    cfg = tiny_captioner_config(tmp_path / "base")  # no captioner.pretrain / captioner.tiny
    with pytest.raises(StorypipeError, match="captioner.pretrain and captioner.tiny"):
        train(FinetuneRun(cfg, "caption", llava_samples / "description.json", llava_samples / "images",
                          tmp_path / "out", full_parameters=True))  # fmt: skip


def tiny_pretrain_config(tmp_path, resolution: int, channels: tuple[int, int], **pretrain) -> GeneratorConfig:
    """A pretrain-diffusion config with a tiny VAE and UNet (no attention on level 0, like the toy preset)."""
    return GeneratorConfig(
        base_model=str(tmp_path / "unused"),
        resolution=resolution,
        tiny=TinyDiffusionSettings(
            block_channels=channels, vae_channels=channels, cross_attention_dim=16, attention_head_dim=8,
            levels_without_attention=1, norm_groups=4, vae_mid_attention=False,
        ),
        pretrain=GeneratorPretrainConfig(**pretrain),
    )  # fmt: skip


def test_pretrain_diffusion_learns_a_vae_and_a_unet_into_a_plain_sd_folder(toy_stories, tmp_path):
    cfg = tiny_pretrain_config(
        tmp_path, resolution=32, channels=(16, 32), vae_steps=25, vae_batch_size=8, vae_learning_rate=3e-3,
        unet_steps=4, batch_size=4, warmup_steps=0, checkpoint_every=1000,
    )  # fmt: skip
    out = pretrain(PretrainRun(cfg, toy_stories, tmp_path / "base"))
    assert (out / "model_index.json").is_file() and not (out / STORY_MODEL_FILE).exists()
    assert not (out / "checkpoints").exists()
    log = read_log(out / "train_log.jsonl")
    vae_mse = [r["mse"] for r in log if r["phase"] == "vae"]
    assert len(vae_mse) == 25 and sum(vae_mse[-5:]) < sum(vae_mse[:5])  # the VAE learned
    assert [r["step"] for r in log if r["phase"] == "unet"] == [26, 27, 28, 29]
    model = StoryDiffusion.from_pretrained(out)  # loads as a base; context layers are added fresh
    assert model.vae.config.scaling_factor != pytest.approx(0.18215)  # set from the latents' spread
    assert model.unet.down_blocks[0].__class__.__name__ == "DownBlock2D"  # no attention on level 0


@pytest.mark.parametrize("crash_step", [3, 7], ids=["in-the-vae-phase", "in-the-unet-phase"])
def test_pretrain_diffusion_resumes_after_a_crash_with_the_uninterrupted_losses(
    toy_stories, tmp_path, monkeypatch, crash_step
):
    cfg = tiny_pretrain_config(
        tmp_path, resolution=16, channels=(8, 16), vae_steps=4, vae_batch_size=4, unet_steps=4, batch_size=4,
        warmup_steps=1, checkpoint_every=2, text_dropout=0.5, story_caption_probability=0.5,
    )  # fmt: skip
    straight = pretrain(PretrainRun(cfg, toy_stories, tmp_path / "straight"))
    expected = read_log(straight / "train_log.jsonl")

    crash_after_step(monkeypatch, crash_step)  # the newest checkpoint is the step before
    with pytest.raises(KeyboardInterrupt):
        pretrain(PretrainRun(cfg, toy_stories, tmp_path / "resumed"))
    monkeypatch.undo()
    with pytest.raises(StorypipeError, match="pass --resume"):
        pretrain(PretrainRun(cfg, toy_stories, tmp_path / "resumed"))
    resumed_dir = pretrain(PretrainRun(cfg, toy_stories, tmp_path / "resumed", resume=True))
    resumed = read_log(resumed_dir / "train_log.jsonl")

    assert [r["step"] for r in resumed] == list(range(1, 9))  # the crashed step ran again, once
    for want, got in zip(expected, resumed, strict=True):
        assert got["phase"] == want["phase"]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-6)
    want_model, got_model = (
        StoryDiffusion.from_pretrained(straight),
        StoryDiffusion.from_pretrained(resumed_dir),
    )
    for part in ("unet", "vae"):
        want, got = getattr(want_model, part).state_dict(), getattr(got_model, part).state_dict()
        assert all(torch.allclose(want[name], got[name], atol=1e-6) for name in want), part


def test_pretrain_diffusion_needs_its_settings(toy_stories, tmp_path):
    with pytest.raises(StorypipeError, match="generator.pretrain and generator.tiny"):
        pretrain(PretrainRun(GeneratorConfig(base_model="x"), toy_stories, tmp_path / "out"))


def test_shipped_toy_models_keep_the_seed_character_in_frame_two(tmp_path, monkeypatch):
    """The shipped weights, end to end on the CPU: the generated frame 2 still shows the seed's Rosa."""
    monkeypatch.chdir(REPO)  # the toy preset names its models relative to the repository
    out = tmp_path / "story"
    result = CliRunner().invoke(app, ["generate", "--preset", "toy", "--image", str(SEED_IMAGE),
                                      "--caption", SEED_CAPTION, "--frames", "3", "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    classifier = FrameClassifier.from_pretrained(REPO / "models" / "toy" / "classifier")
    seed, second = (Image.open(out / "frames" / f"frame_0{k}.png") for k in (0, 1))
    assert "Rosa" in classifier.predict([seed])[0]["characters"]  # the classifier itself sees her
    assert "Rosa" in classifier.predict([second])[0]["characters"]
