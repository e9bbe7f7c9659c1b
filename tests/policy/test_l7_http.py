"""HTTP rules: the errors a policy author sees, and which requests get through."""

from __future__ import annotations

import pytest

from cilia.policy.flows import HTTPRequest
from cilia.policy.l7 import http
from cilia.policy.model import HTTPRule
from tests.helpers import parse_l7_rule, valid_l7_rule


def parse(text: str) -> tuple[HTTPRule | None, list[str]]:
    return parse_l7_rule(http.parse_rule, text, "http[0]")


def rule(text: str) -> HTTPRule:
    return valid_l7_rule(http.parse_rule, text, "http[0]")


def req(method: str = "GET", path: str = "/", host: str = "", **headers: str) -> HTTPRequest:
    return HTTPRequest(method, path, host, tuple((k.replace("_", "-"), v) for k, v in headers.items()))


# --- parsing -------------------------------------------------------------------


def test_parses_all_fields() -> None:
    parsed = rule("""
        method: POST
        path: /v1/request-landing
        host: deathstar\\.svc
        headers:
        - X-Present
        - 'X-My-Header: true'
        headerMatches:
        - name: X-Token
          value: abc
          mismatch: LOG
        - name: X-Secret
          secret: {namespace: ns, name: token}
    """)
    assert (parsed.method, parsed.path, parsed.host) == ("POST", "/v1/request-landing", "deathstar\\.svc")
    assert parsed.headers == (("X-Present", None), ("X-My-Header", "true"))
    first, second = parsed.header_matches
    assert (first.name, first.value, first.secret, first.mismatch) == ("X-Token", "abc", None, "LOG")
    assert (second.name, second.value, second.secret) == ("X-Secret", None, ("ns", "token"))
    assert first.source.line == 9
    assert parsed.source.line == 2


def test_empty_rule_and_empty_strings_mean_unset() -> None:
    parsed = rule("""
        method: ""
        path: ""
    """)
    assert (parsed.method, parsed.path, parsed.host, parsed.headers, parsed.header_matches) == (
        None, None, None, (), ())
    assert http.rule_matches(parsed, req("DELETE", "/anything"))


def test_header_value_is_split_at_first_colon_and_stripped() -> None:
    parsed = rule("""
        headers: ['X-Url:  http://a:8080/x ', 'X-Bare  ']
    """)
    assert parsed.headers == (("X-Url", "http://a:8080/x"), ("X-Bare", None))


def test_invalid_regex_names_the_field() -> None:
    parsed, problems = parse("""
        method: GET
        path: /public/(x
    """)
    assert parsed is None
    assert problems == ["t.yaml:3: http[0].path: invalid RE2 regex '/public/(x': missing ): /public/(x"]


def test_regex_rejected_by_re2_but_accepted_by_python() -> None:
    _, problems = parse("""
        host: '(?!evil)example\\.com'
    """)
    assert problems == [
        "t.yaml:2: http[0].host: invalid RE2 regex '(?!evil)example\\\\.com': invalid perl operator: (?!"
    ]


def test_regex_too_complex_for_envoy() -> None:
    _, problems = parse("""
        method: 'a{1000}'
    """)
    assert problems == [
        "t.yaml:2: http[0].method: regex 'a{1000}' is too complex for Envoy (RE2 program size 1004 > 100)"
    ]


def test_unknown_field_and_wrong_types() -> None:
    parsed, problems = parse("""
        methods: GET
        path: 404
        headers: X-Foo
    """)
    assert parsed is None
    assert problems == [
        "t.yaml:2: http[0].methods: unknown field 'methods' (did you mean 'method'?)",
        "t.yaml:3: http[0].path: expected a string, got integer",
        "t.yaml:4: http[0].headers: expected a list, got string",
    ]


def test_rule_must_be_a_mapping() -> None:
    _, problems = parse("""
        - GET
    """)
    assert problems == ["t.yaml:2: http[0]: expected a mapping, got list"]


def test_header_errors() -> None:
    _, problems = parse("""
        headers:
        - 'Bad Name: x'
        - 'X-Empty:'
        - ': value'
        - 7
    """)
    assert problems == [
        "t.yaml:3: http[0].headers[0]: invalid header name 'Bad Name': a header name is an HTTP token "
        "(letters, digits and !#$%&'*+-.^_`|~)",
        "t.yaml:4: http[0].headers[1]: no value after ':' in 'X-Empty:' "
        "(write just 'X-Empty' to require the header to be present)",
        "t.yaml:5: http[0].headers[2]: invalid header name '': a header name is an HTTP token "
        "(letters, digits and !#$%&'*+-.^_`|~)",
        "t.yaml:6: http[0].headers[3]: expected a string, got integer",
    ]


def test_header_match_errors() -> None:
    _, problems = parse("""
        headerMatches:
        - value: x
        - name: X-A
          mismatch: log
        - name: 'X A'
          valu: x
        - name: X-B
          secret: {namespace: ns}
        - name: X-C
          secret: {name: "", namespaces: ns}
        - name: X-D
          value: true
        - X-E
    """)
    assert problems == [
        "t.yaml:3: http[0].headerMatches[0]: missing required field 'name'",
        "t.yaml:5: http[0].headerMatches[1].mismatch: invalid mismatch action 'log' "
        "(expected one of LOG, ADD, DELETE, REPLACE)",
        "t.yaml:7: http[0].headerMatches[2].valu: unknown field 'valu' (did you mean 'value'?)",
        "t.yaml:6: http[0].headerMatches[2].name: invalid header name 'X A': a header name is an HTTP token "
        "(letters, digits and !#$%&'*+-.^_`|~)",
        "t.yaml:9: http[0].headerMatches[3].secret: missing required field 'name'",
        "t.yaml:11: http[0].headerMatches[4].secret.namespaces: unknown field 'namespaces' "
        "(did you mean 'namespace'?)",
        "t.yaml:11: http[0].headerMatches[4].secret.name: must not be empty",
        "t.yaml:13: http[0].headerMatches[5].value: expected a string, got boolean",
        "t.yaml:14: http[0].headerMatches[6]: expected a mapping, got string",
    ]


