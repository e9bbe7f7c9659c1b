"""The fast path is only a shortcut: whatever ``fastwire`` accepts, dnspython (the reference)
accepts with the same reading. Hypothesis builds queries and answers (random names, case, EDNS,
A/AAAA/CNAME records) and mutates them (flipped bytes, cuts, compression pointers)."""

from __future__ import annotations

import struct

import dns.flags
import dns.message
import dns.rrset
from hypothesis import given, settings
from hypothesis import strategies as st

from cilia.dnsproxy import fastwire, wire

from .test_wire import VALID, mutated

LABEL = st.text("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789-_", min_size=1, max_size=20)
NAME = st.lists(LABEL, min_size=1, max_size=4).map(".".join)


@st.composite
def queries(draw: st.DrawFn) -> bytes:
    q = dns.message.make_query(draw(NAME), draw(st.sampled_from(["A", "AAAA", "TXT", "MX", "HTTPS"])),
                               use_edns=draw(st.sampled_from([False, 0])), id=draw(st.integers(0, 65535)))
    if draw(st.booleans()):
        q.flags |= dns.flags.CD
    return bytes(q.to_wire())


@st.composite
def answers(draw: st.DrawFn) -> tuple[bytes, bytes]:
    raw = draw(queries())
    resp = dns.message.make_response(dns.message.from_wire(raw))
    owner = resp.question[0].name
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["A", "AAAA", "CNAME"]))
        value = {"A": draw(st.sampled_from(["10.0.0.1", "192.0.2.9", "10.0.0.1"])),
                 "AAAA": "fd00::" + draw(st.sampled_from(["1", "2"])), "CNAME": draw(NAME) + "."}[kind]
        resp.answer.append(dns.rrset.from_text(owner, draw(st.integers(0, 86400)), "IN", kind, value))
    if draw(st.booleans()):
        resp.flags |= dns.flags.TC
    resp.set_rcode(draw(st.sampled_from([0, 2, 3, 5])))
    return raw, bytes(resp.to_wire())


def mutate(packet: bytes, data: st.DataObject) -> bytes:
    out = bytearray(packet)
    for _ in range(data.draw(st.integers(0, 3))):
        pos = data.draw(st.integers(0, max(len(out) - 1, 0)))
        kind = data.draw(st.sampled_from(["flip", "cut", "pointer"]))
        if kind == "flip" and out:
            out[pos] = data.draw(st.integers(0, 255))
        elif kind == "cut":
            del out[pos:]
        else:
            out[pos:pos + 2] = struct.pack("!H", 0xC000 | data.draw(st.integers(0, len(out))))
    return bytes(out)


@settings(max_examples=1000, deadline=None)
@given(st.one_of(queries(), mutated(), st.binary(max_size=80)), st.data())
def test_fast_query_reads_as_dnspython(packet: bytes, data: st.DataObject) -> None:
    packet = mutate(packet, data)
    fast = fastwire.query(packet)
    if fast is None:
        return
    ref = wire.parse_query_dnspython(packet)  # raises Malformed if the fast path accepted too much
    got = wire.parse_query(packet)
    assert (got.id, got.name, got.qtype, got.question, got.edns, got.flags) == \
           (ref.id, ref.name, ref.qtype, ref.question, ref.edns, ref.flags)
    for rcode in (wire.REFUSED, wire.SERVFAIL):
        out = dns.message.from_wire(wire.reply(got, rcode))
        assert out.id == ref.id and out.rcode() == rcode
        assert len(out.question) == 1 and (out.edns >= 0) == ref.edns


@settings(max_examples=1000, deadline=None)
@given(answers(), st.data())
def test_fast_answer_reads_as_dnspython(pair: tuple[bytes, bytes], data: st.DataObject) -> None:
    raw, answer = pair
    answer = mutate(answer, data)
    query = wire.parse_query(raw)
    fast = fastwire.answer(answer, query.id, query.question)
    if fast is None:
        return
    ref = wire.read_answer_dnspython(query, answer)
    rcode, ips, ttl, truncated, cnames = fast
    assert (rcode, set(ips), ttl, truncated, set(cnames)) == \
           (ref.rcode, set(ref.ips), ref.ttl, ref.truncated, set(ref.cnames))


def test_the_fast_path_takes_the_common_shapes() -> None:
    assert all(fastwire.query(p) is not None for p in VALID[:3])
    q = wire.parse_query(VALID[0])
    resp = dns.message.make_response(dns.message.from_wire(VALID[0]))
    resp.answer.append(dns.rrset.from_text("api.example.com.", 30, "IN", "A", "10.0.0.1"))
    assert fastwire.answer(bytes(resp.to_wire()), q.id, q.question) == (0, ("10.0.0.1",), 30, False, ())
