"""What the agent saw: flows (``cilia observe``) and the datapath's events (``cilia monitor``).

Envoy's access-log records, the L7 parsers' records and the kernel's events each become a ``Flow``
when they arrive, both sides named from a ``Who`` snapshot that the ``FlowNames`` sink replaces
whole at each revision, so recording never waits for the agent's lock.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..bpf.datapath import DatapathEvent
from ..envoy.accesslog import AccessRecord
from ..envoy.l7service import ConnectionInfo
from ..l7parsers.base import Record
from ..policy.mapstate import MapState
from ..realizer import Desired
from ..realizer.desired import CLOSED, INIT
from ..services.model import Service
from ..ring import SeqRing
from .flows import (Flow, FlowFile, FlowFilter, Who, from_access, from_datapath, from_dns, from_l7, names_of_services,
                    unknown_pods)
from .hubble import export_line
from .metrics import Metrics

if TYPE_CHECKING:
    from ..dnsproxy.server import DNSRecord  # a type only: the agent's flows need no dnspython

_log = logging.getLogger(__name__)


class Observer:
    def __init__(self, node_id: str, metrics: Metrics, ring_size: int, flow_file: FlowFile | None) -> None:
        self.node_id = node_id
        self.metrics = metrics
        self.flow_log: SeqRing[Flow] = SeqRing(ring_size)
        self.monitor_log: SeqRing[DatapathEvent] = SeqRing(ring_size)
        self.flow_file = flow_file
        self.who = Who.empty()  # replaced by FlowNames at each revision (a new snapshot)
        self._lock = threading.Lock()  # numbers a flow and writes it to the file as one step
        self.on_l7_error: Any = None  # callable(component, message), for status's last errors

    def close(self) -> None:
        if self.flow_file is not None:
            self.flow_file.close()

    def record(self, flow: Flow) -> None:
        self.record_many((flow,))

    def record_many(self, flows: Sequence[Flow]) -> None:
        """Number ``flows`` in order (one lock for them all) and write them to the file."""
        with self._lock:
            last = self.flow_log.extend(flows)
            if self.flow_file is not None:
                try:
                    for seq, flow in enumerate(flows, last - len(flows) + 1):
                        self.flow_file.write(seq, flow)
                except OSError:
                    _log.exception("cannot write the flow file")
        self.metrics.flows(flows)  # Hubble's flow metrics

    # ------------------------------------------------------------------ arrivals

    def on_access_record(self, record: AccessRecord) -> None:
        self.record(from_access(record, self.who))
        if record.kind == "http":
            self.metrics.l7("http", not record.denied)

    def on_datapath_event(self, event: DatapathEvent) -> None:
        self.monitor_log.append(event)
        self.metrics.datapath(event)
        if event.type != "trace":  # flows are verdicts; packet traces would only crowd them out
            self.record(from_datapath(event, self.who, self.node_id))

    def on_worker_record(self, when: float, info: ConnectionInfo, record: Record) -> None:
        self.on_l7_record(info, record, when)

    def on_l7_record(self, info: ConnectionInfo, record: Record, when: float | None = None) -> None:
        self.record(from_l7(when or time.time(), info, record, self.who, self.node_id))
        if not record.handshake:  # a protocol step the parser answered itself was not a policy decision
            self.metrics.l7(info.protocol, None if "error" in record.summary else record.decision.allowed)
        if "error" in record.summary and self.on_l7_error is not None:
            self.on_l7_error(f"l7/{info.protocol}", f"{info.listener}: {record.summary['error']}")

    def on_dns_records(self, records: Sequence[DNSRecord]) -> None:
        """Queries the DNS proxy handled (issue 17), a batch per turn of its loop."""
        who, node = self.who, self.node_id
        self.record_many([from_dns(r, who, node) for r in records])
        self.metrics.dns(records)

    # ------------------------------------------------------------------ reading

    def flows(self, since: int | None = None, limit: int | None = None,
              flow_filter: FlowFilter | None = None) -> dict[str, Any]:
        """Flows numbered above ``since`` that pass ``flow_filter``, oldest first; with ``limit``
        the newest that many of them. A first query (no ``since``) naming a pod that neither an
        endpoint nor a recorded flow has raises ``UnknownPod``."""
        items = self.flow_log.since(since)
        if flow_filter is not None and since is None:
            unknown_pods(flow_filter, self.who, [side for _, f in items for side in (f.source, f.destination)])
        if flow_filter is not None:
            items = [(n, f) for n, f in items if flow_filter.matches(f)]
        if limit is not None:
            items = items[-limit:] if limit > 0 else []
        return {"last": self.flow_log.last_seq(), "flows": [export_line(f, n) for n, f in items]}

    def monitor(self, since: int | None, limit: int | None, wait: float) -> dict[str, Any]:
        items = self.monitor_log.since(since, limit, wait)
        who = self.who  # names both sides, as the flows do
        events = [{"seq": n, **_event_json(ev, who)} for n, ev in items]
        return {"last": self.monitor_log.last_seq(), "events": events}


class FlowNames:
    """The sink that gives the observer a new ``Who`` at each revision."""

    name = "flow-names"

    def __init__(self, observer: Observer) -> None:
        self.observer = observer
        self._empty = observer.who  # until the first revision: made whole then
        self._services: tuple[Service, ...] = ()
        self._service_names: dict[str, tuple[str, str]] = {}
        self._waiting: dict[str, _Named] = {}

    def realize(self, desired: Desired) -> None:
        services_moved = desired.services is not self._services  # the same tuple while the services stay
        if services_moved:
            self._services, self._service_names = desired.services, names_of_services(desired.services)
        # endpoints waiting for their identity (issue 13) are named too: as reserved:init, all closed
        waiting = {n: _Named(w.ips, INIT, w.endpoint_id, CLOSED) for n, w in desired.waiting.items()}
        if desired.changed is None or self.observer.who is self._empty:
            eps = {n: _Named(ep.ips, ep.identity, ep.endpoint_id, ep.map_state)
                   for n, ep in desired.endpoints.items()} | waiting
            self.observer.who = Who({n: (ep.ips, ep.identity) for n, ep in eps.items()}, desired.labels,
                                    desired.ipcache,
                                    {ep.endpoint_id: n for n, ep in eps.items() if ep.endpoint_id is not None},
                                    {n: ep.map_state for n, ep in eps.items()}, self._service_names)
            self._waiting = waiting
            return
        changed: dict[str, _Named | None] = {n: waiting.get(n) for n in self._waiting.keys() | waiting.keys()
                                             if self._waiting.get(n) != waiting.get(n)}
        for n in desired.changed:
            ep = desired.endpoints.get(n)
            changed[n] = _Named(ep.ips, ep.identity, ep.endpoint_id, ep.map_state) if ep is not None \
                else waiting.get(n)
        self._waiting = waiting
        self.observer.who = self.observer.who.changed(
            {n: (ep.ips, ep.identity) if ep is not None else None for n, ep in changed.items()}, desired.labels,
            desired.ipcache, {n: ep.endpoint_id if ep is not None else None for n, ep in changed.items()},
            {n: ep.map_state if ep is not None else None for n, ep in changed.items()},
            self._service_names if services_moved else None)


@dataclass(frozen=True, slots=True)
class _Named:
    """What ``Who`` needs of an endpoint, ready or waiting for its identity."""

    ips: tuple[str, ...]
    identity: int
    endpoint_id: int | None
    map_state: MapState


def _event_json(ev: DatapathEvent, who: Who) -> dict[str, Any]:
    return {**ev.to_json(), "time": datetime.fromtimestamp(ev.time, UTC).isoformat(),
            "endpoint": who.endpoint_ids.get(ev.endpoint_id, ""),
            "source": who.peer(ev.source, ev.source_port, ev.source_identity).to_json(),
            "destination": who.peer(ev.destination, ev.destination_port, ev.destination_identity).to_json()}
