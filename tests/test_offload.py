"""runtime.offload on the CPU: the same hooks as on a GPU (execution device cpu), the same outputs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from accelerate.hooks import CpuOffload
from peft import LoraConfig, get_peft_model
from PIL import Image

from llava_ft.captioners import Captioners
from llava_ft.model import load_llava
from pipeline.config import RuntimeConfig, load_config
from pipeline.errors import ConfigError, InvalidConfigValue
from pipeline.offload import Placement, execution_device
from storygen_ft.config import GeneratorConfig
from storygen_ft.generator import FrameGenerator
from storygen_ft.model import StoryDiffusion
from storypipe import wiring
from storypipe.config import StorypipeConfig, preset_path, resolve_config
from tests.llava_fixtures import CAPTIONS, NEXT_CAPTIONS, frame_images, tiny_captioner_config

CPU = torch.device("cpu")
REFERENCES = [Image.new("RGB", (32, 32), colour) for colour in ((200, 20, 20), (20, 20, 200))]
REFERENCE_TEXTS = ["A red circle jumps.", "A blue square runs."]


# --------------------------------------------------------------------------------------------
# The generator
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["storygen", "memory"])
def sd_config(request, tiny_sd, tmp_path_factory):
    """The tiny SD with random (non-zero) context layers saved beside it, so the references change the
    frame and the offloaded context layers really take part."""
    model = StoryDiffusion.from_pretrained(tiny_sd, context=request.param)
    rng = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.context_layers.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=rng) * 0.2)
    folder = model.save_pretrained(tmp_path_factory.mktemp("offload") / request.param)
    return GeneratorConfig(
        base_model=str(folder), context=request.param, resolution=32, num_inference_steps=3
    )


def _generator(cfg: GeneratorConfig, offload: str) -> FrameGenerator:
    return FrameGenerator.from_config(cfg, device="cpu", offload=offload)


def _frames(generator: FrameGenerator) -> list[np.ndarray]:
    """A frame with two references (features per step), and an img2img edit with fast-mode features."""
    story = generator.generate("A red circle waves.", REFERENCES, REFERENCE_TEXTS, seed=1)
    edit = generator.generate(
        "A blue square waves.", REFERENCES[:1], REFERENCE_TEXTS[:1], seed=2,
        init_image=REFERENCES[1], strength=0.6, reference_features="once",
    )  # fmt: skip
    return [np.asarray(story.image), np.asarray(edit.image)]


@pytest.fixture(scope="module")
def plain_frames(sd_config):
    generator = _generator(sd_config, "none")
    plain = np.asarray(generator.generate("A red circle waves.", seed=1).image)
    frames = _frames(generator)
    assert not np.array_equal(plain, frames[0])  # the context layers take part
    return frames


@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_offloaded_generator_gives_the_same_frames(sd_config, plain_frames, offload):
    frames = _frames(_generator(sd_config, offload))
    assert all(np.array_equal(a, b) for a, b in zip(frames, plain_frames, strict=True))


def test_model_offload_chains_the_components_in_execution_order(sd_config):
    model = _generator(sd_config, "model").model
    components = [model.text_encoder, model.unet, model.vae]
    for component in components:
        assert isinstance(component._hf_hook, CpuOffload)
        assert torch.device(component._hf_hook.execution_device) == CPU
    hooks = model.placement.hooks
    assert [hook.model for hook in hooks] == components
    assert hooks[0].hook.prev_module_hook is None
    assert hooks[1].hook.prev_module_hook is hooks[0] and hooks[2].hook.prev_module_hook is hooks[1]
    assert model.device == CPU


class CountingPlacement(Placement):
    """A placement that counts its offloads (on the CPU the modules stay put either way)."""

    offloads = 0

    def offload(self) -> None:
        self.offloads += 1
        super().offload()


def test_the_generator_frees_the_gpu_before_the_unet_and_after_each_frame(sd_config):
    generator = _generator(sd_config, "model")
    generator.model.placement = CountingPlacement(**vars(generator.model.placement))
    generator.generate("A red circle waves.", REFERENCES, REFERENCE_TEXTS, seed=1)
    assert generator.model.placement.offloads == 2  # the encoders done, then the frame done


def test_sequential_offload_streams_every_component_from_meta_parameters(sd_config):
    model = _generator(sd_config, "sequential").model
    for component in (model.text_encoder, model.unet, model.vae, model.context_layers):
        assert {p.device.type for p in component.parameters()} == {"meta"}
        assert execution_device(component) == CPU
    assert model.device == CPU  # where noise and latents go, not the parameters' meta device
    assert model.dtype == torch.float32


def test_no_offload_attaches_no_hook(sd_config):
    model = _generator(sd_config, "none").model
    assert not any(hasattr(module, "_hf_hook") for module in model.modules())
    assert execution_device(model) is None and model.device == CPU


# --------------------------------------------------------------------------------------------
# The captioners
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def captioner_config(tiny_llava, tmp_path_factory):
    """The tiny LLaVA with a random (non-zero) story adapter, and sampling on: the adapter and the seeded
    RNG both take part under offload."""
    folder = tmp_path_factory.mktemp("offload-adapter") / "story"
    base, _ = load_llava(tiny_llava)
    torch.manual_seed(0)
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)", init_lora_weights=False,
        task_type="CAUSAL_LM",
    )  # fmt: skip
    get_peft_model(base, lora).save_pretrained(folder)
    cfg = tiny_captioner_config(tiny_llava)
    return dataclasses.replace(cfg, story_adapter=str(folder), temperature=1.0, top_p=1.0, max_new_tokens=8)


def _captions(captioners: Captioners, images) -> list[list[str]]:
    return [
        captioners.next_story_captions(images, list(CAPTIONS), seeds=[3, 3]),  # the adapter
        captioners.describe_batch(images, list(CAPTIONS), list(NEXT_CAPTIONS), seeds=[4, 4]),  # zero-shot
    ]


@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_offloaded_captioners_give_the_same_captions(captioner_config, llava_samples, offload):
    images = frame_images(llava_samples)
    plain = _captions(Captioners.from_config(captioner_config), images)
    offloaded = Captioners.from_config(captioner_config, offload=offload)
    base = offloaded.model.get_base_model()  # the LLaVA, whose forward generate calls
    if offload == "model":
        assert isinstance(base._hf_hook, CpuOffload) and offloaded.placement.hooks[0].model is base
    else:
        assert {p.device.type for p in base.parameters()} == {"meta"}
    assert execution_device(offloaded.model) == CPU and offloaded.device == CPU
    assert _captions(offloaded, images) == plain
    assert _captions(offloaded.with_temperature(1.0), images) == plain  # the hooks come along


def test_the_captioners_go_back_to_the_cpu_after_each_call(captioner_config, llava_samples):
    captioners = Captioners.from_config(captioner_config, offload="model")
    captioners.placement = CountingPlacement(**vars(captioners.placement))
    _captions(captioners, frame_images(llava_samples))
    assert captioners.placement.offloads == 2


def test_a_four_bit_captioner_cannot_be_offloaded(captioner_config):
    """Refused before anything loads: bitsandbytes weights stay where they load."""
    for offload in ("model", "sequential"):
        with pytest.raises(
            ConfigError, match=rf"captioner.load_in_4bit.*runtime.offload={offload}.*load_in_4bit=false"
        ):
            Captioners.from_config(captioner_config, load_in_4bit=True, offload=offload)


# --------------------------------------------------------------------------------------------
# The config and the wiring
# --------------------------------------------------------------------------------------------


def test_a_bad_offload_value_names_the_key(tmp_path):
    expected = r"runtime.offload must be one of 'none', 'model', 'sequential', got 'gpu'"
    with pytest.raises(ConfigError, match=rf"^--set runtime.offload=gpu: {expected}"):
        load_config(StorypipeConfig, preset_path("tiny"), ["runtime.offload=gpu"])
    path = tmp_path / "cfg.yaml"
    path.write_text("runtime:\n  offload: true\n")
    with pytest.raises(ConfigError, match=r"cfg.yaml: runtime.offload must be one of"):
        load_config(StorypipeConfig, path)
    with pytest.raises(InvalidConfigValue, match="offload"):
        RuntimeConfig(offload="gpu")  # type: ignore[arg-type]


def test_wiring_offloads_the_generator_and_an_unquantised_captioner(tiny_sd, tiny_llava):
    overrides = [
        "runtime.device=cpu", "runtime.offload=model", f"generator.base_model={tiny_sd}",
        f"captioner.base_model={tiny_llava}",
    ]  # fmt: skip
    cfg = resolve_config(preset="tiny", overrides=overrides)
    generator = wiring.load_frame_generator(cfg)
    assert generator.model.placement.mode == "model" and len(generator.model.placement.hooks) == 3
    assert wiring.load_captioners(cfg).placement.mode == "model"


def test_with_a_four_bit_captioner_offload_applies_to_the_generator_only():
    cfg = resolve_config(preset="vist", overrides=["runtime.offload=sequential"])
    assert cfg.captioner.load_in_4bit
    assert wiring.captioner_offload(cfg) == "none"
    unquantised = resolve_config(
        preset="vist", overrides=["runtime.offload=sequential", "captioner.load_in_4bit=false"]
    )
    assert wiring.captioner_offload(unquantised) == "sequential"
