"""Feeding a sans-I/O parser its bytes in pieces, as the network may cut them.

A parser must answer the same however a stream arrives: whole, in fixed-size chunks (1 = at every
byte boundary), or cut at random points. The parser tests, the fuzzers and the relay all cut with
these and add the parser's outputs up with ``feed``.
"""

from __future__ import annotations

from collections.abc import Iterable

from hypothesis import strategies as st

from cilia.l7parsers.base import L7Connection, Output


def chunked(data: bytes, size: int = 0) -> list[bytes]:
    """``data`` whole (``size`` 0) or in pieces of ``size`` bytes (none at all for empty data)."""
    if not size:
        return [data]
    return [data[i:i + size] for i in range(0, len(data), size)]


def cut(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    """``data`` cut at ``cuts``, each taken modulo ``len(data) + 1`` so that any integer a fuzzer
    draws is a cut point; no piece is empty."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


@st.composite
def splits(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """``data`` cut at up to 12 drawn points; repeated points give empty pieces in between."""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]


def feed(conn: L7Connection, pieces: bytes | Iterable[bytes], side: str = "client") -> Output:
    """Hand ``pieces`` (bytes: one piece) to the parser's ``side`` in order; the outputs added up."""
    if side not in ("client", "server"):
        raise ValueError(f"side must be 'client' or 'server', not {side!r}")
    receive = conn.receive_client if side == "client" else conn.receive_server
    if isinstance(pieces, bytes):
        return receive(pieces)
    out = Output()
    for piece in pieces:
        out = out + receive(piece)
    return out
