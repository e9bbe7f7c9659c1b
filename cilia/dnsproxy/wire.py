"""DNS messages as the proxy needs them, without I/O: parse a query (or refuse to), build the
REFUSED and SERVFAIL replies, read an upstream's answer, frame DNS over TCP.

Anything that does not parse as exactly one standard query is ``Malformed``: the proxy drops and
counts it and never forwards it. dnspython does the wire format (names, compression pointers,
EDNS0); every exception it or the bytes raise while parsing counts as malformed, since the
packet comes from an untrusted pod. The common shapes go through ``fastwire`` first (dnspython
costs ~100 us a message); it accepts only what dnspython reads the same way.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.name
import dns.rdatatype

from . import fastwire

MAX_UDP = 65535
REFUSED = int(dns.rcode.REFUSED)
SERVFAIL = int(dns.rcode.SERVFAIL)


class Malformed(ValueError):
    """Bytes that are not one well-formed DNS query (or answer)."""


@dataclass(frozen=True)
class Query:
    id: int
    name: str  # the question's name, without the trailing dot ("" for the root)
    qtype: str  # "A", "AAAA", ...
    wire: bytes  # forwarded unchanged
    question: bytes  # the question section as sent (name uncompressed, type, class)
    edns: bool  # it had an OPT record
    flags: int


@dataclass(frozen=True)
class Answer:
    rcode: int
    ips: tuple[str, ...]  # every A/AAAA record in the answer section (CNAME targets' included)
    ttl: int  # the smallest TTL of those records (0 without any)
    truncated: bool  # TC: the client retries over TCP
    cnames: tuple[str, ...]
    wire: bytes  # released to the client unchanged

    @property
    def rcode_name(self) -> str:
        return _rcode_text(self.rcode)


@lru_cache(maxsize=64)
def _rcode_text(rcode: int) -> str:
    return dns.rcode.to_text(dns.rcode.Rcode(rcode)) if 0 <= rcode < 4096 else str(rcode)


def _from_wire(wire: bytes) -> dns.message.Message:
    try:
        return dns.message.from_wire(wire)
    except (dns.exception.DNSException, ValueError, KeyError, IndexError, UnicodeError, struct.error,
            TypeError, OverflowError, RecursionError) as e:
        raise Malformed(f"{type(e).__name__}: {e}") from None


@lru_cache(maxsize=256)
def _type_text(rdtype: int) -> str:
    return dns.rdatatype.to_text(dns.rdatatype.RdataType.make(rdtype))


def parse_query(wire: bytes) -> Query:
    """One standard query with exactly one question, or ``Malformed``. A plain query read
    before (the same bytes after the id: clients ask the same names over and over) is not read
    again."""
    seen = _QUERIES.get(wire[2:])
    if seen is not None:
        return Query(wire[0] << 8 | wire[1], seen.name, seen.qtype, wire, seen.question, seen.edns, seen.flags)
    fast = fastwire.query(wire)
    if fast is not None:
        qid, name, qtype, question, edns, flags = fast
        query = Query(qid, name, _type_text(qtype), wire, question, edns, flags)
        _remember(_QUERIES, wire[2:], query)
        return query
    return parse_query_dnspython(wire)


# plain messages read by the fast path, by their bytes after the id (bounded: cleared when full)
_QUERIES: dict[bytes, Query] = {}
_ANSWERS: dict[tuple[bytes, bytes], tuple[int, tuple[str, ...], int, bool, tuple[str, ...]]] = {}
SEEN_MAX = 4096


def _remember(seen: dict[Any, Any], key: Any, value: Any) -> None:
    if len(seen) >= SEEN_MAX:
        seen.clear()
    seen[key] = value


def parse_query_dnspython(wire: bytes) -> Query:
    """``parse_query`` by dnspython alone (the fast path's reference)."""
    msg = _from_wire(wire)
    if msg.flags & dns.flags.QR:
        raise Malformed("a response, not a query")
    if msg.opcode() != dns.opcode.QUERY:
        raise Malformed(f"opcode {dns.opcode.to_text(msg.opcode())}, not QUERY")
    if len(msg.question) != 1:
        raise Malformed(f"{len(msg.question)} questions (one is allowed)")
    q = msg.question[0]
    name = q.name.to_text(omit_final_dot=True)
    question = b"".join(bytes([len(label)]) + label for label in q.name.labels) + struct.pack("!HH", q.rdtype,
                                                                                            q.rdclass)
    return Query(msg.id, "" if name == "@" else name, _type_text(q.rdtype), wire, question, msg.edns >= 0,
                 msg.flags)


def reply(query: Query, rcode: int) -> bytes:
    """An answer to ``query`` with its id, question and EDNS0 (if it had it) and ``rcode``."""
    return fastwire.reply(query.id, query.flags, query.question, query.edns, rcode)


def read_answer(query: Query, wire: bytes) -> Answer:
    """The upstream's answer to ``query``: ``Malformed`` if it does not parse or answers another
    question (its id or question differ)."""
    key = (query.question, wire[2:])
    fast = _ANSWERS.get(key) if wire[:2] == query.wire[:2] else None  # the same id, and read before
    if fast is None:
        fast = fastwire.answer(wire, query.id, query.question)
        if fast is None:
            return read_answer_dnspython(query, wire)
        _remember(_ANSWERS, key, fast)
    return Answer(*fast, wire=wire)


def read_answer_dnspython(query: Query, wire: bytes) -> Answer:
    """``read_answer`` by dnspython alone (the fast path's reference)."""
    msg = _from_wire(wire)
    if not msg.flags & dns.flags.QR or msg.id != query.id:
        raise Malformed("not the answer to this query")
    qname, used = dns.name.from_wire(query.question, 0)
    qtype = struct.unpack_from("!H", query.question, used)[0]
    if msg.question and (len(msg.question) != 1 or msg.question[0].name != qname
                         or msg.question[0].rdtype != qtype):
        raise Malformed("an answer to another question")
    ips: list[str] = []
    cnames: list[str] = []
    ttls: list[int] = []
    for rrset in msg.answer:
        if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            ips += [rd.address for rd in rrset]
            ttls.append(rrset.ttl)
        elif rrset.rdtype == dns.rdatatype.CNAME:
            cnames += [rd.target.to_text(omit_final_dot=True) for rd in rrset]
    return Answer(msg.rcode(), tuple(dict.fromkeys(ips)), min(ttls, default=0), bool(msg.flags & dns.flags.TC),
                  tuple(cnames), wire)


# --- DNS over TCP: each message behind its 2-byte length (RFC 1035 4.2.2) -------------------------

def frame(message: bytes) -> bytes:
    return struct.pack("!H", len(message)) + message


class Framer:
    """Splits a TCP byte stream into DNS messages (several per read, or one across many)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        out: list[bytes] = []
        while len(self._buf) >= 2:
            size = struct.unpack_from("!H", self._buf)[0]
            if len(self._buf) < 2 + size:
                break
            out.append(bytes(self._buf[2:2 + size]))
            del self._buf[:2 + size]
        return out

    @property
    def pending(self) -> int:
        """Bytes of an incomplete message."""
        return len(self._buf)
