"""The DNS proxy's sans-I/O part: parsing queries (and refusing what is not one), building REFUSED
and SERVFAIL, reading answers, TCP framing. Hypothesis throws malformed, truncated and
compression-looping packets at it: the only failure is ``Malformed``, never a crash."""

from __future__ import annotations

import struct

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cilia.dnsproxy import wire

HEADER = struct.Struct("!6H")


def query(name: str = "api.example.com", rdtype: str = "A", **kw: object) -> bytes:
    return bytes(dns.message.make_query(name, rdtype, **kw).to_wire())  # type: ignore[arg-type]


def test_parse_query_reads_the_question() -> None:
    q = wire.parse_query(query("API.Example.com.", "AAAA", id=4242))
    assert (q.id, q.name, q.qtype) == (4242, "API.Example.com", "AAAA")


@pytest.mark.parametrize("packet, why", [
    (b"", "ShortHeader"),
    (query()[:11], "ShortHeader"),  # a header cut short
    (query()[:-3], "FormError"),  # a question cut short
    (bytes(dns.message.make_response(dns.message.make_query("a.test", "A")).to_wire()), "response"),
    (HEADER.pack(1, 0, 0, 0, 0, 0), "0 questions"),
    (HEADER.pack(1, 0, 2, 0, 0, 0) + query()[12:] + query()[12:], "2 questions"),
    (HEADER.pack(1, 0x2000, 1, 0, 0, 0) + query()[12:], "opcode NOTIFY"),
])
def test_what_is_not_one_query_is_malformed(packet: bytes, why: str) -> None:
    with pytest.raises(wire.Malformed, match=why):
        wire.parse_query(packet)


def test_compression_loops_are_malformed() -> None:
    self_loop = HEADER.pack(1, 0x0100, 1, 0, 0, 0) + b"\xc0\x0c" + b"\x00\x01\x00\x01"
    two_loop = HEADER.pack(1, 0x0100, 1, 0, 0, 0) + b"\x01a\xc0\x0e\xc0\x0c" + b"\x00\x01\x00\x01"
    forward = HEADER.pack(1, 0x0100, 1, 0, 0, 0) + b"\xc0\x20" + b"\x00\x01\x00\x01"
    for packet in (self_loop, two_loop, forward):
        with pytest.raises(wire.Malformed):
            wire.parse_query(packet)


@pytest.mark.parametrize("rcode", [wire.REFUSED, wire.SERVFAIL])
def test_replies_keep_id_question_and_edns(rcode: int) -> None:
    q = wire.parse_query(query("denied.test", "TXT", id=777, use_edns=0, payload=1232))
    out = dns.message.from_wire(wire.reply(q, rcode))
    assert out.id == 777 and out.rcode() == rcode and out.flags & dns.flags.QR
    assert [(r.name.to_text(), r.rdtype) for r in out.question] == [("denied.test.", dns.rdatatype.TXT)]
    assert out.edns == 0 and not out.answer
    plain = dns.message.from_wire(wire.reply(wire.parse_query(query(use_edns=False)), rcode))
    assert plain.edns == -1  # no EDNS0 in the answer when the query had none


def _answer(q: bytes, *records: tuple[str, str, str], tc: bool = False, rcode: int = 0) -> bytes:
    resp = dns.message.make_response(dns.message.from_wire(q))
    for name, rdtype, value in records:
        resp.answer.append(dns.rrset.from_text(name, 60 if rdtype != "AAAA" else 30, "IN", rdtype, value))
    if tc:
        resp.flags |= dns.flags.TC
    resp.set_rcode(dns.rcode.Rcode(rcode))
    return bytes(resp.to_wire())


def test_read_answer_collects_addresses_through_a_cname_chain() -> None:
    raw = query("alias.test", "A", id=9)
    q = wire.parse_query(raw)
    a = wire.read_answer(q, _answer(raw, ("alias.test.", "CNAME", "mid.test."), ("mid.test.", "CNAME", "target.test."),
                                    ("target.test.", "A", "10.0.0.1"), ("target.test.", "A", "10.0.0.2")))
    assert a.ips == ("10.0.0.1", "10.0.0.2") and a.cnames == ("mid.test", "target.test") and a.ttl == 60
    assert a.rcode_name == "NOERROR" and not a.truncated
    six = wire.read_answer(q, _answer(raw, ("alias.test.", "AAAA", "fd00::1"), tc=True))
    assert six.ips == ("fd00::1",) and six.ttl == 30 and six.truncated
    assert wire.read_answer(q, _answer(raw, rcode=3)).rcode_name == "NXDOMAIN"


