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
        eps = desired.endpoints
        last = self.source.views
        if desired.changed is None:
            map_states = {n: ep.map_state for n, ep in eps.items()}
            audits = {n: ep.audit for n, ep in eps.items()}
        else:  # the last views (never changed: readers hold them) copied, and the endpoints the change names
            map_states, audits = dict(last.map_states), dict(last.audits)
            for name in desired.changed:
                if name in eps:
                    map_states[name], audits[name] = eps[name].map_state, eps[name].audit
                else:
                    map_states.pop(name, None)
                    audits.pop(name, None)
        views = PolicyViews(desired.revision, map_states, audits)
        self.source.views = views
        for publisher in self._publishers:
            publisher.publish(views)
