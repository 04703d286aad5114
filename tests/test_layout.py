"""The package boundaries of DEVELOPERS.md: stages import `pipeline`, never each other; one module wires them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("llava_ft", "storygen_ft", "eval")
WIRING = ROOT / "pipeline" / "wiring.py"


def _imported_top_level_packages(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("stage", STAGES)
def test_stages_never_import_each_other(stage):
    others = set(STAGES) - {stage}
    for path in (ROOT / stage).rglob("*.py"):
        assert not _imported_top_level_packages(path) & others, f"{path} imports another stage"


def test_only_the_wiring_module_imports_the_stages():
    importers = {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "pipeline").rglob("*.py")
        if _imported_top_level_packages(path) & set(STAGES)
    }
    assert importers == {"pipeline/wiring.py"}
