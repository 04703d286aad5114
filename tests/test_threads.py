"""runtime.num_threads: torch's CPU threads while a pipeline call works, restored afterwards."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from pipeline.errors import ConfigError
from storypipe import StoryPipeline
from storypipe.config import resolve_config
from tests.fakes import FakeCaptioner, FakeIllustrator


class ThreadRecordingCaptioner(FakeCaptioner):
    """Records torch's thread count at each model call."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[int] = []

    def next_story_captions(self, images, captions, seeds=None):
        self.threads.append(torch.get_num_threads())
        return super().next_story_captions(images, captions, seeds)


def test_the_tiny_and_toy_presets_run_on_one_thread_and_vist_keeps_torchs_default():
    assert resolve_config(None, "tiny").runtime.cpu_thread_count() == 1
    assert resolve_config(None, "toy").runtime.cpu_thread_count() == 1
    assert resolve_config(None, "vist").runtime.cpu_thread_count() is None


@pytest.mark.parametrize("threads", [1, 2])
def test_pipeline_calls_run_with_the_configured_threads_and_restore_them(threads):
    cfg = resolve_config(None, "tiny", (f"runtime.num_threads={threads}",))
    captioner = ThreadRecordingCaptioner()
    pipe = StoryPipeline(cfg, captioner, FakeIllustrator())
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        pipe.caption(Image.new("RGB", (64, 64), (200, 20, 20)), "A red circle jumps.", seed=0)
        pipe.tell(Image.new("RGB", (64, 64), (20, 20, 200)), "A blue square runs.", frames=3, seed=0)
        assert captioner.threads and set(captioner.threads) == {threads}
        assert torch.get_num_threads() == 3  # restored
    finally:
        torch.set_num_threads(before)


def test_auto_leaves_torch_alone():
    cfg = resolve_config(None, "tiny", ("runtime.num_threads=auto",))
    captioner = ThreadRecordingCaptioner()
    before = torch.get_num_threads()
    StoryPipeline(cfg, captioner, FakeIllustrator()).caption(
        Image.new("RGB", (64, 64)), "A red circle jumps.", seed=0
    )
    assert captioner.threads == [before]


def test_a_bad_thread_count_names_the_key():
    with pytest.raises(ConfigError, match="runtime.num_threads"):
        resolve_config(None, "tiny", ("runtime.num_threads=0",))
    with pytest.raises(ConfigError, match="runtime.num_threads"):
        resolve_config(None, "tiny", ("runtime.num_threads=many",))