def test_read_answer_refuses_answers_to_something_else() -> None:
    raw = query("a.test", "A", id=5)
    q = wire.parse_query(raw)
    with pytest.raises(wire.Malformed):
        wire.read_answer(q, _answer(query("a.test", "A", id=6)))  # another id
    with pytest.raises(wire.Malformed):
        wire.read_answer(q, _answer(query("b.test", "A", id=5)))  # another question
    with pytest.raises(wire.Malformed):
        wire.read_answer(q, raw)  # a query, not an answer


def test_a_repeated_query_or_answer_is_read_as_the_first_with_its_own_id() -> None:
    """Plain messages are remembered by their bytes after the id: a repeat under another id
    reads the same except for the id, and an answer's id must still be the query's."""
    first, again = query("repeat.test", "A", id=11), query("repeat.test", "A", id=12)
    assert first[2:] == again[2:]
    q1, q2 = wire.parse_query(first), wire.parse_query(again)
    assert (q2.id, q2.wire) == (12, again) and q2 == wire.parse_query_dnspython(again)
    assert (q1.name, q1.qtype, q1.question, q1.edns, q1.flags) == (q2.name, q2.qtype, q2.question, q2.edns, q2.flags)
    a1 = wire.read_answer(q1, _answer(first, ("repeat.test.", "A", "10.0.0.9")))
    answer2 = _answer(again, ("repeat.test.", "A", "10.0.0.9"))
    a2 = wire.read_answer(q2, answer2)
    assert a2.wire == answer2 and a2 == wire.read_answer_dnspython(q2, answer2) and a1.ips == a2.ips
    with pytest.raises(wire.Malformed):
        wire.read_answer(q1, answer2)  # read before, but the answer to the other id


@given(st.lists(st.binary(max_size=300), max_size=6), st.data())
def test_framer_reassembles_any_chunking(messages: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(wire.frame(m) for m in messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    framer, out, start = wire.Framer(), [], 0
    for cut in [*cuts, len(stream)]:
        out += framer.feed(stream[start:cut])
        start = cut
    assert out == messages and framer.pending == 0


# --- fuzzing: zero crashes -------------------------------------------------------------------------

VALID = [query(), query("x.example.com", "AAAA", use_edns=0), query("a" * 63 + ".test", "TXT"),
         bytes(dns.message.make_query("edns.test", "A", use_edns=0,
                                      options=[dns.edns.GenericOption(10, b"\x01" * 8)]).to_wire())]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    packet = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "pointer"]))
        pos = draw(st.integers(0, max(len(packet) - 1, 0)))
        if kind == "flip" and packet:
            packet[pos] = draw(st.integers(0, 255))
        elif kind == "cut":
            del packet[pos:]
        elif kind == "insert":
            packet[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        else:  # a compression pointer anywhere, often back into itself
            packet[pos:pos + 2] = struct.pack("!H", 0xC000 | draw(st.integers(0, len(packet) + 4)))
    return bytes(packet)


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=600), mutated()))
def test_fuzz_parse_query_only_ever_raises_malformed(packet: bytes) -> None:
    try:
        q = wire.parse_query(packet)
    except wire.Malformed:
        return
    assert q.wire == packet  # what is forwarded is exactly what parsed
    for rcode in (wire.REFUSED, wire.SERVFAIL):
        out = dns.message.from_wire(wire.reply(q, rcode))
        assert out.id == q.id and out.rcode() == rcode


@settings(max_examples=1500, deadline=None)
@given(st.one_of(st.binary(max_size=600), mutated()))
def test_fuzz_read_answer_only_ever_raises_malformed(packet: bytes) -> None:
    q = wire.parse_query(VALID[0])
    try:
        wire.read_answer(q, packet)
    except wire.Malformed:
        pass
