"""storypipe's shared core: story types, config loading, data readers, prompts, the orchestrator and the
story folder.

It imports no stage (``llava_ft``, ``storygen_ft``, ``eval``, ``toy``) and not the app layer
(``storypipe``); they import it. ``tests/test_layout.py`` enforces the layering.
"""
