"""cilia.xds exports what __all__ lists and imports nothing else of cilia (its gRPC server helper
is cilia.xds.grpcserver)."""

from __future__ import annotations

import ast
from pathlib import Path

import cilia.xds as xds


def test_all_matches_public_names() -> None:
    public = {name for name in vars(xds) if not name.startswith("_")}
    modules = {name for name, value in vars(xds).items() if type(value).__name__ == "module"}
    assert set(xds.__all__) == public - modules


def test_imports_nothing_else_of_cilia() -> None:
    for path in Path(xds.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                outside = name.split(".")[0] == "cilia" and name != "cilia.xds" and not name.startswith("cilia.xds.")
                assert not outside, f"{path.name} imports {name}"
