"""One entry point to decide an L7 request against an entry's L7 policy.

Used by ``cilia policy trace`` and by the data-path parsers alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

from ..flows import DNSRequest, GenericL7Request, HTTPRequest, KafkaRequest, L7Request
from ..mapstate import L7Policy, RuleOrigin
from ..model import DNSRule, GenericL7Rule, HTTPRule, KafkaRule, L7Rule
from . import dns, http, kafka
from .registry import L7Registry, default_registry


@dataclass(frozen=True, slots=True)
class L7Verdict:
    allowed: bool
    matched: tuple[tuple[L7Rule, RuleOrigin], ...]  # the rules that allowed it
    reason: str


def describe_rule(protocol: str, rule: L7Rule, registry: L7Registry | None = None) -> str:
    if isinstance(rule, HTTPRule):
        return http.describe(rule)
    if isinstance(rule, KafkaRule):
        return kafka.describe(rule)
    if isinstance(rule, DNSRule):
        return dns.describe(rule)
    proto = (registry or default_registry()).get(protocol)
    describe = getattr(proto, "describe", None)
    if describe is not None:
        return str(describe(rule.as_dict()))
    return " ".join(f"{k}={v}" for k, v in rule.fields) or "{}"


def evaluate(policy: L7Policy, request: L7Request, registry: L7Registry | None = None) -> L7Verdict:
    if request.protocol != policy.protocol:
        return L7Verdict(False, (), f"this port is parsed as {policy.protocol}, not {request.protocol}")
    if policy.allow_all:
        return L7Verdict(True, (), f"every {policy.protocol} request is allowed here")
    rules = [r for r, _ in policy.rules]
    origin_of = {id(r): o for r, o in policy.rules}
    matched: Sequence[L7Rule]
    if isinstance(request, HTTPRequest):
        matched = http.evaluate(cast(list[HTTPRule], rules), request)
    elif isinstance(request, KafkaRequest):
        matched = kafka.evaluate(cast(list[KafkaRule], rules), request)
    elif isinstance(request, DNSRequest):
        matched = dns.evaluate(cast(list[DNSRule], rules), request)
    else:
        assert isinstance(request, GenericL7Request)
        proto = (registry or default_registry()).get(policy.protocol)
        if proto is None:
            return L7Verdict(False, (), f"no parser named {policy.protocol!r} is installed")
        fields = request.as_dict()
        matched = [r for r in cast(list[GenericL7Rule], rules) if proto.matches(r.as_dict(), fields)]
    pairs = tuple((r, origin_of[id(r)]) for r in matched)
    if pairs:
        return L7Verdict(True, pairs, "allowed by " + "; ".join(
            describe_rule(policy.protocol, r, registry) for r in matched))
    return L7Verdict(False, (), f"no {policy.protocol} rule matches")
