"""storypipe's shared layer: story types, config, datasets, prompts, and the orchestrator.

The stage packages (``llava_ft``, ``storygen_ft``, ``eval``) import this package and never each
other; ``pipeline.wiring`` is the one module that brings them together.
"""

__version__ = "0.1.0"
