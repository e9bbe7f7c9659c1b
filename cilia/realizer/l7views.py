"""The L7 view sink: what the L7 parsers read, one ``PolicyViews`` per revision.

The parsers run on Envoy's streams and must never wait for the agent: they read the views through
a ``ViewSource`` swapped whole here (the in-process service), or get them pickled (worker
processes, ``publish``). Runs before the proxy sink, so a listener that sends a connection to a
parser reaches Envoy only after the parser knows that listener's policy.
"""

from __future__ import annotations

from typing import Protocol

from ..envoy.l7views import PolicyViews, ViewSource
from .desired import Desired


class ViewPublisher(Protocol):
    def publish(self, views: PolicyViews) -> None: ...


class L7ViewSink:
    name = "l7-views"

    def __init__(self) -> None:
        self.source = ViewSource()  # what an in-process L7 service reads
        self._publishers: list[ViewPublisher] = []

    @property
    def views(self) -> PolicyViews:
        return self.source.views

    def attach(self, publisher: ViewPublisher) -> None:
        """Also send every new view to ``publisher`` (a worker pool), starting with the current one."""
        self._publishers.append(publisher)
        publisher.publish(self.source.views)

    def detach(self, publisher: ViewPublisher) -> None:
        self._publishers.remove(publisher)

    def realize(self, desired: Desired) -> None:
        views = PolicyViews(desired.revision, {n: ep.map_state for n, ep in desired.endpoints.items()},
                            {n: ep.audit for n, ep in desired.endpoints.items()})
        self.source.views = views
        for publisher in self._publishers:
            publisher.publish(views)
