"""Completions: wait for a node's ACK of a version, fail with the NACK text, or time out; answers
are kept per stream, so one stream cannot answer for another of the same node."""

from __future__ import annotations

import threading

import pytest

from cilia.xds.acks import AckState, AckTracker, NackError
from cilia.xds.types import LISTENER


def later(fn: object, *args: str, stream: int = 1) -> threading.Thread:
    t = threading.Thread(target=fn, args=args, kwargs={"stream": stream})  # type: ignore[arg-type]
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
    tracker.on_ack("n1", LISTENER, "e-1", stream=1)
    t = later(tracker.on_nack, "n1", LISTENER, "e-2", "missing ): (")
    with pytest.raises(NackError) as err:
        tracker.wait("n1", LISTENER, "e-2", timeout=10)
    t.join()
    assert err.value.message == "missing ): ("
    assert err.value.version == "e-2"
    # A later good version clears it.
    tracker.on_ack("n1", LISTENER, "e-3", stream=1)
    tracker.wait("n1", LISTENER, "e-3", timeout=0)


def test_wait_times_out_and_other_epochs_do_not_count() -> None:
    tracker = AckTracker()
    tracker.on_ack("n1", LISTENER, "old-9", stream=1)
    with pytest.raises(TimeoutError):
        tracker.wait("n1", LISTENER, "new-1", timeout=0.05)
    with pytest.raises(TimeoutError):
        tracker.wait("n2", LISTENER, "old-1", timeout=0)


def test_a_second_stream_of_the_node_cannot_ack_for_the_first() -> None:
    tracker = AckTracker()
    tracker.on_sent("n1", LISTENER, "e-2", stream=1)  # the real proxy: sent, not answered yet
    tracker.on_sent("n1", LISTENER, "e-2", stream=2)
    tracker.on_ack("n1", LISTENER, "e-2", stream=2)  # another stream naming n1 acks at once
    with pytest.raises(TimeoutError):
        tracker.wait("n1", LISTENER, "e-2", timeout=0.05)
    assert tracker.state("n1", LISTENER).acked == ""  # what every open stream of n1 holds
    tracker.on_ack("n1", LISTENER, "e-2", stream=1)
    tracker.wait("n1", LISTENER, "e-2", timeout=0)


def test_a_nack_stays_on_its_stream_and_ends_with_it() -> None:
    tracker = AckTracker()
    tracker.on_sent("n1", LISTENER, "e-2", stream=1)
    tracker.on_ack("n1", LISTENER, "e-2", stream=1)
    tracker.on_sent("n1", LISTENER, "e-2", stream=2)
    tracker.on_nack("n1", LISTENER, "e-2", "no", stream=2)
    with pytest.raises(NackError):  # an admitted proxy of n1 rejected it: n1 has not realized it
        tracker.wait("n1", LISTENER, "e-2", timeout=0)
    assert tracker.state("n1", LISTENER).nack_message == "no"
    assert tracker.streams("n1") == 2
    tracker.on_closed("n1", stream=2)
    assert tracker.streams("n1") == 1
    tracker.wait("n1", LISTENER, "e-2", timeout=0)  # stream 1's own ACK was never overwritten
    assert tracker.state("n1", LISTENER) == AckState(sent="e-2", acked="e-2")


def test_after_the_last_stream_closes_its_last_answer_stands() -> None:
    tracker = AckTracker()
    tracker.on_sent("n1", LISTENER, "e-1", stream=1)
    tracker.on_ack("n1", LISTENER, "e-1", stream=1)
    tracker.on_closed("n1", stream=1)
    tracker.wait("n1", LISTENER, "e-1", timeout=0)
    assert set(tracker.states()) == {("n1", LISTENER)}
