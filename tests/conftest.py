"""Shared test set-up: everything runs offline, so an accidental hub download fails loudly."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402  (the environment must be set before any Hugging Face import)

from llava_ft.config import TinyLlavaSettings  # noqa: E402
from llava_ft.model import build_tiny_llava  # noqa: E402
from tests.llava_fixtures import write_llava_samples  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def storypipe_cache(tmp_path_factory):
    """storypipe's cache (where the tiny preset builds its models) in a temporary folder, not the user's."""
    folder = tmp_path_factory.mktemp("storypipe-cache")
    os.environ["STORYPIPE_CACHE"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory):
    """A tiny LLaVA saved as a normal model folder (built offline, loaded through from_pretrained)."""
    return build_tiny_llava(tmp_path_factory.mktemp("models") / "tiny-llava", TinyLlavaSettings())


@pytest.fixture(scope="session")
def llava_samples(tmp_path_factory):
    return write_llava_samples(tmp_path_factory.mktemp("llava-data"))


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """A tiny SD-1.5-layout model folder (built offline, loaded through from_pretrained)."""
    from storygen_ft.config import TinyDiffusionSettings
    from storygen_ft.model import build_tiny_diffusion

    return build_tiny_diffusion(tmp_path_factory.mktemp("models") / "tiny-sd", TinyDiffusionSettings())


@pytest.fixture(scope="session")
def toy_stories(tmp_path_factory):
    """A small ShapeStories dataset in VIST layout."""
    from pipeline.config import ToyDataConfig
    from pipeline.data.shapestories import generate_shapestories

    out = tmp_path_factory.mktemp("toy")
    generate_shapestories(
        out, ToyDataConfig(stories=10, seed=1, image_size=32, val_fraction=0.1, test_fraction=0.1)
    )
    return out
