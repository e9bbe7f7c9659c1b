"""cilia.xds exports what __all__ lists and depends on no other cilia package."""

from __future__ import annotations

import ast
from pathlib import Path

import cilia.xds as xds


def test_all_matches_public_names() -> None:
    public = {name for name in vars(xds) if not name.startswith("_")}
    modules = {name for name, value in vars(xds).items() if type(value).__name__ == "module"}
    assert set(xds.__all__) == public - modules


def test_imports_no_other_cilia_package() -> None:
    for path in Path(xds.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                assert not node.module.startswith("cilia.") or node.module.startswith("cilia.xds"), path
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("cilia.") and not a.name.startswith("cilia.xds") for a in node.names)
