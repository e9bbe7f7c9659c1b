"""RBAC matchers (Envoy's matcher API) for the network and HTTP RBAC filters.

Both filters get a matcher built here: the connection's *direct* source IP (never
X-Forwarded-For, which a client writes itself), or its destination on egress, goes through an IP
range trie holding every known prefix, so the longest prefix decides the identity as in the
ipcache, and the cost does not grow with the number of identities. ``world``'s 0.0.0.0/0
therefore never speaks for an endpoint that has its own /32. Under an identity's range sit its
HTTP rules: ORed rules, each an AND of header predicates on ``:method``, ``:path``,
``:authority`` (RE2 ``safe_regex``, which Envoy applies as a full match, the semantics
cilia.policy validates and traces with) and present/exact headers. In node mode a trie on the
endpoint's own address comes first and picks the endpoint's matcher.

Every RBAC action is named after the rule that decided: an allowed request after the HTTP rule
that matched (``<policy> <path> (<file>:<line>)``, the line of the rule under ``http:``), a denied
one after the policy whose HTTP rules it failed (``default deny: ...``) or ``no rule allows this
source``. Envoy puts the name in the RBAC filters' dynamic metadata, which is how access-log
records get their ``rule``.

Ranges and predicates are sorted by content (not by identity numbers, which depend on allocation
order), so equal policy gives byte-equal matchers.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from envoy.config.rbac.v3 import rbac_pb2
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as net_rbac_pb2
from envoy.extensions.matching.common_inputs.network.v3 import network_inputs_pb2
from envoy.type.matcher.v3 import http_inputs_pb2
from google.protobuf import message
from xds.core.v3 import cidr_pb2, extension_pb2
from xds.type.matcher.v3 import ip_pb2, matcher_pb2, regex_pb2, string_pb2

from cilia.envoy.resources import extension
from cilia.policy.mapstate import PolicyEntry, RuleOrigin
from cilia.policy.model import HTTPRule, IPNetwork

NO_RULE = "no rule allows this source"  # the action name for sources no rule allows on the port
NO_DESTINATION_RULE = "no rule allows this destination"  # egress: no rule allows the destination's identity
NO_ENDPOINT = "no proxied endpoint at this address"  # node mode: the connection belongs to no known endpoint
_ALLOWED = "allowed"  # the network RBAC's allow action: the HTTP RBAC names the rule


@dataclass(frozen=True, slots=True)
class Input:
    """A matcher input naming one side of the connection."""

    name: str
    config: message.Message


SOURCE = Input("envoy.matching.inputs.direct_source_ip", network_inputs_pb2.DirectSourceIPInput())
DESTINATION = Input("envoy.matching.inputs.destination_ip", network_inputs_pb2.DestinationIPInput())


@dataclass(frozen=True, slots=True)
class HTTPPolicy:
    """One identity's HTTP policy on a port: allowed outright by rule ``allow``, or by the first
    of ``rules`` (serialized predicate, rule name, literal prefix every path it matches starts
    with) that matches; otherwise denied as ``deny``."""

    allow: str | None
    rules: tuple[tuple[bytes, str, str], ...]
    deny: str
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.allow, self.rules, self.deny)))

    def __hash__(self) -> int:  # computed once: policies with many rules are grouped per identity
        return self._hash


def network_rbac(base: str, matcher: matcher_pb2.Matcher, shadow: bool,
                 enforce: matcher_pb2.Matcher | None = None) -> net_rbac_pb2.RBAC:
    """With ``shadow`` (an access log is set), the same matcher also runs as the shadow one: Envoy reports only shadow
    results in the connection's dynamic metadata (``shadow_engine_result``,
    ``shadow_effective_policy_id``), which is how the listener's log sees refusals and their
    rule name intact (the termination details have the name's spaces replaced by ``_``).
    ``enforce`` (audit mode) is what is enforced instead, while ``matcher`` only runs as the
    shadow: what it would refuse passes and is logged."""
    # No shadow_rules_stat_prefix: it would prefix the metadata keys as well.
    return net_rbac_pb2.RBAC(stat_prefix=f"{base}.rbac", matcher=enforce if enforce is not None else matcher,
                             shadow_matcher=matcher if shadow or enforce is not None else None)


def allow_everything() -> matcher_pb2.Matcher:
    """A matcher allowing every connection or request (what audit mode enforces)."""
    return matcher_pb2.Matcher(on_no_match=matcher_pb2.Matcher.OnMatch(action=_action(_ALLOWED, rbac_pb2.RBAC.ALLOW)))


def naming_rbac(base: str, prefix: str, side: Input, names: Sequence[tuple[Sequence[IPNetwork], str]],
                no_match: str) -> net_rbac_pb2.RBAC:
    """An RBAC filter that enforces nothing and names the connection: its shadow matcher's
    action is the name of the range ``side``'s address falls in (``no_match`` outside all), which
    Envoy puts in the connection's dynamic metadata as ``<prefix>shadow_effective_policy_id``.
    That is how the L7 service learns a connection's peer identity and local endpoint."""
    allow = allow_everything()
    ranges = [_range(prefixes, matcher_pb2.Matcher.OnMatch(action=_action(name, rbac_pb2.RBAC.ALLOW)))
              for prefixes, name in names if prefixes]
    shadow = _ip_tree(side, ranges, matcher_pb2.Matcher.OnMatch(action=_action(no_match, rbac_pb2.RBAC.ALLOW)))
    return net_rbac_pb2.RBAC(stat_prefix=f"{base}.{prefix}rbac", matcher=allow, shadow_matcher=shadow,
                             shadow_rules_stat_prefix=prefix)


class _Memo:
    """Matchers made for one ``universe`` object: the endpoints of one app share their policy and
    the prefixes it lists (the same objects), so their listeners' matchers are made once, not once
    per endpoint. Callers copy a matcher into the message they build (protobuf copies on assign)."""

    def __init__(self) -> None:
        # (id of the universe, key) -> (the universe, kept so its id stays its own; the matcher)
        self._made: dict[tuple[int, Any], tuple[Mapping[int, Sequence[IPNetwork]], matcher_pb2.Matcher]] = {}

    def get(self, universe: Mapping[int, Sequence[IPNetwork]], key: Any) -> matcher_pb2.Matcher | None:
        hit = self._made.get((id(universe), key))
        return hit[1] if hit is not None and hit[0] is universe else None

    def put(self, universe: Mapping[int, Sequence[IPNetwork]], key: Any,
            matcher: matcher_pb2.Matcher) -> matcher_pb2.Matcher:
        if len(self._made) >= 256:
            self._made.clear()
        self._made[(id(universe), key)] = (universe, matcher)
        return matcher


_MEMO = _Memo()


def allow_matcher(allowed: frozenset[int], universe: Mapping[int, Sequence[IPNetwork]], peer: Input,
                  no_rule: str) -> matcher_pb2.Matcher:
    """The network RBAC's: only peers whose identity is in ``allowed`` get past the first byte."""
    key = ("allow", allowed, peer.name, no_rule)
    if (done := _MEMO.get(universe, key)) is not None:
        return done
    allow = matcher_pb2.Matcher.OnMatch(action=_action(_ALLOWED, rbac_pb2.RBAC.ALLOW))
    return _MEMO.put(universe, key, _by_peer([(allowed, allow)] if allowed else [], universe, peer, no_rule))


def http_matcher(http: Mapping[int, HTTPPolicy], universe: Mapping[int, Sequence[IPNetwork]],
                 peer: Input, no_rule: str) -> matcher_pb2.Matcher:
    """Per distinct HTTP policy, the identities sharing it; a request passes if any rule matches,
    and the action that decides is named after the rule (or the policy it failed)."""
    key = ("http", tuple(sorted(http.items(), key=_first)), peer.name, no_rule)
    if (done := _MEMO.get(universe, key)) is not None:
        return done
    return _MEMO.put(universe, key, _http_matcher(http, universe, peer, no_rule))


def _first(item: tuple[int, HTTPPolicy]) -> int:
    return item[0]


def _http_matcher(http: Mapping[int, HTTPPolicy], universe: Mapping[int, Sequence[IPNetwork]],
                  peer: Input, no_rule: str) -> matcher_pb2.Matcher:
    by_policy: dict[HTTPPolicy, set[int]] = {}
    for ident, policy in http.items():
        by_policy.setdefault(policy, set()).add(ident)
    groups: list[tuple[Iterable[int], matcher_pb2.Matcher.OnMatch]] = []
    for policy, idents in by_policy.items():
        deny = matcher_pb2.Matcher.OnMatch(action=_action(policy.deny, rbac_pb2.RBAC.DENY))
        if policy.allow is not None:
            on_match = matcher_pb2.Matcher.OnMatch(action=_action(policy.allow, rbac_pb2.RBAC.ALLOW))
        elif not policy.rules:
            on_match = deny
        else:
            on_match = _rules_matcher(policy.rules, deny)
        groups.append((idents, on_match))
    return _by_peer(groups, universe, peer, no_rule)


TREE_MIN_RULES = 8  # below this, trying each rule costs no more than a prefix lookup


def _rules_matcher(rules: Sequence[tuple[bytes, str, str]], deny: matcher_pb2.Matcher.OnMatch
                   ) -> matcher_pb2.Matcher.OnMatch:
    """The first matching rule allows (named after it), else ``deny``.

    Envoy tries a rule list in order, so a request matching the 1,000th rule pays for all of them.
    With many rules, a ``:path`` prefix map (longest prefix wins) first picks the bucket of the
    longest rule prefix the path starts with; each bucket holds, in the list's order, every rule
    whose literal prefix that key starts with. Any rule that can match the path has a prefix the
    path starts with, no longer than the chosen key, so the bucket holds every candidate and the
    first match is the same rule the plain list finds. Rules without a literal prefix are in
    every bucket and in the fallback for paths no key starts."""
    def first_match(subset: Sequence[tuple[bytes, str, str]]) -> matcher_pb2.Matcher.OnMatch:
        return matcher_pb2.Matcher.OnMatch(matcher=matcher_pb2.Matcher(
            matcher_list=matcher_pb2.Matcher.MatcherList(matchers=[
                matcher_pb2.Matcher.MatcherList.FieldMatcher(
                    predicate=matcher_pb2.Matcher.MatcherList.Predicate.FromString(pred),
                    on_match=matcher_pb2.Matcher.OnMatch(action=_action(name, rbac_pb2.RBAC.ALLOW)))
                for pred, name, _ in subset]),
            on_no_match=deny))

    by_prefix: dict[str, list[int]] = {}
    for i, (_, _, prefix) in enumerate(rules):
        by_prefix.setdefault(prefix, []).append(i)
    keys = sorted(k for k in by_prefix if k)
    if len(rules) < TREE_MIN_RULES or not keys:
        return first_match(rules)
    buckets = {}
    for key in keys:
        members = sorted(i for n in range(len(key) + 1) for i in by_prefix.get(key[:n], ()))
        buckets[key] = first_match([rules[i] for i in members])
    unprefixed = [rules[i] for i in by_prefix.get("", ())]
    tree = matcher_pb2.Matcher.MatcherTree(
        input=extension("envoy.matching.inputs.request_headers",
                        http_inputs_pb2.HttpRequestHeaderMatchInput(header_name=":path")),
        prefix_match_map=matcher_pb2.Matcher.MatcherTree.MatchMap(map=buckets))
    return matcher_pb2.Matcher.OnMatch(matcher=matcher_pb2.Matcher(
        matcher_tree=tree, on_no_match=first_match(unprefixed) if unprefixed else deny))


_REGEX_SPECIAL = frozenset(".^$*+?()[]{}|\\")


def literal_prefix(pattern: str) -> str:
    """Text every full match of the RE2 ``pattern`` starts with; '' when it cannot tell cheaply."""
    if "|" in pattern:
        return ""  # an alternation may start anywhere
    out: list[str] = []
    i = 1 if pattern.startswith("^") else 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern) and not pattern[i + 1].isalnum():
            literal, i = pattern[i + 1], i + 2  # an escaped punctuation character is itself
        elif c not in _REGEX_SPECIAL:
            literal, i = c, i + 1
        else:
            break
        if i < len(pattern) and pattern[i] in "*?{":
            break  # the quantifier may make this character optional
        out.append(literal)
    return "".join(out)


