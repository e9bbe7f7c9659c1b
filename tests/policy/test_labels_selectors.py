"""Labels with sources and Kubernetes label selectors over them, as Cilium matches them."""

from __future__ import annotations

import textwrap

import pytest

from cilia.policy import Label, LabelError, LabelSelector, LabelSet, parse_text
from cilia.policy.labels import endpoint_labels, split_source
from cilia.policy.selectors import Operator, Requirement

NS = "io.kubernetes.pod.namespace"


# --- labels ---------------------------------------------------------------------------------


def test_parse_sources_and_defaults() -> None:
    labels = LabelSet.parse("app=web, k8s:tier=db ,reserved:host,container:pid=1,any:org=empire,cidr:10.0.0.0/8")
    assert labels.labels() == (
        Label("cidr", "10.0.0.0/8"),
        Label("container", "pid", "1"),
        Label("k8s", "app", "web"),
        Label("k8s", "org", "empire"),  # `any:` means "the default source" for a concrete label
        Label("k8s", "tier", "db"),
        Label("reserved", "host"),
    )
    assert str(labels) == "cidr:10.0.0.0/8,container:pid=1,k8s:app=web,k8s:org=empire,k8s:tier=db,reserved:host"


def test_parse_with_another_default_source_and_a_list() -> None:
    labels = LabelSet.parse(["app=web", "k8s:tier=db"], default_source="unspec")
    assert labels.to_list() == ["k8s:tier=db", "unspec:app=web"]


def test_parse_details() -> None:
    assert LabelSet.parse("a=b=c")["a"] == Label("k8s", "a", "b=c")      # value may hold '='
    assert LabelSet.parse("flag")["flag"] == Label("k8s", "flag", "")    # no value
    assert LabelSet.parse("a=1,,b=2").to_list() == ["k8s:a=1", "k8s:b=2"]  # empty items are skipped
    assert LabelSet.parse("") == LabelSet()
    # only known sources count as a prefix
    assert LabelSet.parse("example.com:role=x")["example.com:role"] == Label("k8s", "example.com:role", "x")
    assert LabelSet.parse("cidr:2001:db8::/32")["2001:db8::/32"] == Label("cidr", "2001:db8::/32")


@pytest.mark.parametrize(("text", "message"), [
    ("=web", "label '=web' has an empty key"),
    ("app=web,k8s:=x", "label 'k8s:=x' has an empty key"),
    ("app=a,k8s:app=b", "label key 'app' is given twice ('k8s:app=a' and 'k8s:app=b')"),
])
def test_parse_errors(text: str, message: str) -> None:
    with pytest.raises(LabelError) as info:
        LabelSet.parse(text)
    assert str(info.value) == message
    assert isinstance(info.value, ValueError)


def test_label_sets_are_values() -> None:
    a = LabelSet.parse("app=web,k8s:tier=db")
    b = LabelSet.parse("tier=db,app=web")
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != LabelSet.parse("app=web,container:tier=db")
    assert a.with_label(Label("k8s", "app", "api"))["app"].value == "api"
    assert a["app"].value == "web"  # with_label made a new set


def test_split_source() -> None:
    assert split_source("k8s:app") == ("k8s", "app")
    assert split_source("app") == ("any", "app")
    assert split_source("app", "unspec") == ("unspec", "app")
    assert split_source("io.cilium:x") == ("any", "io.cilium:x")


def test_endpoint_labels_default_to_the_default_namespace() -> None:
    assert endpoint_labels(LabelSet.parse("app=web")) == LabelSet.parse(f"app=web,{NS}=default")
    assert endpoint_labels(LabelSet.parse("app=web")).namespace() == "default"
    in_prod = LabelSet.parse(f"app=web,{NS}=prod")
    assert endpoint_labels(in_prod) is in_prod
    host = LabelSet.parse("reserved:host")
    assert endpoint_labels(host) is host and host.namespace() is None


# --- selectors ------------------------------------------------------------------------------


def selector(yaml: str) -> LabelSelector:
    """A selector as the parser reads it from a policy."""
    text = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector:\n"
    result = parse_text(text + textwrap.indent(textwrap.dedent(yaml), "    "), "s.yaml")
    assert result.ok, [str(p) for p in result.problems]
    selected = result.policies[0].rules[0].endpoint_selector
    assert selected is not None
    return selected


