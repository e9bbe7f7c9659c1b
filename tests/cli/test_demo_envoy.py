"""`make demo` end to end: Cilium's Star Wars steps as real traffic through a real Envoy."""

from __future__ import annotations

import os
import re
import subprocess

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
    mode = "network namespaces" if os.geteuid() == 0 else "loopback addresses"  # CI runs as root
    assert f"mode: Envoy via the cilia agent ({mode})" in out
    envoy_part, observed = out.split("mode: Envoy via the cilia agent", 1)[1].split("-- what Envoy logged", 1)
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
    # the agent's flow log names the ships, their identities and the rule that denied the PUT
    assert re.search(r"DENIED .*\(tiefighter, id \d+\) -> .*\(deathstar, id \d+\) http PUT "
                     r".*/v1/exhaust-port -> 403  rule: default deny: default/rule1 ingress\[0\]\.toPorts\[0\] "
                     r"\(.*sw_l3_l4_l7_policy\.yaml:16\)",
                     observed), observed
    match = re.search(r"cilia agent \(pid (\d+)\) runs Envoy \(pid (\d+)\)", out)
    assert match, out
    assert _gone(int(match.group(1))) and _gone(int(match.group(2))), "the demo left its agent or Envoy running"
    leftovers = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "cilia-demo" not in leftovers


def test_demo_fails_loudly_when_envoy_cannot_run(capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CILIA_ENVOY_BINARY", "/nonexistent/envoy")  # the agent process inherits it
    assert demo.main() == 1
    out = capsys.readouterr().out
    assert "the Envoy part could not run" in out and "/nonexistent/envoy" in out
    assert "demo passed" not in out
