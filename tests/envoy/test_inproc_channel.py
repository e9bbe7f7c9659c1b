"""The agent's end of the in-Envoy link, spoken to over its real socket the way the interpreter
inside Envoy speaks (hello, then reports): policy at connect and at every publish, records to the
agent, parser exceptions and slow calls turned into agent errors, a dropped link counted."""

from __future__ import annotations

import time
from multiprocessing.connection import Client
from pathlib import Path

from cilia.envoy.inproc.channel import InprocChannel
from cilia.envoy.l7service import ConnectionInfo
from cilia.envoy.l7views import PolicyViews
from cilia.l7parsers.base import Decision, Record

INFO = ConnectionInfo("l", "ingress", 11211, "memcache", "server", 300)
RECORD = Record({"command": "get", "key": "k"}, Decision(True, "rule", "allowed"))


def _until(predicate: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_views_records_errors_and_disconnects(tmp_path: Path) -> None:
    records: list[tuple[ConnectionInfo, Record]] = []
    errors: list[tuple[str, str]] = []
    channel = InprocChannel(tmp_path / "l7-inproc.sock", lambda _t, info, rec: records.append((info, rec)),
                            on_error=lambda c, m: errors.append((c, m)))
    channel.publish(PolicyViews(4))
    channel.start()
    try:
        assert (tmp_path / "l7-inproc.sock").stat().st_mode & 0o777 == 0o600
        link = Client(str(tmp_path / "l7-inproc.sock"), family="AF_UNIX")
        link.send(("hello", 4242))
        assert link.recv().revision == 4  # the policy before any connection
        channel.publish(PolicyViews(5))
        assert link.recv().revision == 5
        link.send(("report", {"connections": 1, "errors": 0, "slow": 0}, [(1.0, INFO, RECORD)]))
        _until(lambda: records == [(INFO, RECORD)])
        link.send(("report", {"connections": 2, "errors": 2, "slow": 1}, []))
        _until(lambda: len(errors) == 2)
        assert errors == [("l7/inproc", "in-Envoy interpreter 4242: 2 parser exception(s) closed their connection"),
                          ("l7/inproc", "in-Envoy interpreter 4242: 1 call(s) over 10 ms stalled their Envoy worker")]
        [it] = channel.interpreters()
        assert it["pid"] == 4242 and it["connections"] == 2 and not it["stale"]
        link.close()
        _until(lambda: channel.disconnects == 1 and not channel.interpreters())
    finally:
        channel.stop()
    assert not (tmp_path / "l7-inproc.sock").exists()