def test_secret_namespace_is_optional() -> None:
    parsed = rule("""
        headerMatches:
        - {name: X-Token, secret: {name: token}}
    """)
    assert parsed.header_matches[0].secret == ("", "token")


# --- matching ------------------------------------------------------------------


def test_method_and_path_are_full_matches() -> None:
    parsed = rule("""
        method: POST
        path: /public
    """)
    assert http.rule_matches(parsed, req("POST", "/public"))
    assert not http.rule_matches(parsed, req("POST", "/public/x"))
    assert not http.rule_matches(parsed, req("POST", "/x/public"))
    assert not http.rule_matches(parsed, req("POSTX", "/public"))
    assert not http.rule_matches(parsed, req("GET", "/public"))


def test_regex_path_and_method_alternatives() -> None:
    parsed = rule("""
        method: GET|HEAD
        path: /public/.*
    """)
    assert http.rule_matches(parsed, req("HEAD", "/public/x/y"))
    assert not http.rule_matches(parsed, req("GET", "/public"))


def test_host_is_a_full_match_against_the_request_host() -> None:
    parsed = rule("""
        host: api\\.example\\.com
    """)
    assert http.rule_matches(parsed, req(host="api.example.com"))
    assert not http.rule_matches(parsed, req(host="api.example.com.evil.net"))
    assert not http.rule_matches(parsed, req(host=""))


def test_headers_present_and_exact_with_case_insensitive_names() -> None:
    parsed = rule("""
        headers: ['X-Present', 'X-Mode: debug']
    """)
    assert http.rule_matches(parsed, req(x_present="", X_MODE="debug"))
    assert not http.rule_matches(parsed, req(x_mode="debug"))
    assert not http.rule_matches(parsed, req(x_present="1", x_mode="Debug"))


def test_repeated_header_values_are_joined_as_envoy_does() -> None:
    parsed = rule("""
        headers: ['X-Mode: a,b']
    """)
    both = HTTPRequest("GET", "/", "", (("x-mode", "a"), ("X-Mode", "b")))
    assert http.rule_matches(parsed, both)
    assert not http.rule_matches(parsed, req(x_mode="a"))


def test_header_matches_present_exact_and_mismatch_as_plain_match() -> None:
    parsed = rule("""
        headerMatches:
        - {name: X-Present}
        - {name: X-Token, value: abc, mismatch: REPLACE}
    """)
    assert http.rule_matches(parsed, req(x_present="", x_token="abc"))
    assert not http.rule_matches(parsed, req(x_present="", x_token="abd"))
    assert not http.rule_matches(parsed, req(x_token="abc"))


def test_secret_header_match_fails_closed() -> None:
    parsed = rule("""
        headerMatches:
        - {name: X-Token, value: abc, secret: {namespace: ns, name: token}}
    """)
    assert not http.rule_matches(parsed, req(x_token="abc"))
    assert http.unenforced(parsed) == [
        "headerMatches X-Token: the value from secret ns/token is not read yet, so this rule never matches"
    ]


def test_evaluate_ors_rules_and_empty_means_denied() -> None:
    landing = rule("{method: POST, path: /v1/request-landing}")
    status = rule("{method: GET, path: /status.*}")
    assert http.evaluate([landing, status], req("GET", "/status/x")) == (status,)
    assert http.evaluate([landing, status], req("POST", "/v1/request-landing")) == (landing,)
    assert http.evaluate([landing, status], req("PUT", "/v1/exhaust-port")) == ()
    anything = rule("{}")
    assert http.evaluate([landing, anything], req("POST", "/v1/request-landing")) == (landing, anything)


def test_unenforced_lists_mismatch_actions() -> None:
    parsed = rule("""
        headerMatches:
        - {name: X-A, value: '1', mismatch: ADD}
        - {name: X-B, secret: {name: s}, mismatch: LOG}
    """)
    assert http.unenforced(parsed) == [
        "headerMatches X-A: mismatch action ADD is not enforced; a mismatching request is denied instead",
        "headerMatches X-B: the value from secret s is not read yet, so this rule never matches",
        "headerMatches X-B: mismatch action LOG is not enforced; a mismatching request is denied instead",
    ]
    assert http.unenforced(rule("{path: /}")) == []


@pytest.mark.parametrize(("text", "expected"), [
    ("{method: POST, path: /v1/request-landing}", "POST /v1/request-landing"),
    ("{path: /v1/.*}", "* /v1/.*"),
    ("{method: GET, host: 'a\\.b', headers: ['X-A', 'X-B: 1']}", "GET * host=a\\.b header[X-A] header[X-B: 1]"),
    ("{headerMatches: [{name: X-A}, {name: X-B, value: v}, {name: X-C, secret: {namespace: n, name: s}}]}",
     "headerMatch[X-A] headerMatch[X-B: v] headerMatch[X-C: <secret n/s>]"),
    ("{}", "any HTTP request"),
])
def test_describe(text: str, expected: str) -> None:
    assert http.describe(rule(text)) == expected
