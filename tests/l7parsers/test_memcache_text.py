"""The memcached text-protocol parser, sans I/O: request forms and their policy names, denials in
reply order, quiet meta commands, bad input from either side, and Hypothesis over splits and
garbage. Policies are real CiliumNetworkPolicies (Cilium's memcached example and small ones)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.l7parsers.byte_feed import chunked, feed, splits
from tests.l7parsers.memcache_support import ALLOW_ALL, DENY_ALL, example_check, rules_check

from cilia.l7parsers.base import Check, Output, ProtocolError
from cilia.l7parsers.memcache import MemcacheConnection
from cilia.l7parsers.memcache_text import BARRIER, DENIED, MemcacheTextConnection, RequestReader

JUNK = b"\x00junk\r\n"
A_WING = example_check("app=a-wing")
X_WING = example_check("app=x-wing")
FLEET = example_check("name=fleet-tracker")


def conn(check: Check = ALLOW_ALL, **kwargs: int) -> MemcacheConnection:
    return MemcacheConnection(check, **kwargs)


# frame, the record's command and key, whether the server answers (always/maybe/never)
FORMS: list[tuple[bytes, str, str | None, str]] = [
    (b"set k 0 0 1\r\nv\r\n", "set", "k", "always"),
    (b"set k 4294967295 -1 3 noreply\r\nabc\r\n", "set", "k", "never"),
    (b"add k 0 0 0\r\n\r\n", "add", "k", "always"),
    (b"replace k 1 2 1\r\nv\r\n", "replace", "k", "always"),
    (b"append k 0 0 2 noreply\r\n\r\n\r\n", "append", "k", "never"),
    (b"prepend k 0 0 1\r\nv\r\n", "prepend", "k", "always"),
    (b"cas k 0 0 1 18446744073709551615\r\nv\r\n", "cas", "k", "always"),
    (b"cas k 0 0 1 7 noreply\r\nv\r\n", "cas", "k", "never"),
    (b"get k\r\n", "get", "k", "always"),
    (b"get a b c\r\n", "get", "a b c", "always"),
    (b"gets a b\r\n", "gets", "a b", "always"),
    (b"gat 10 a b\r\n", "gat", "a b", "always"),
    (b"gats -1 a\r\n", "gats", "a", "always"),
    (b"delete k\r\n", "delete", "k", "always"),
    (b"delete k 0\r\n", "delete", "k", "always"),
    (b"delete k noreply\r\n", "delete", "k", "never"),
    (b"delete k 0 noreply\r\n", "delete", "k", "never"),
    (b"incr k 1\r\n", "incr", "k", "always"),
    (b"decr k 18446744073709551615 noreply\r\n", "decr", "k", "never"),
    (b"touch k 10\r\n", "touch", "k", "always"),
    (b"touch k -1 noreply\r\n", "touch", "k", "never"),
    (b"stats\r\n", "stats", None, "always"),
    (b"stats items\r\n", "stats", None, "always"),
    (b"stats cachedump 1 10\r\n", "stats", None, "always"),
    (b"version\r\n", "version", None, "always"),
    (b"verbosity 1\r\n", "verbosity", None, "always"),
    (b"verbosity 0 noreply\r\n", "verbosity", None, "never"),
    (b"flush_all\r\n", "flush_all", None, "always"),
    (b"flush_all 10\r\n", "flush_all", None, "always"),
    (b"flush_all noreply\r\n", "flush_all", None, "never"),
    (b"flush_all 0 noreply\r\n", "flush_all", None, "never"),
    (b"quit\r\n", "quit", None, "never"),
    (b"slabs automove 1\r\n", "slabs", None, "always"),
    (b"lru mode flat\r\n", "lru", None, "always"),
    (b"cache_memlimit 64\r\n", "cache_memlimit", None, "always"),
    # meta commands
    (b"mg k\r\n", "get", "k", "always"),
    (b"mg k v f t k Oabc\r\n", "get", "k", "always"),
    (b"mg k v q\r\n", "get", "k", "maybe"),
    (b"mg k v c\r\n", "gets", "k", "always"),
    (b"mg k v T30\r\n", "gat", "k", "always"),
    (b"mg k T30 c q\r\n", "gats", "k", "maybe"),
    (b"mg k v N30\r\n", "get,add", "k", "always"),
    (b"mg YWJj b v\r\n", "get", "abc", "always"),
    (b"ms k 2\r\nhi\r\n", "set", "k", "always"),
    (b"ms k 2 T0 F5 q\r\nhi\r\n", "set", "k", "maybe"),
    (b"ms k 2 MS\r\nhi\r\n", "set", "k", "always"),
    (b"ms k 2 ME\r\nhi\r\n", "add", "k", "always"),
    (b"ms k 2 MA N0\r\nhi\r\n", "append", "k", "always"),
    (b"ms k 2 MP\r\nhi\r\n", "prepend", "k", "always"),
    (b"ms k 2 MR\r\nhi\r\n", "replace", "k", "always"),
    (b"ms k 2 C12\r\nhi\r\n", "cas", "k", "always"),
    (b"ms k 2 MR C12 q\r\nhi\r\n", "cas", "k", "maybe"),
    (b"ms k 2 ME C12\r\nhi\r\n", "add", "k", "always"),  # memcached runs add with a CAS as a plain add
    (b"ms k 0\r\n\r\n", "set", "k", "always"),
    (b"ms YWJj 1 b\r\nx\r\n", "set", "abc", "always"),
    (b"md k\r\n", "delete", "k", "always"),
    (b"md k q C5 I T30\r\n", "delete", "k", "maybe"),
    (b"ma k\r\n", "incr", "k", "always"),
    (b"ma k MD\r\n", "decr", "k", "always"),
    (b"ma k M- D5 q\r\n", "decr", "k", "maybe"),
    (b"ma k M+ N0 J5 v\r\n", "incr", "k", "always"),
    (b"mn\r\n", "noop", None, "always"),
    (b"me k\r\n", "get", "k", "always"),
    (b"me YWJj b\r\n", "get", "abc", "always"),
    # framing as memcached reads it: a bare \n ends a line, runs of spaces are one
    (b"get k\n", "get", "k", "always"),
    (b"  get   a  b \r\n", "get", "a b", "always"),
    (b"set k 0 0 1\nv\r\n", "set", "k", "always"),
    (b"get " + b"k" * 250 + b"\r\n", "get", "k" * 250, "always"),
    (b"get \xc3\xa9t\xc3\xa9\r\n", "get", "\u00e9t\u00e9", "always"),
    (b"get \xff\r\n", "get", "\ufffd", "always"),  # not UTF-8: U+FFFD, as Go's regexp sees it
]


def _summary(command: str, key: str | None) -> dict[str, str]:
    return {"command": command} if key is None else {"command": command, "key": key}


@pytest.mark.parametrize(("frame", "command", "key", "answer"), FORMS)
@pytest.mark.parametrize("chunk", [0, 1])
def test_allowed_forms_are_forwarded_whole(frame: bytes, command: str, key: str | None, answer: str,
                                           chunk: int) -> None:
    c = conn()
    out = feed(c, chunked(frame, chunk))
    assert out.to_server == frame
    assert out.to_client == b""
    assert [dict(r.summary) for r in out.records] == [_summary(command, key)]
    assert out.records[0].decision.allowed
    assert c.dialect == "text"


@pytest.mark.parametrize(("frame", "command", "key", "answer"), FORMS)
def test_request_events(frame: bytes, command: str, key: str | None, answer: str) -> None:
    reader = RequestReader()
    reader.feed(frame + frame)
    first, second = reader.next(), reader.next()
    assert first is not None and first == second
    assert (first.frame, first.commands, first.keys, first.answer.value) == (
        frame, tuple(command.split(",")), tuple(key.split(" ")) if key else (), answer)
    assert reader.next() is None


@pytest.mark.parametrize(("frame", "command", "key", "answer"), FORMS)
@pytest.mark.parametrize("chunk", [0, 1])
def test_denied_forms_are_answered_unless_noreply(frame: bytes, command: str, key: str | None, answer: str,
                                                  chunk: int) -> None:
    out = feed(conn(DENY_ALL), chunked(frame, chunk))
    assert out.to_server == b""
    assert out.to_client == (b"" if answer == "never" else DENIED)
    assert [dict(r.summary) for r in out.records] == [_summary(command, key)]
    assert not out.records[0].decision.allowed


@pytest.mark.parametrize(("frame", "command", "key", "answer"), FORMS)
def test_junk_after_a_form(frame: bytes, command: str, key: str | None, answer: str) -> None:
    with pytest.raises(ProtocolError) as e:
        conn().receive_client(frame + JUNK)
    assert e.value.side == "client"


def test_many_forms_in_one_chunk_and_byte_by_byte() -> None:
    stream = b"".join(frame for frame, *_ in FORMS)
    for chunk in (0, 1, 7):
        out = feed(conn(), chunked(stream, chunk))
        assert out.to_server == stream
        assert len(out.records) == len(FORMS)


BAD = [
    b"\r\n",
    b"\n",
    b"GET k\r\n",
    b"foo bar\r\n",
    b"get\r\n",
    b"get " + b"k" * 251 + b"\r\n",
    b"get a\tb\r\n",
    b"get a\x00b\r\n",  # memcached would stop reading the line at the NUL
    b"get a\rb\r\n",
    b"get a\r\r\n",
    b"set k 0 0\r\n",
    b"set k 0 0 -1\r\n",
    b"set k 0 0 +1\r\nx\r\n",  # memcached reads +1 as 1; only plain digits pass here
    b"set k 4294967296 0 1\r\nx\r\n",
    b"set k 0 2147483648 1\r\nx\r\n",
    b"set k 0 0 1 garbage\r\nx\r\n",
    b"set k 0 0 1 noreply extra\r\nx\r\n",
    b"set k 0 0 1\r\nxy\r\n",
    b"set k 0 0 1\r\nx\n\n",
    b"set " + b"k" * 251 + b" 0 0 1\r\nx\r\n",  # memcached would refuse the line and run the data block
    b"cas k 0 0 1\r\nx\r\n",
    b"gat x k\r\n",
    b"gat 10\r\n",
    b"delete\r\n",
    b"delete k 1\r\n",
    b"delete k 0 0\r\n",
    b"incr k -1\r\n",
    b"incr k 18446744073709551616\r\n",
    b"incr k\r\n",
    b"incr k " + b"1" * 5000 + b"\r\n",  # too long for int() to read: still only a ProtocolError
    b"touch k\r\n",
    b"touch k x\r\n",
    b"verbosity\r\n",
    b"verbosity x\r\n",
    b"version 1\r\n",
    b"quit now\r\n",
    b"flush_all 1 2\r\n",
    b"flush_all x\r\n",
    b"slabs\r\n",
    b"lru mode flat noreply\r\n",
    b"cache_memlimit\r\n",
    b"lru_crawler metadump all\r\n",
    b"watch\r\n",
    b"shutdown\r\n",
    b"mg\r\n",
    b"mg k v v\r\n",
    b"mg k v \xc3\xa9\r\n",
    b"mg YQ b\r\n",
    b"mg YR== b\r\n",  # not canonical base64: one spelling per key
    b"mg ==== b\r\n",
    b"mg " + b"k" * 251 + b" v\r\n",
    b"mg k " + b" ".join(b"%c" % c for c in b"abcdefghijklmnopqr") + b"\r\n",
    b"ms k\r\n",
    b"ms k -1\r\n",
    b"ms k x\r\n",
    b"ms k 1 MX\r\nx\r\n",
    b"ms k 1 MSS\r\nx\r\n",
    # 17 flags: memcached 1.6 refuses the line without reading its data block, then runs the data
    b"ms k 10 " + b" ".join([b"F0", b"T0", b"k", b"c", b"O1", b"s", b"t", b"f", b"v", b"h", b"u", b"l", b"I",
                             b"N0", b"R0", b"P", b"L"]) + b"\r\nget secret\r\n",
    b"md\r\n",
    b"ma k Mx\r\n",
    b"me\r\n",
    b"me k x\r\n",
    b"me k b b\r\n",
    b"mn x\r\n",
    b"\x81get k\r\n",
]


@pytest.mark.parametrize("data", BAD)
@pytest.mark.parametrize("chunk", [0, 1])
def test_bad_requests_are_protocol_errors(data: bytes, chunk: int) -> None:
    c = conn()
    with pytest.raises(ProtocolError) as e:
        feed(c, chunked(data, chunk))
    assert e.value.side == "client"
    with pytest.raises(ProtocolError):  # a failed connection stays failed
        c.receive_client(b"get k\r\n")


def test_an_allowed_frame_before_bad_input_is_not_forwarded_by_a_later_call() -> None:
    c = conn()
    assert c.receive_client(b"get a\r\nget").to_server == b"get a\r\n"
    with pytest.raises(ProtocolError):
        c.receive_client(b" b\x00\r\n")


def test_sixteen_meta_flags_are_fine() -> None:
    line = b"ms k 1 " + b" ".join([b"F0", b"T0", b"k", b"c", b"O1", b"s", b"t", b"f", b"v", b"h", b"u", b"l",
                                    b"I", b"N0", b"R0", b"P"]) + b"\r\nx\r\n"
    assert conn().receive_client(line).to_server == line


def test_line_limit() -> None:
    c = conn(max_line=100)
    assert c.receive_client(b"get " + b"k " * 48).to_server == b""  # 100 bytes: still waiting
    with pytest.raises(ProtocolError, match="longer than 100"):
        c.receive_client(b"k")
    c = conn(max_line=100)
    with pytest.raises(ProtocolError, match="longer than 100"):
        c.receive_client(b"get " + b"k " * 60 + b"\r\n")
    c = conn()
    with pytest.raises(ProtocolError, match="longer than"):
        feed(c, chunked(b"get " + b"key " * 20000, 4096))


def test_buffer_limit() -> None:
    with pytest.raises(ProtocolError, match="over the buffer limit"):
        conn(max_buffer=1000).receive_client(b"set k 0 0 2000\r\n")
    c = conn(max_buffer=1000)
    out = c.receive_client(b"set k 0 0 900\r\n" + b"x" * 900 + b"\r\n")
    assert len(out.to_server) == 917
    with pytest.raises(ProtocolError, match="over the buffer limit"):
        conn(max_buffer=1000).receive_client(b"ms k 990 T0\r\n")


# --- Cilium's example policy ---------------------------------------------------------------


@pytest.mark.parametrize(("check", "frame", "allowed"), [
    (A_WING, b"get awing-coord\r\n", True),
    (A_WING, b"set awing-coord 0 0 1\r\nx\r\n", True),
    (A_WING, b"gets awing-coord\r\n", True),  # Cilium's get covers gets
    (A_WING, b"mg awing-coord v\r\n", True),
    (A_WING, b"ms awing-coord 1\r\nx\r\n", True),
    (A_WING, b"get xwing-coord\r\n", False),
    (A_WING, b"set xwing-coord 0 0 1\r\nx\r\n", False),
    (A_WING, b"get awing-coord xwing-coord\r\n", False),  # every key must pass
    (A_WING, b"delete awing-coord\r\n", False),
    (A_WING, b"add awing-coord 0 0 1\r\nx\r\n", False),
    (A_WING, b"gat 0 awing-coord\r\n", False),
    (A_WING, b"mg awing-coord v N30\r\n", False),  # N would create the item: an add
    (A_WING, b"ms awing-coord 1 MA\r\nx\r\n", False),
    (A_WING, b"cas awing-coord 0 0 1 5\r\nx\r\n", False),
    (A_WING, b"stats\r\n", False),
    (A_WING, b"version\r\n", False),
    (A_WING, b"mn\r\n", False),
    (X_WING, b"get xwing-coord\r\n", True),
    (X_WING, b"set xwing-coord 0 0 1\r\nx\r\n", True),
    (X_WING, b"get awing-coord\r\n", False),
    (FLEET, b"get awing-coord xwing-coord\r\n", True),
    (FLEET, b"set awing-coord 0 0 1\r\nx\r\n", False),
])
def test_cilium_example_policy(check: Check, frame: bytes, allowed: bool) -> None:
    out = conn(check).receive_client(frame)
    assert out.records[0].decision.allowed is allowed
    assert out.to_server == (frame if allowed else b"")
    assert out.to_client == (b"" if allowed else DENIED)
    if allowed:
        assert "secure-fleet" in out.records[0].decision.rule
    else:
        assert out.records[0].decision.rule.startswith("default deny: default/secure-fleet")


@pytest.mark.parametrize(("rules", "allowed", "denied"), [
    ([{"command": "storage", "keyPrefix": "user/"}],
     [b"set user/1 0 0 1\r\nx\r\n", b"cas user/1 0 0 1 9\r\nx\r\n", b"incr user/1 1\r\n", b"ms user/1 1 MA\r\nx\r\n",
      b"ma user/1 MD\r\n"],
     [b"set group/1 0 0 1\r\nx\r\n", b"delete user/1\r\n", b"get user/1\r\n", b"touch user/1 1\r\n"]),
    ([{"command": "writeGroup"}],
     [b"delete k\r\n", b"touch k 1\r\n", b"md k\r\n", b"set k 0 0 1\r\nx\r\n"],
     [b"get k\r\n", b"stats\r\n"]),
    ([{"command": "get", "keyRegex": "^a.*z$"}],
     [b"get abcz\r\n", b"get az abz\r\n", b"gets az\r\n", b"me az\r\n"],
     [b"get abc\r\n", b"get az b\r\n", b"gat 1 az\r\n"]),
    ([{"command": "gat", "keyExact": "k"}],
     [b"gat 1 k\r\n", b"gats 1 k\r\n", b"mg k v T1\r\n"],
     [b"get k\r\n", b"mg k v\r\n"]),
    ([{"command": "stats"}, {"command": "version"}, {"command": "noop"}],
     [b"stats\r\n", b"stats slabs\r\n", b"version\r\n", b"mn\r\n"],
     [b"verbosity 1\r\n", b"flush_all\r\n", b"get k\r\n"]),
    ([{"command": "get", "keyExact": "k"}, {"command": "add", "keyExact": "k"}],
     [b"mg k v N30\r\n", b"get k\r\n"],
     [b"mg j v N30\r\n"]),
    ([{"command": "cas"}],
     [b"cas k 0 0 1 5\r\nx\r\n", b"ms k 1 C5\r\nx\r\n"],
     [b"set k 0 0 1\r\nx\r\n", b"ms k 1\r\nx\r\n"]),
    ([{"command": "get", "keyExact": "abc"}],  # base64 keys are checked decoded
     [b"mg YWJj b v\r\n", b"mg abc v\r\n", b"me YWJj b\r\n"],
     [b"mg YWJj v\r\n", b"me YWJj\r\n"]),
    ([{"command": "flush_all"}, {"command": "quit"}],
     [b"flush_all\r\n", b"flush_all 0 noreply\r\n", b"quit\r\n"],
     [b"version\r\n"]),
])
def test_small_policies(rules: list[dict[str, str]], allowed: list[bytes], denied: list[bytes]) -> None:
    check = rules_check(*rules)
    for frame in allowed:
        assert conn(check).receive_client(frame).to_server == frame, frame
    for frame in denied:
        out = conn(check).receive_client(frame)
        assert (out.to_server, out.to_client) == (b"", DENIED), frame


# --- reply order ---------------------------------------------------------------------------


def test_pipelined_batch_keeps_reply_order() -> None:
    c = conn(A_WING)
    out = c.receive_client(
        b"set awing-coord 0 0 2\r\nhi\r\n"
        b"get xwing-coord\r\n"  # denied
        b"get awing-coord\r\n"
        b"delete awing-coord\r\n"  # denied: the example has no delete rule
        b"set xwing-coord 0 0 3 noreply\r\nbad\r\n"  # denied, silently; its data block is consumed
        b"get awing-coord\r\n"
    )
    assert out.to_server == b"set awing-coord 0 0 2\r\nhi\r\nget awing-coord\r\nget awing-coord\r\n"
    assert out.to_client == b""  # every denial waits for the set's reply
    assert [r.decision.allowed for r in out.records] == [True, False, True, False, False, True]
    assert c.receive_server(b"STOR").to_client == b""
    assert c.receive_server(b"ED\r\n").to_client == b"STORED\r\n" + DENIED
    assert c.receive_server(b"VALUE awing-coord 0 2\r\nh").to_client == b""
    assert c.receive_server(b"i\r\n").to_client == b"VALUE awing-coord 0 2\r\nhi\r\n"  # passed on at once
    assert c.receive_server(b"END\r\n").to_client == b"END\r\n" + DENIED
    assert c.receive_server(b"END\r\n").to_client == b"END\r\n"
    # Nothing outstanding: a denial goes out at once, and the connection carries on.
    assert c.receive_client(b"get xwing-coord\r\n").to_client == DENIED
    out = c.receive_client(b"get awing-coord\r\n")
    assert out.to_server == b"get awing-coord\r\n"
    assert c.receive_server(b"END\r\n").to_client == b"END\r\n"


def test_replies_of_every_kind_pass_unchanged() -> None:
    requests = (b"get a b\r\nstats\r\nstats reset\r\nincr n 1\r\ndecr n 1\r\ntouch a 1\r\ndelete a\r\n"
                b"set a 0 0 1\r\nx\r\nversion\r\nverbosity 1\r\nflush_all\r\nslabs automove 1\r\n"
                b"mg a v k\r\nmg a\r\nms a 1\r\nx\r\nmd a\r\nma n v\r\nma n\r\nme a\r\nmn\r\nstats detail dump\r\n"
                b"get a\r\ngat 1 a\r\n")
    replies = (b"VALUE a 0 1\r\nx\r\nVALUE b 5 2 99\r\nyy\r\nEND\r\n"
               b"STAT pid 1\r\nSTAT uptime 2\r\nEND\r\n" b"RESET\r\n" b"8\r\n" b"NOT_FOUND\r\n" b"TOUCHED\r\n"
               b"DELETED\r\n" b"NOT_STORED\r\n" b"VERSION 1.6.18\r\n" b"OK\r\n" b"OK\r\n" b"OK\r\n"
               b"VA 1 kYQ== b\r\nx\r\n" b"HD\r\n" b"NS\r\n" b"NF\r\n" b"VA 1\r\n9\r\n" b"HD\r\n"
               b"ME a exp=-1 la=1 cas=1 fetch=yes cls=1 size=61\r\n" b"MN\r\n"
               b"PREFIX a get 1 hit 1 set 0 del 0\r\nEND\r\n" b"SERVER_ERROR out of memory\r\n"
               b"VALUE a 0 1\r\nx\r\nCLIENT_ERROR bad command line format\r\n")
    for chunk in (0, 1):
        c = conn()
        assert feed(c, chunked(requests, chunk)).to_server == requests
        assert feed(c, chunked(replies, chunk), "server").to_client == replies
        with pytest.raises(ProtocolError, match="no outstanding"):
            c.receive_server(b"END\r\n")


def test_noreply_requests_hold_no_denial() -> None:
    c = conn(A_WING)
    out = c.receive_client(b"set awing-coord 0 0 1 noreply\r\nx\r\nget xwing-coord\r\n")
    assert out.to_server == b"set awing-coord 0 0 1 noreply\r\nx\r\n"
    assert out.to_client == DENIED


def test_quit_is_forwarded_and_awaits_nothing() -> None:
    c = conn(rules_check({"command": "quit"}))
    out = c.receive_client(b"quit\r\n")
    assert (out.to_server, out.to_client) == (b"quit\r\n", b"")
    assert c.receive_server(b"").to_client == b""
    with pytest.raises(ProtocolError, match="no outstanding"):
        c.receive_server(b"OK\r\n")


def test_denied_quit_gets_nothing_like_noreply() -> None:
    out = conn(A_WING).receive_client(b"quit\r\n")
    assert (out.to_server, out.to_client) == (b"", b"")


# --- quiet meta commands -------------------------------------------------------------------


def test_denial_after_a_quiet_request_waits_for_our_mn() -> None:
    for hit in (b"VA 2\r\nhi\r\n", b""):
        c = conn(A_WING)
        out = c.receive_client(b"mg awing-coord v q\r\nmg xwing-coord v\r\n")
        assert out.to_server == b"mg awing-coord v q\r\n" + BARRIER
        assert out.to_client == b""
        assert feed(c, chunked(hit + b"MN\r\n", 1), "server").to_client == hit + DENIED  # our MN is not passed on
        assert c.receive_client(b"get xwing-coord\r\n").to_client == DENIED  # nothing outstanding now


def test_the_clients_own_mn_serves_as_the_barrier() -> None:
    c = conn(rules_check({"command": "get", "keyExact": "a"}, {"command": "noop"}))
    out = c.receive_client(b"mg a v q\r\nmn\r\nmg b v\r\nmg b v\r\n")
    assert out.to_server == b"mg a v q\r\nmn\r\n"
    assert c.receive_server(b"MN\r\n").to_client == b"MN\r\n" + DENIED + DENIED


def test_quiet_failures_and_hits_are_credited_in_order() -> None:
    c = conn(rules_check({"command": "set", "keyPrefix": "a"}, {"command": "delete", "keyPrefix": "a"},
                         {"command": "incr", "keyPrefix": "a"}, {"command": "get", "keyPrefix": "a"}))
    out = c.receive_client(b"ms a1 1 q\r\nx\r\nmd a2 q\r\nma a3 q\r\nmg b v\r\nmg a4 v\r\n")
    assert out.to_server == b"ms a1 1 q\r\nx\r\nmd a2 q\r\nma a3 q\r\n" + BARRIER + b"mg a4 v\r\n"
    # a1 stored (no reply), a2 not found, a3 not numeric; then our MN, then a4's reply.
    replies = b"NF\r\nCLIENT_ERROR cannot increment or decrement non-numeric value\r\n"
    assert c.receive_server(replies).to_client == replies
    assert c.receive_server(b"MN\r\nEN\r\n").to_client == DENIED + b"EN\r\n"


def test_ambiguous_quiet_replies_are_resolved_by_mn() -> None:
    c = conn(rules_check({"command": "get", "keyPrefix": "a"}))
    assert c.receive_client(b"mg a1 v q\r\nmg a2 v q\r\nmg a3 v\r\n").to_server == \
        b"mg a1 v q\r\nmg a2 v q\r\nmg a3 v\r\n"
    # One VA: a1's, a2's or a3's; which is unknown until an MN.
    assert c.receive_server(b"VA 1\r\nx\r\n").to_client == b"VA 1\r\nx\r\n"
    out = c.receive_client(b"mg b v\r\nmg a4 v\r\n")
    assert out.to_server == BARRIER + b"mg a4 v\r\n"
    assert out.to_client == b""
    assert c.receive_server(b"VA 1\r\ny\r\n").to_client == b"VA 1\r\ny\r\n"  # a3's (or a2's)
    assert c.receive_server(b"MN\r\n").to_client == DENIED
    assert c.receive_server(b"EN\r\n").to_client == b"EN\r\n"
    with pytest.raises(ProtocolError):
        c.receive_server(b"EN\r\n")


def test_quiet_get_misses_then_a_definite_reply() -> None:
    c = conn()
    c.receive_client(b"mg a v q\r\nget b\r\n")
    assert c.receive_server(b"END\r\n").to_client == b"END\r\n"  # only get can get END: certain
    assert c.receive_client(b"mg c v\r\n").to_server == b"mg c v\r\n"
    assert c.receive_server(b"EN\r\n").to_client == b"EN\r\n"


# --- the server's side ---------------------------------------------------------------------

BAD_REPLIES = [
    (b"get a\r\n", b"STORED\r\n"),
    (b"get a\r\n", b"VA 1\r\nx\r\n"),
    (b"set a 0 0 1\r\nx\r\n", b"VALUE a 0 1\r\nx\r\nEND\r\n"),
    (b"set a 0 0 1\r\nx\r\n", b"END\r\n"),
    (b"get a\r\n", b"VALUE a 0\r\n"),
    (b"get a\r\n", b"VALUE a 0 x\r\n"),
    (b"get a\r\n", b"VALUE a 0 1\r\nxy\r\n"),
    (b"get a\r\n", b"VALUE a 0 1\r\nx\r\nSTAT x 1\r\n"),
    (b"get a\r\n", b"VALUE a 0 1\r\nx\r\nSTORED\r\n"),
    (b"stats\r\n", b"STAT pid 1\r\nVALUE a 0 1\r\n"),
    (b"get a\r\n", b"FOO\r\n"),
    (b"get a\r\n", b"END\n"),
    (b"get a\r\n", b"END\r\r\n"),
    (b"get a\r\n", b"\r\n"),
    (b"mg a v\r\n", b"VA x\r\n"),
    (b"mg a v\r\n", b"MN\r\n"),
    (b"mn\r\n", b"HD\r\n"),
    (b"mg a v q\r\n", b"EN\r\n"),  # a quiet mg never answers a miss
    (b"version\r\n", b"VERSION 1\r\nVERSION 2\r\n"),
    (b"incr a 1\r\n", b"12 \r\n"),
    (b"incr a 1\r\n", b"1" * 5000 + b"\r\n"),
    (b"get a\r\n", b"VALUE a 0 " + b"1" * 5000 + b"\r\n"),
]


@pytest.mark.parametrize(("request_", "reply"), BAD_REPLIES)
def test_bad_replies_are_protocol_errors(request_: bytes, reply: bytes) -> None:
    c = conn()
    c.receive_client(request_)
    with pytest.raises(ProtocolError) as e:
        feed(c, chunked(reply, 1), "server")
    assert e.value.side == "server"


def test_server_limits_and_eof() -> None:
    c = conn(max_buffer=100, max_line=50)
    c.receive_client(b"get a\r\n")
    with pytest.raises(ProtocolError, match="over the buffer limit"):
        c.receive_server(b"VALUE a 0 1000\r\n")
    c = conn(max_line=50)
    c.receive_client(b"get a\r\n")
    with pytest.raises(ProtocolError, match="longer than 50"):
        c.receive_server(b"VALUE " + b"a" * 60)
    assert conn().receive_server(b"") == Output()
    with pytest.raises(ProtocolError, match="before the client"):
        conn().receive_server(b"END\r\n")


def test_client_eof_with_a_partial_frame() -> None:
    c = conn()
    assert c.receive_client(b"set k 0 0 5\r\nab") == Output()
    assert c.receive_client(b"") == Output()


def test_direct_text_connection() -> None:
    c = MemcacheTextConnection(A_WING)
    assert c.protocol == "memcache"
    assert c.receive_client(b"get awing-coord\r\n").to_server == b"get awing-coord\r\n"


# --- Hypothesis ----------------------------------------------------------------------------

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.data())
def test_fuzz_random_bytes(data: st.DataObject) -> None:
    """Garbage, or garbage after valid requests: only ProtocolError escapes, and what reaches the
    server (everything is allowed) is a prefix of the input made of whole frames."""
    prefix = data.draw(st.sampled_from([b"", b"get a\r\n", b"set a 0 0 1\r\nx\r\n", b"mg a v q\r\n"]))
    garbage = data.draw(st.binary(max_size=200))
    c = conn()
    sent = feed(c, prefix).to_server
    assert sent == prefix
    try:
        for piece in data.draw(splits(garbage)):
            out = c.receive_client(piece)
            sent += out.to_server
            assert out.to_client == b""
    except ProtocolError as e:
        assert e.side == "client"
    assert (prefix + garbage).startswith(sent)


@FUZZ
@given(st.binary(max_size=200), st.sampled_from([b"get a b\r\n", b"stats\r\n", b"mg a v\r\n", b"incr a 1\r\n"]))
def test_fuzz_random_replies(garbage: bytes, request_: bytes) -> None:
    c = conn()
    c.receive_client(request_)
    try:
        out = c.receive_server(garbage)
    except ProtocolError as e:
        assert e.side == "server"
    else:
        assert garbage.startswith(out.to_client)


@dataclass(frozen=True)
class Req:
    frame: bytes
    commands: tuple[str, ...]
    keys: tuple[str, ...]
    answer: str  # always / maybe / never
    mn: bool = False


KEYS = st.sampled_from(["a", "ab", "b", "a\u00e9", "bz"])
FUZZ_POLICY = rules_check(*[{"command": c, "keyPrefix": "a"} for c in ("get", "set", "delete", "incr", "gat")],
                          {"command": "noop"}, {"command": "version"})
FUZZ_ALLOWED = {"get", "gets", "set", "delete", "incr", "gat", "gats", "noop", "version"}


@st.composite
def requests(draw: st.DrawFn) -> Req:
    key = draw(KEYS)
    k = key.encode()
    value = draw(st.binary(max_size=5))
    n = str(len(value)).encode()
    noreply = draw(st.booleans())
    q = draw(st.booleans())
    choices = [
        Req(b"get " + k + b"\r\n", ("get",), (key,), "always"),
        Req(b"gets " + k + b" a\r\n", ("gets",), (key, "a"), "always"),
        Req(b"gat 1 " + k + b"\r\n", ("gat",), (key,), "always"),
        Req(b"set " + k + b" 0 0 " + n + (b" noreply" if noreply else b"") + b"\r\n" + value + b"\r\n",
            ("set",), (key,), "never" if noreply else "always"),
        Req(b"delete " + k + (b" noreply" if noreply else b"") + b"\r\n", ("delete",), (key,),
            "never" if noreply else "always"),
        Req(b"incr " + k + b" 1\r\n", ("incr",), (key,), "always"),
        Req(b"mg " + k + b" v" + (b" q" if q else b"") + b"\r\n", ("get",), (key,), "maybe" if q else "always"),
        Req(b"ms " + k + b" " + n + (b" q" if q else b"") + b"\r\n" + value + b"\r\n", ("set",), (key,),
            "maybe" if q else "always"),
        Req(b"md " + k + (b" q" if q else b"") + b"\r\n", ("delete",), (key,), "maybe" if q else "always"),
        Req(b"mn\r\n", ("noop",), (), "always", mn=True),
        Req(b"version\r\n", ("version",), (), "always"),
        Req(b"stats\r\n", ("stats",), (), "always"),
        Req(b"touch " + k + b" 1\r\n", ("touch",), (key,), "always"),
    ]
    return draw(st.sampled_from(choices))


def _allowed(req: Req) -> bool:
    return all(c in FUZZ_ALLOWED for c in req.commands) and all(k.startswith("a") for k in req.keys)


def expected_output(reqs: list[Req]) -> tuple[bytes, bytes]:
    """The rule, as a model: allowed frames go on; a denial is answered at once if nothing
    forwarded is awaiting a reply, and gets an mn ahead of it when a quiet request was forwarded
    and no mn is the last thing awaited."""
    to_server, to_client = b"", b""
    awaiting = quiet = last_mn = False
    for req in reqs:
        if _allowed(req):
            to_server += req.frame
            if req.answer == "always":
                awaiting, last_mn = True, req.mn
            elif req.answer == "maybe":
                quiet, last_mn = True, False
        elif req.answer != "never":
            if quiet and not last_mn:
                to_server += BARRIER
                awaiting = last_mn = True
            if not awaiting:
                to_client += DENIED
    return to_server, to_client


@FUZZ
@given(st.lists(requests(), max_size=12), st.data())
def test_fuzz_valid_streams_in_random_splits(reqs: list[Req], data: st.DataObject) -> None:
    stream = b"".join(r.frame for r in reqs)
    c = conn(FUZZ_POLICY)
    out = Output()
    for piece in data.draw(splits(stream)):
        out = out + c.receive_client(piece)
    assert (out.to_server, out.to_client) == expected_output(reqs)
    assert [r.decision.allowed for r in out.records] == [_allowed(r) for r in reqs]
    assert [dict(r.summary)["command"] for r in out.records] == [",".join(r.commands) for r in reqs]


@FUZZ
@given(st.data())
def test_fuzz_reply_splits(data: st.DataObject) -> None:
    """Replies split anywhere reach the client unchanged, with each denial after the reply of the
    request before it."""
    replies = {b"get a\r\n": b"VALUE a 0 3\r\nabc\r\nEND\r\n", b"set a 0 0 1\r\nx\r\n": b"STORED\r\n",
               b"stats\r\n": b"STAT pid 1\r\nSTAT version 1.6\r\nEND\r\n", b"mg a v\r\n": b"VA 2 t-1\r\nhi\r\n",
               b"incr a 5\r\n": b"NOT_FOUND\r\n", b"mn\r\n": b"MN\r\n"}
    check = rules_check({"command": "get", "keyExact": "a"}, {"command": "set", "keyExact": "a"},
                        {"command": "stats"}, {"command": "noop"})
    reqs = data.draw(st.lists(st.sampled_from(sorted(replies)), min_size=1, max_size=8))
    c = conn(check)
    out = c.receive_client(b"".join(reqs))
    client = out.to_client
    expected = b""
    for req in reqs:
        expected += DENIED if req.startswith(b"incr") else replies[req]
    server = b"".join(replies[r] for r in reqs if not r.startswith(b"incr"))
    for piece in data.draw(splits(server)):
        client += c.receive_server(piece).to_client
    assert client == expected


def test_every_request_name_is_a_policy_command() -> None:
    from cilia.policy.l7.memcache import COMMANDS

    names = {name for _, command, _, _ in FORMS for name in command.split(",")}
    assert names <= set(COMMANDS)
    assert names >= {"set", "add", "replace", "append", "prepend", "cas", "get", "gets", "gat", "gats", "delete",
                     "incr", "decr", "touch", "stats", "version", "verbosity", "flush_all", "quit", "noop"}
