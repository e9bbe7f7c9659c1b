"""DNS messages as the proxy needs them, without I/O: parse a query (or refuse to), build the
REFUSED and SERVFAIL replies, read an upstream's answer, frame DNS over TCP.

Anything that does not parse as exactly one standard query is ``Malformed``: the proxy drops and
counts it and never forwards it. dnspython does the wire format (names, compression pointers,
EDNS0); every exception it or the bytes raise while parsing counts as malformed, since the
packet comes from an untrusted pod.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype

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
    message: dns.message.Message
    wire: bytes  # forwarded unchanged


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
        return dns.rcode.to_text(dns.rcode.Rcode(self.rcode)) if 0 <= self.rcode < 4096 else str(self.rcode)


def _from_wire(wire: bytes) -> dns.message.Message:
    try:
        return dns.message.from_wire(wire)
    except (dns.exception.DNSException, ValueError, KeyError, IndexError, UnicodeError, struct.error,
            TypeError, OverflowError, RecursionError) as e:
        raise Malformed(f"{type(e).__name__}: {e}") from None


def parse_query(wire: bytes) -> Query:
    """One standard query with exactly one question, or ``Malformed``."""
    msg = _from_wire(wire)
    if msg.flags & dns.flags.QR:
        raise Malformed("a response, not a query")
    if msg.opcode() != dns.opcode.QUERY:
        raise Malformed(f"opcode {dns.opcode.to_text(msg.opcode())}, not QUERY")
    if len(msg.question) != 1:
        raise Malformed(f"{len(msg.question)} questions (one is allowed)")
    q = msg.question[0]
    name = q.name.to_text(omit_final_dot=True)
    return Query(msg.id, "" if name == "@" else name, dns.rdatatype.to_text(q.rdtype), msg, wire)


def reply(query: Query, rcode: int) -> bytes:
    """An answer to ``query`` with its id, question and EDNS0 (if it had it) and ``rcode``."""
    resp = dns.message.make_response(query.message)
    resp.set_rcode(dns.rcode.Rcode(rcode))
    resp.flags |= dns.flags.RA if query.message.flags & dns.flags.RD else 0
    return bytes(resp.to_wire())


def read_answer(query: Query, wire: bytes) -> Answer:
    """The upstream's answer to ``query``: ``Malformed`` if it does not parse or answers another
    question (its id or question differ)."""
    msg = _from_wire(wire)
    if not msg.flags & dns.flags.QR or msg.id != query.id:
        raise Malformed("not the answer to this query")
    if msg.question and (len(msg.question) != 1 or msg.question[0].name != query.message.question[0].name
                         or msg.question[0].rdtype != query.message.question[0].rdtype):
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
