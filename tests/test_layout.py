"""The package layering of DEVELOPERS.md, checked on every import statement in the tree.

- ``pipeline`` (the shared core) imports none of the other packages;
- the stages ``llava_ft``, ``storygen_ft`` and ``eval`` import ``pipeline`` only: never each other, never
  the toy trainers, never the app layer;
- ``toy`` (the toy-only models' trainers) imports ``pipeline`` and ``eval``, whose measuring models and
  baselines it trains;
- ``storypipe`` (the app layer) may import everything.

Every import counts: top-level ones, deferred ones inside functions, relative ones, and
``importlib.import_module("...")`` calls with a literal name.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ALLOWED_IMPORTS = {
    "pipeline": set(),
    "llava_ft": {"pipeline"},
    "storygen_ft": {"pipeline"},
    "eval": {"pipeline"},
    "toy": {"pipeline", "eval"},
    "storypipe": {"pipeline", "llava_ft", "storygen_ft", "eval", "toy"},
}
PACKAGES = set(ALLOWED_IMPORTS)


def imported_modules(path: Path, package_root: Path) -> set[str]:
    """Absolute names of every module ``path`` imports, wherever the import statement stands."""
    module = path.relative_to(package_root).with_suffix("").parts
    if module[-1] == "__init__":
        module = module[:-1] + ("__init__",)  # a package's relative imports start from the package itself
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing module's package
                base = module[: len(module) - node.level]
                names.add(".".join([*base, *([node.module] if node.module else [])]))
            elif node.module:
                names.add(node.module)
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names.add(node.args[0].value)
    return names


def layering_violations(package_root: Path) -> list[str]:
    """``"file imports module"`` for every import that crosses the layering the wrong way."""
    violations = []
    for package, allowed in ALLOWED_IMPORTS.items():
        for path in sorted((package_root / package).rglob("*.py")):
            for name in sorted(imported_modules(path, package_root)):
                target = name.split(".")[0]
                if target in PACKAGES and target != package and target not in allowed:
                    violations.append(f"{path.relative_to(package_root)} imports {name}")
    return violations


def test_the_tree_follows_the_layering():
    assert layering_violations(ROOT) == []


def test_every_package_of_the_layering_exists():
    for package in PACKAGES:
        assert (ROOT / package / "__init__.py").is_file(), package


@pytest.mark.parametrize(
    "file, bad_import",
    [
        (
            "pipeline/data/vist.py",
            "    from storypipe.wiring import StorypipeConfig",
        ),  # deferred, deep in the core
        ("pipeline/orchestrator.py", "from eval import runner"),
        ("pipeline/data/shapestories.py", "from ...llava_ft import model"),  # relative, two levels up
        ("llava_ft/train.py", "    import storygen_ft.model"),
        ("eval/runner.py", "from toy import builders"),
        ("storygen_ft/model.py", "importlib.import_module('storypipe.cli')"),
        ("toy/clip.py", "    from llava_ft.model import load_llava"),
    ],
)
def test_one_bad_import_anywhere_is_caught(tmp_path, file, bad_import):
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / file
    indented = bad_import.startswith(" ")
    addition = f"\n\ndef _added():\n{bad_import}\n" if indented else f"\n{bad_import}\n"
    target.write_text(target.read_text(encoding="utf-8") + addition, encoding="utf-8")

    violations = layering_violations(tmp_path)
    assert len(violations) == 1 and violations[0].startswith(file), violations