def _by_peer(groups: Sequence[tuple[Iterable[int], matcher_pb2.Matcher.OnMatch]],
             universe: Mapping[int, Sequence[IPNetwork]], peer: Input, no_rule: str) -> matcher_pb2.Matcher:
    """The peer's IP → identity by longest prefix (an IP range trie), then that identity's ``on_match``.

    Every known prefix is in the trie, those of identities in no group with a DENY named
    ``no_rule``; all ranges are exclusive, so the most specific prefix decides even when its nested
    rules do not match, and a less specific prefix of another identity (``world``'s 0.0.0.0/0)
    never lets a request in.
    """
    deny = matcher_pb2.Matcher.OnMatch(action=_action(no_rule, rbac_pb2.RBAC.DENY))
    grouped = {i for idents, _ in groups for i in idents}
    others = {i for i in universe if i not in grouped}
    if not others and len(groups) == 1:
        # every identity alike (a port no policy restricts): when the world's 0.0.0.0/0 and ::/0 are
        # among them every address falls in some prefix, so those two ranges decide the same, and the
        # listener does not grow (and change) with every endpoint's address
        # (the world identities hold one or two prefixes: identities with more are not searched, at
        # worst missing the shortcut, never changing a verdict)
        everywhere = {p for i in groups[0][0] if len(ps := universe.get(i, ())) <= 2 for p in ps if p.prefixlen == 0}
        if {p.version for p in everywhere} == {4, 6}:
            return _ip_tree(peer, [_range(everywhere, groups[0][1])], deny)
    ranges: list[ip_pb2.IPMatcher.IPRangeMatcher] = []
    for idents, on_match in [*groups, (others, deny)]:
        # An ipcache prefix belongs to one identity, so the groups' prefixes never repeat.
        prefixes = [p for i in idents for p in universe.get(i, ())]
        if not prefixes and idents is others and not ranges:  # nobody known: a range must still deny
            prefixes = [ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")]
        if prefixes:
            ranges.append(_range(prefixes, on_match))
    return _ip_tree(peer, ranges, deny)


def by_endpoint(endpoints: Sequence[tuple[Sequence[IPNetwork], matcher_pb2.Matcher]], local: Input,
                no_endpoint: str) -> matcher_pb2.Matcher:
    """Node mode: the endpoint's own address (``local``) picks its matcher; endpoints whose
    matchers are byte-equal share one range."""
    shared: dict[bytes, set[IPNetwork]] = {}
    for addresses, nested in endpoints:
        shared.setdefault(nested.SerializeToString(deterministic=True), set()).update(addresses)
    deny = matcher_pb2.Matcher.OnMatch(action=_action(no_endpoint, rbac_pb2.RBAC.DENY))
    ranges = [_range(list(addresses), matcher_pb2.Matcher.OnMatch(matcher=matcher_pb2.Matcher.FromString(nested)))
              for nested, addresses in shared.items() if addresses]
    return _ip_tree(local, ranges, deny)


def _range(prefixes: Iterable[IPNetwork], on_match: matcher_pb2.Matcher.OnMatch) -> ip_pb2.IPMatcher.IPRangeMatcher:
    """The prefixes, in address order, leading to ``on_match``."""
    cidrs = sorted(map(_cidr, prefixes), key=_by_key)
    return ip_pb2.IPMatcher.IPRangeMatcher(ranges=[c for _, c in cidrs], on_match=on_match, exclusive=True)


def _by_key(cidr: tuple[tuple[int, int, int], cidr_pb2.CidrRange]) -> tuple[int, int, int]:
    return cidr[0]


def _cidr(prefix: IPNetwork) -> tuple[tuple[int, int, int], cidr_pb2.CidrRange]:
    """``prefix``'s sort key and message. Every listener lists every known prefix, so both are
    made once per prefix object (keyed on the object: hashing an ip_network is slow Python)."""
    hit = _CIDRS.get(id(prefix))
    if hit is not None and hit[0] is prefix:
        return hit[1], hit[2]
    if len(_CIDRS) >= 1 << 17:
        _CIDRS.clear()
    key = prefix_key(prefix)
    msg = cidr_pb2.CidrRange(address_prefix=str(prefix.network_address), prefix_len={"value": prefix.prefixlen})
    _CIDRS[id(prefix)] = (prefix, key, msg)
    return key, msg


#: id(prefix) -> (the prefix, kept alive so the id stays its own; its sort key; its CidrRange)
_CIDRS: dict[int, tuple[IPNetwork, tuple[int, int, int], cidr_pb2.CidrRange]] = {}


def _ip_tree(ip: Input, ranges: list[ip_pb2.IPMatcher.IPRangeMatcher],
             no_match: matcher_pb2.Matcher.OnMatch) -> matcher_pb2.Matcher:
    # Ordered by content, not by identity numbers, which depend on allocation order.
    ranges.sort(key=lambda r: r.SerializeToString(deterministic=True))
    tree = matcher_pb2.Matcher.MatcherTree(
        input=extension(ip.name, ip.config),
        custom_match=extension("envoy.matching.custom_matchers.ip_range_matcher",
                               ip_pb2.IPMatcher(range_matchers=ranges)))
    return matcher_pb2.Matcher(matcher_tree=tree, on_no_match=no_match)


def prefix_key(prefix: IPNetwork) -> tuple[int, int, int]:
    return (prefix.version, int(prefix.network_address), prefix.prefixlen)


def _rule_name(rule: HTTPRule, origin: RuleOrigin) -> str:
    """``<policy> <path> (<file>:<line>)``, the line being the HTTP rule's own."""
    return str(RuleOrigin(origin.policy, origin.path, rule.source, origin.kind))


def http_policy(entry: PolicyEntry, rules: Sequence[tuple[object, RuleOrigin]], base: str,
                notes: dict[str, None]) -> HTTPPolicy:
    """HTTP rules as named predicates, sorted and deduplicated (the first name of a predicate
    several rules share wins); allowed outright if one rule matches any request."""
    deny = "default deny: " + "; ".join(sorted({str(o) for o in entry.origins}))
    named: dict[bytes, tuple[str, str]] = {}
    for rule, origin in rules:
        assert isinstance(rule, HTTPRule)
        pred, matches_any, skipped = _predicate(rule)
        for reason in skipped:
            notes[f"{base}: {rule.source}: {reason}"] = None
        name = _rule_name(rule, origin)
        if pred is None and matches_any:
            return HTTPPolicy(name, (), deny)
        if pred is not None:
            key = pred.SerializeToString(deterministic=True)
            prefix = literal_prefix(rule.path) if rule.path is not None else ""
            named[key] = (min(named[key][0], name), prefix) if key in named else (name, prefix)
    return HTTPPolicy(None, tuple((pred, name, prefix) for pred, (name, prefix) in sorted(named.items())), deny)


def _predicate(rule: HTTPRule) -> tuple[matcher_pb2.Matcher.MatcherList.Predicate | None, bool, list[str]]:
    """One HTTP rule as a predicate (every field must match); ``(None, True, _)`` if it matches any
    request, ``(None, False, _)`` if none can be shown to match."""
    Pred = matcher_pb2.Matcher.MatcherList.Predicate
    skipped: list[str] = []
    conds: list[tuple[str, string_pb2.StringMatcher]] = []
    for header, pattern in ((":method", rule.method), (":path", rule.path), (":authority", rule.host)):
        if pattern is not None:
            conds.append((header, _regex(pattern)))
    for name, value in rule.headers:
        conds.append((name.lower(), _header_value(value)))
    for match in rule.header_matches:
        if match.mismatch is not None:
            skipped.append(f"headerMatches {match.name}: mismatch action {match.mismatch} is not enforced")
            continue
        if match.secret is not None:
            # The value lives in a secret cilia cannot read here: no request can be shown to match.
            skipped.append(f"headerMatches {match.name}: secret values are not supported; rule matches nothing")
            return None, False, skipped
        conds.append((match.name.lower(), _header_value(match.value)))
    preds = sorted(
        (Pred(single_predicate=Pred.SinglePredicate(
            input=extension("envoy.matching.inputs.request_headers",
                            http_inputs_pb2.HttpRequestHeaderMatchInput(header_name=name)),
            value_match=value)) for name, value in conds),
        key=lambda p: p.SerializeToString(deterministic=True))
    if not preds:
        return None, True, skipped
    if len(preds) == 1:
        return preds[0], True, skipped
    return Pred(and_matcher=Pred.PredicateList(predicate=preds)), True, skipped


def _regex(pattern: str) -> string_pb2.StringMatcher:
    return string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(
        google_re2=regex_pb2.RegexMatcher.GoogleRE2(), regex=pattern))


def _header_value(value: str | None) -> string_pb2.StringMatcher:
    """Exact value, or any value at all (the input yields nothing when the header is absent)."""
    return string_pb2.StringMatcher(exact=value) if value is not None else _regex(".*")


def _action(name: str, action: rbac_pb2.RBAC.Action.ValueType) -> extension_pb2.TypedExtensionConfig:
    return extension("envoy.filters.rbac.action", rbac_pb2.Action(name=name, action=action))
