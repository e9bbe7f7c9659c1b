"""`make demo` end to end: Cilium's Star Wars steps as real traffic through a real Envoy."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from cilia import demo


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_demo_runs_the_starwars_guide_on_a_real_envoy(capsys: pytest.CaptureFixture[str]) -> None:
    code = demo.main()
    out = capsys.readouterr().out
    assert code == 0, out
    assert "mode: Envoy (loopback addresses)" in out
    envoy_part = out.split("mode: Envoy (loopback addresses)", 1)[1]
    requests = [" ".join(line.split()) for line in envoy_part.splitlines() if "->" in line]
    blocked = "blocked: connection closed by Envoy before any response [ok]"
    assert requests == [
        # 1. no policy
        "tiefighter POST /v1/request-landing -> 200 Ship landed [ok]",
        "xwing POST /v1/request-landing -> 200 Ship landed [ok]",
        # 2. sw_l3_l4_policy.yaml, 3. its exhaust port
        "tiefighter POST /v1/request-landing -> 200 Ship landed [ok]",
        f"xwing POST /v1/request-landing -> {blocked}",
        "tiefighter PUT /v1/exhaust-port -> 200 Panic: deathstar exploded [ok]",
        # 4. sw_l3_l4_l7_policy.yaml
        "tiefighter POST /v1/request-landing -> 200 Ship landed [ok]",
        "tiefighter PUT /v1/exhaust-port -> 403 Access denied [ok]",
        f"xwing POST /v1/request-landing -> {blocked}",
    ], out
    assert "UNEXPECTED" not in out
    match = re.search(r"Envoy \(pid (\d+)\)", out)
    assert match, out
    assert _gone(int(match.group(1))), "the demo left its Envoy running"


def test_demo_fails_loudly_when_envoy_cannot_run(capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("cilia.envoy.supervisor.envoy_binary", lambda: Path("/nonexistent/envoy"))
    assert demo.main() == 1
    out = capsys.readouterr().out
    assert "the Envoy part could not run" in out and "/nonexistent/envoy" in out
    assert "demo passed" not in out
