"""A fast path for the common DNS shapes, in front of dnspython (which costs ~100 us a message).

``query`` reads a plain standard query (one question of letters, digits, '-' and '_', at most an
OPT record, no compression); ``answer`` reads an answer whose records are all A, AAAA or CNAME
(plus OPT). Anything else returns None and ``wire`` asks dnspython, which stays the authority: a
hypothesis test checks that whatever the fast path accepts, dnspython accepts with the same
reading (tests/dnsproxy/test_fastwire.py).
"""

from __future__ import annotations

import socket
import struct

HEADER = struct.Struct("!HHHHHH")
U16 = struct.Struct("!H")
RR = struct.Struct("!HHIH")  # type, class, ttl, rdlength
A, CNAME, AAAA, OPT = 1, 5, 28, 41
CLASS_IN = 1
QR, OPCODE, TC, RCODE = 0x8000, 0x7800, 0x0200, 0x000F
MAX_HOPS = 16  # dnspython's MAX_COMPRESSION_POINTER_CHAIN
_NAME_BYTES = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


def _opt_ok(packet: bytes, pos: int) -> int:
    """The end of a well-formed OPT record at ``pos`` (root owner, options as TLVs), or -1."""
    if packet[pos:pos + 1] != b"\x00" or pos + 11 > len(packet):
        return -1
    rtype, _cls, ttl, rdlen = RR.unpack_from(packet, pos + 1)
    if rtype != OPT or ttl >> 24 or (ttl >> 16) & 0xFF:  # extended rcode or EDNS version: dnspython's call
        return -1
    at, end = pos + 11, pos + 11 + rdlen
    if end > len(packet):
        return -1
    while at < end:
        if at + 4 > end:
            return -1
        at += 4 + U16.unpack_from(packet, at + 2)[0]
    return end if at == end else -1


def query(packet: bytes) -> tuple[int, str, int, bytes, bool, int] | None:
    """(id, name, qtype, question bytes, has EDNS, flags) of a plain query, or None."""
    if len(packet) < 17:
        return None
    qid, flags, qd, an, ns, ar = HEADER.unpack_from(packet)
    if flags & (QR | OPCODE) or qd != 1 or an or ns or ar > 1:
        return None
    pos, labels = 12, []
    while True:
        n = packet[pos] if pos < len(packet) else -1
        if n == 0:
            pos += 1
            break
        if n < 0 or n > 63 or pos + 1 + n > len(packet):
            return None
        label = packet[pos + 1:pos + 1 + n]
        if not _NAME_BYTES.issuperset(label):
            return None
        labels.append(label.decode("ascii"))
        pos += 1 + n
    if pos - 12 > 255 or not labels or pos + 4 > len(packet):
        return None
    qtype = U16.unpack_from(packet, pos)[0]
    question = packet[12:pos + 4]
    pos += 4
    if ar:
        pos = _opt_ok(packet, pos)
    if pos != len(packet):
        return None
    return qid, ".".join(labels), qtype, question, bool(ar), flags


def _name(packet: bytes, pos: int) -> tuple[list[bytes], int] | None:
    """A possibly compressed name at ``pos`` as dnspython reads it: (labels, position after it)."""
    labels: list[bytes] = []
    biggest = start = pos
    end = len(packet)  # a pointer's target may not run into the part already read
    after = -1
    hops = length = 0
    while True:
        if pos >= end:
            return None
        n = packet[pos]
        if n == 0:
            pos += 1
            break
        if n < 64:
            if pos + 1 + n > end:
                return None
            labels.append(packet[pos + 1:pos + 1 + n])
            length += 1 + n
            pos += 1 + n
        elif n >= 192:
            if pos + 2 > end:
                return None
            target = (n & 0x3F) << 8 | packet[pos + 1]
            if after < 0:
                after = pos + 2
            if target >= biggest:
                return None
            hops += 1
            if hops > MAX_HOPS:
                return None
            biggest = target
            end, start, pos = start, target, target
        else:
            return None
    if length + 1 > 255:
        return None
    return labels, after if after >= 0 else pos


def answer(packet: bytes, qid: int, question: bytes
           ) -> tuple[int, tuple[str, ...], int, bool, tuple[str, ...]] | None:
    """(rcode, ips, ttl, truncated, cnames) of an answer to the query with ``qid`` and
    ``question`` made only of A, AAAA and CNAME records (and OPT), or None."""
    if len(packet) < 12:
        return None
    rid, flags, qd, an, ns, ar = HEADER.unpack_from(packet)
    if rid != qid or not flags & QR or flags & OPCODE or qd != 1 or ar > 1:
        return None
    qend = 12 + len(question)
    got = packet[12:qend]
    if len(got) != len(question) or got[:-4].lower() != question[:-4].lower() or got[-4:] != question[-4:]:
        return None
    pos = qend
    ips: list[str] = []
    cnames: list[str] = []
    ttl = -1
    aliased: set[tuple[bool, bytes]] = set()  # (answer section?, owner): CNAME is a singleton type
    for i in range(an + ns + ar):
        if i == an + ns:  # the additional section: only the OPT record
            pos = _opt_ok(packet, pos)
            if pos < 0:
                return None
            continue
        owner = _name(packet, pos)
        if owner is None:
            return None
        pos = owner[1]
        if pos + 10 > len(packet):
            return None
        rtype, rclass, rttl, rdlen = RR.unpack_from(packet, pos)
        pos += 10
        if rclass != CLASS_IN or pos + rdlen > len(packet) or rttl >> 31:
            return None
        if rtype == A and rdlen == 4 or rtype == AAAA and rdlen == 16:
            if i < an:
                ips.append(socket.inet_ntop(socket.AF_INET if rdlen == 4 else socket.AF_INET6,
                                            packet[pos:pos + rdlen]))
                ttl = rttl if ttl < 0 else min(ttl, rttl)
        elif rtype == CNAME:
            target = _name(packet, pos)
            key = (i < an, b".".join(owner[0]).lower())
            if target is None or target[1] != pos + rdlen or not _printable(target[0]) or key in aliased:
                return None  # (a second CNAME for one name: dnspython keeps one; let it decide)
            aliased.add(key)
            if i < an:
                cnames.append(".".join(label.decode("ascii") for label in target[0]))
        else:
            return None
        pos += rdlen
    if pos != len(packet):
        return None
    return flags & RCODE, tuple(dict.fromkeys(ips)), max(ttl, 0), bool(flags & TC), tuple(dict.fromkeys(cnames))


def _printable(labels: list[bytes]) -> bool:
    return all(_NAME_BYTES.issuperset(label) for label in labels)


def reply(qid: int, flags: int, question: bytes, edns: bool, rcode: int) -> bytes:
    """An answer without records: the query's id, RD and CD, its question, an OPT record if it
    had one (version 0, 1232 bytes: the DNS flag day's size), and ``rcode``."""
    rd_cd = flags & 0x0110
    out = HEADER.pack(qid, QR | rd_cd | (0x0080 if rd_cd & 0x0100 else 0) | (rcode & RCODE), 1, 0, 0,
                      1 if edns else 0) + question
    if edns:
        out += b"\x00" + RR.pack(OPT, 1232, 0, 0)
    return out
