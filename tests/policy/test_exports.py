"""cilia.policy's public surface is deliberate: __all__ lists exactly what it exports."""

from __future__ import annotations

import cilia.policy as policy


def test_all_matches_public_names() -> None:
    public = {name for name in vars(policy) if not name.startswith("_")}
    modules = {name for name, value in vars(policy).items() if type(value).__name__ == "module"}
    assert set(policy.__all__) == public - modules
    assert len(policy.__all__) == len(set(policy.__all__))