def matches(sel: LabelSelector, labels: str) -> bool:
    return sel.matches(LabelSet.parse(labels))


def test_a_key_without_source_matches_any_source() -> None:
    for sel in (selector("matchLabels: {app: web}"), selector('matchLabels: {"any:app": web}')):
        assert matches(sel, "k8s:app=web")
        assert matches(sel, "container:app=web")
        assert matches(sel, "unspec:app=web")
        assert not matches(sel, "k8s:app=api")
        assert not matches(sel, "k8s:other=web")


def test_a_key_with_a_source_matches_only_that_source() -> None:
    sel = selector('matchLabels: {"k8s:app": web}')
    assert matches(sel, "k8s:app=web")
    assert not matches(sel, "container:app=web")
    reserved = selector('matchLabels: {"reserved:host": ""}')
    assert matches(reserved, "reserved:host")
    assert not matches(reserved, "k8s:host")


def test_match_labels_are_anded() -> None:
    sel = selector("matchLabels: {org: empire, class: deathstar}")
    assert matches(sel, "org=empire,class=deathstar,extra=1")
    assert not matches(sel, "org=empire")


def test_an_empty_selector_matches_everything() -> None:
    assert matches(selector("{}"), "")
    assert matches(selector("{}"), "reserved:world")


@pytest.mark.parametrize(("expression", "labels", "expected"), [
    ("{key: env, operator: In, values: [prod, stage]}", "env=prod", True),
    ("{key: env, operator: In, values: [prod, stage]}", "env=stage", True),
    ("{key: env, operator: In, values: [prod, stage]}", "env=dev", False),
    ("{key: env, operator: In, values: [prod, stage]}", "app=x", False),
    ("{key: env, operator: NotIn, values: [prod]}", "env=dev", True),
    ("{key: env, operator: NotIn, values: [prod]}", "env=prod", False),
    ("{key: env, operator: NotIn, values: [prod]}", "app=x", True),  # an absent key is "not in"
    ("{key: env, operator: Exists}", "env=", True),
    ("{key: env, operator: Exists}", "app=x", False),
    ("{key: env, operator: DoesNotExist}", "app=x", True),
    ("{key: env, operator: DoesNotExist}", "env=prod", False),
    # a source on the key: only a label of that source counts as present
    ('{key: "k8s:env", operator: Exists}', "container:env=prod", False),
    ('{key: "k8s:env", operator: NotIn, values: [prod]}', "container:env=prod", True),
    ('{key: "k8s:env", operator: In, values: [prod]}', "k8s:env=prod", True),
])
def test_match_expressions(expression: str, labels: str, expected: bool) -> None:
    assert matches(selector(f"matchExpressions: [{expression}]"), labels) is expected


def test_match_labels_and_expressions_together() -> None:
    sel = selector("""\
        matchLabels: {app: web}
        matchExpressions:
        - {key: env, operator: NotIn, values: [dev]}
        - {key: canary, operator: DoesNotExist}
        """)
    assert matches(sel, "app=web,env=prod")
    assert matches(sel, "app=web")
    assert not matches(sel, "app=web,env=dev")
    assert not matches(sel, "app=web,canary=yes")
    assert not matches(sel, "app=api,env=prod")


def test_selector_values() -> None:
    sel = selector("""\
        matchLabels: {"k8s:app": web, org: empire}
        matchExpressions: [{key: env, operator: In, values: [stage, prod, prod]}]
        """)
    assert str(sel) == "{env In (prod,stage), org=empire, k8s:app=web}"
    assert sel == LabelSelector.from_match_labels({"k8s:app": "web", "org": "empire"}).and_(
        LabelSelector((Requirement("any", "env", Operator.IN, ("prod", "stage")),)))
    assert sel.constrains("app") and not sel.constrains("tier")
    assert sorted(sel.equality_labels()) == [("app", "web"), ("org", "empire")]
    assert not sel.is_empty() and LabelSelector().is_empty()
    assert str(selector("matchExpressions: [{key: x, operator: Exists}]")) == "{x Exists}"
