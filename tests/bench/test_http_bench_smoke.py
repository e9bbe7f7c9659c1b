"""The HTTP enforcement benchmark's core on a tiny load: its listeners enforce what they claim,
and its load generators really send load that passes or is denied as the policy says.

Behaviour only: no assertion here looks at a rate or a latency.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from bench import http_enforcement as bench

pytestmark = pytest.mark.skipif(shutil.which("wrk") is None or shutil.which("h2load") is None,
                                reason="wrk and h2load (Debian: wrk, nghttp2-client) are not installed")

RULES, SOURCES = 20, 50


@pytest.fixture(scope="module")
def rig() -> Iterator[bench.Rig]:
    with bench.rig(RULES, SOURCES) as r:
        yield r


@pytest.fixture
def tmp() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as name:
        yield Path(name)


def case(rig: bench.Rig, name: str) -> bench.Case:
    return next(c for c in rig.cases if c.name == name)


def load(rig: bench.Rig, c: bench.Case, tmp: Path) -> bench.Sample:
    before = rig.backend.served()
    if c.protocol == "h1":
        sample = bench.run_wrk(c, 1, 4, tmp)
    else:
        sample = bench.run_h2load(c, 1, 2, 2, tmp)
    sample.forwarded = rig.backend.served() - before
    return sample


def test_every_case_answers_and_the_policy_cases_enforce(rig: bench.Rig) -> None:
    names = [c.name for c in rig.cases]
    assert names == ["direct", "envoy-tcp", "envoy-hcm", "sw-l3l4", "sw-l7", "scale-l7", "rules-l7", "sources-l7",
                     "h2-direct", "h2-hcm", "h2-l7"]
    for c in rig.cases:
        bench.check(c)  # allowed request reaches the backend; denied path 403; stranger refused
    # the no-policy listeners really have no policy: the stranger gets an answer
    assert bench.request(case(rig, "envoy-hcm"), "PUT", "/v1/exhaust-port", bench.STRANGER) == (200, bench.BODY)
    assert not bench.refused(case(rig, "envoy-tcp"), bench.STRANGER)


def test_the_scale_matcher_tries_only_the_rules_the_path_prefix_allows(rig: bench.Rig) -> None:
    shape = rig.setup["scale-l7"]
    assert shape["rules"] == RULES and shape["sources"] == SOURCES
    # The loaded path's rule is the last of the sorted list, but the :path prefix map takes the
    # request straight to the bucket of its own prefix, where it is the only rule.
    assert shape["matched_rule_position"] == 1
    assert shape["source_ranges"] >= SOURCES


@pytest.mark.parametrize("name", ["sw-l7", "scale-l7", "h2-l7"])
def test_allowed_load_is_forwarded_in_full(rig: bench.Rig, tmp: Path, name: str) -> None:
    sample = load(rig, case(rig, name), tmp)
    assert sample.requests > 0
    assert (sample.non_2xx, sample.errors) == (0, 0)
    assert sample.forwarded >= sample.requests
    assert 0 < sample.p50_ms <= sample.p99_ms


@pytest.mark.parametrize("name", ["sw-l7", "h2-l7"])
def test_denied_load_never_reaches_the_backend(rig: bench.Rig, tmp: Path, name: str) -> None:
    c = case(rig, name)
    assert c.denied is not None
    denied = replace(c, method=c.denied[0], path=c.denied[1])
    sample = load(rig, denied, tmp)
    assert sample.requests > 0
    assert sample.forwarded == 0
    if c.protocol == "h1":
        assert sample.non_2xx == sample.requests  # every one a 403
    bench.check(c)  # and the allowed request still passes afterwards


def test_summary_measures_cost_against_the_no_policy_envoy() -> None:
    def result(c: bench.Case, rps: float, cpu_us: float) -> bench.CaseResult:
        return bench.CaseResult(c, [bench.Sample(rps, 1.0, 2.0, 10, 0, 0, forwarded=10, proxy_cpu_us=cpu_us)])

    hcm = bench.Case("envoy-hcm", "", "h1", "127.0.0.1", 1, "GET", "/")
    l7 = bench.Case("sw-l7", "", "h1", "127.0.0.1", 2, "GET", "/", baseline="envoy-hcm", target=True)
    rows = {r["case"]: r for r in bench.summarize([result(hcm, 1000.0, 40.0), result(l7, 950.0, 50.0)])}
    assert rows["sw-l7"]["cost"] == pytest.approx(0.05)
    assert rows["sw-l7"]["vs_envoy"] == pytest.approx(0.95)
    assert rows["sw-l7"]["cpu_cost"] == pytest.approx(0.2)  # 40 us instead of 50: a fifth less capacity
    assert "cost" not in rows["envoy-hcm"]
