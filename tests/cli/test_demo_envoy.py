"""`make demo` end to end: Cilium's Star Wars steps as real traffic through a real Envoy, in
sidecar mode and (where the BPF datapath loads, as in CI) in BPF mode."""

from __future__ import annotations

import os
import re
import subprocess

import pytest
from helpers import require_bpf

from cilia import demo


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_demo_runs_the_starwars_guide_on_a_real_envoy(capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CILIA_DEMO_MODE", "sidecar")
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
    assert re.search(r"\S*tiefighter:\d+ \(ID:\d+\) -> \S*deathstar:80 \(ID:\d+\) http-request DROPPED \(HTTP/1.1 PUT "
                     r"\S*/v1/exhaust-port => 403\)  rule: default deny: "
                     r"default/rule1 ingress\[0\]\.toPorts\[0\] \(.*sw_l3_l4_l7_policy\.yaml:16\)",
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
    assert "part could not run" in out and "/nonexistent/envoy" in out
    assert "demo passed" not in out


def test_demo_in_bpf_mode_is_what_make_demo_runs_here(capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    require_bpf()
    monkeypatch.delenv("CILIA_DEMO_MODE", raising=False)
    code = demo.main()
    out = capsys.readouterr().out
    assert code == 0, out
    assert "## mode: BPF datapath" in out and "demo passed (bpf mode)" in out
    bpf_part = out.split("## mode: BPF datapath", 1)[1]
    requests = [" ".join(line.split()) for line in bpf_part.splitlines()
                if "->" in line and ("POST" in line or "PUT" in line) and "$" not in line]
    timeout = "no answer within 2s (curl would time out) [ok]"
    assert requests[:8] == [
        "tiefighter POST /v1/request-landing -> 200 Ship landed [ok]",
        "xwing POST /v1/request-landing -> 200 Ship landed [ok]",
        "tiefighter POST /v1/request-landing -> 200 Ship landed [ok]",
        f"xwing POST /v1/request-landing -> {timeout}",
        "tiefighter PUT /v1/exhaust-port -> 200 Panic: deathstar exploded [ok]",
        "tiefighter POST /v1/request-landing -> 200 Ship landed [ok]",
        "tiefighter PUT /v1/exhaust-port -> 403 Access denied [ok]",
        f"xwing POST /v1/request-landing -> {timeout}",
    ], out
    # cilia monitor, run beside the requests, showed the kernel dropping xwing with identities
    assert re.search(r"xx drop \(Policy denied\) by ingress policy of deathstar, identity \d+ \(xwing\) -> "
                     r"\d+ \(deathstar\): 10\.199\.0\.12:\d+ -> 10\.199\.0\.10:80 tcp", bpf_part), bpf_part
    assert re.search(r"Redirect\s+Ingress\s+\d+\s+\S*class=tiefighter\S*\s+80/TCP\s+1\d{4}", bpf_part), bpf_part
    assert re.search(r"tiefighter:\d+ \(ID:\d+\) .* http-request DROPPED \(HTTP/1.1 PUT \S*exhaust-port => 403\)",
                     bpf_part)
    assert "UNEXPECTED" not in out
    match = re.search(r"cilia agent \(pid (\d+)\) runs Envoy \(pid (\d+)\)", out)
    assert match and _gone(int(match.group(1))) and _gone(int(match.group(2)))
    assert "cilia-demo" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [p for p in os.listdir("/sys/fs/bpf") if p.startswith("cilia-demo")]
