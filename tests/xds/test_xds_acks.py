"""Completions: wait for a node's ACK of a version, fail with the NACK text, or time out."""

from __future__ import annotations

import threading

import pytest

from cilia.xds.acks import AckTracker, NackError
from cilia.xds.types import LISTENER


def later(fn: object, *args: str) -> threading.Thread:
    t = threading.Thread(target=fn, args=args)  # type: ignore[arg-type]
    t.start()
    return t


def test_wait_returns_on_ack_of_that_version_or_later() -> None:
    tracker = AckTracker()
    t = later(tracker.on_ack, "n1", LISTENER, "e-3")
    tracker.wait("n1", LISTENER, "e-2", timeout=10)
    t.join()
    tracker.wait("n1", LISTENER, "e-3", timeout=0)


def test_wait_raises_the_nack_message() -> None:
    tracker = AckTracker()
    tracker.on_ack("n1", LISTENER, "e-1")
    t = later(tracker.on_nack, "n1", LISTENER, "e-2", "missing ): (")
    with pytest.raises(NackError) as err:
        tracker.wait("n1", LISTENER, "e-2", timeout=10)
    t.join()
    assert err.value.message == "missing ): ("
    assert err.value.version == "e-2"
    # A later good version clears it.
    tracker.on_ack("n1", LISTENER, "e-3")
    tracker.wait("n1", LISTENER, "e-3", timeout=0)


def test_wait_times_out_and_other_epochs_do_not_count() -> None:
    tracker = AckTracker()
    tracker.on_ack("n1", LISTENER, "old-9")
    with pytest.raises(TimeoutError):
        tracker.wait("n1", LISTENER, "new-1", timeout=0.05)
    with pytest.raises(TimeoutError):
        tracker.wait("n2", LISTENER, "old-1", timeout=0)
