"""storypipe: from one seed frame (an image and its story caption), write and draw the rest of the story.

This package is the app layer: the Python API (:class:`StoryPipeline`), the CLI (``storypipe``) and the
wiring. It is the one package that imports the stages (``llava_ft``, ``storygen_ft``, ``eval``, ``toy``);
they build on the shared core, ``pipeline``.
"""

from importlib.metadata import PackageNotFoundError, version

from pipeline.errors import InputError, StorypipeError
from pipeline.folder_lock import FolderInUse
from pipeline.orchestrator import StoryEvents
from pipeline.story import Frame, Story
from storypipe.api import StoryPipeline

try:
    __version__ = version("storypipe")
except PackageNotFoundError:  # a checkout that was never installed
    __version__ = "0+unknown"

__all__ = [
    "FolderInUse",
    "Frame",
    "InputError",
    "Story",
    "StoryEvents",
    "StoryPipeline",
    "StorypipeError",
    "__version__",
]
