"""Per-stream xDS logic as plain objects: a request goes in, responses come out.

No gRPC here: the server feeds requests and cache-change notices in and writes out
what comes back, so the protocol rules can be tested with in-memory sequences.

Rules of the xDS protocol both variants follow (Envoy relies on each):
- nonces increase along a stream; a request carrying a nonce other than the latest one
  sent for its type is stale and its ACK/NACK is ignored;
- ``error_detail`` marks a NACK; the rejected content counts as sent, so it is not sent
  again until the resources change;
- the first request for a type on a stream always gets the current state (that is how
  a reconnecting Envoy converges);
- under ADS, a response with clusters is followed by the endpoints, so a changed
  cluster is never left warming;
- delta: a subscribed name that does not exist is named once in ``removed_resources``, so the
  node does not wait for its fetch timeout (SotW has no such signal).

Identity: a stream speaks for one node. With ``identity`` (the node id its client certificate
proves) every request must name that node or none; without it the first node id named is the
stream's for good. A request breaking that raises IdentityError (the server answers
PERMISSION_DENIED). With ``known_nodes``, a node it does not accept sees no resources at all and
its answers are not reported: an unknown client can neither read policy nor hold up a wait.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from envoy.config.cluster.v3 import cluster_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.discovery.v3.discovery_pb2 import (
    DeltaDiscoveryRequest,
    DeltaDiscoveryResponse,
    DiscoveryRequest,
    DiscoveryResponse,
)
from google.protobuf import any_pb2

from cilia.xds.cache import Cache
from cilia.xds.types import CLUSTER, ENDPOINT, WILDCARD_TYPES, Resource, ads_rank

__all__ = [
    "DeltaDiscoveryRequest",
    "DeltaDiscoveryResponse",
    "DeltaStream",
    "DiscoveryRequest",
    "DiscoveryResponse",
    "IdentityError",
    "Observer",
    "SotwStream",
]


class IdentityError(Exception):
    """A request named a node its stream may not speak for."""


class Observer(Protocol):
    """Told what a stream sent and what the node answered (AckTracker implements it).

    ``stream`` numbers the stream (unique in the process), so answers on one stream are never
    taken for another's. Called on the stream's thread; an exception raised here ends the stream.
    """

    def on_sent(self, node_id: str, type_url: str, version: str, *, stream: int) -> None: ...

    def on_ack(self, node_id: str, type_url: str, version: str, *, stream: int) -> None: ...

    def on_nack(self, node_id: str, type_url: str, version: str, message: str, *, stream: int) -> None: ...

    def on_closed(self, node_id: str, *, stream: int) -> None: ...


class _NoObserver:
    def on_sent(self, node_id: str, type_url: str, version: str, *, stream: int) -> None:
        pass

    def on_ack(self, node_id: str, type_url: str, version: str, *, stream: int) -> None:
        pass

    def on_nack(self, node_id: str, type_url: str, version: str, message: str, *, stream: int) -> None:
        pass

    def on_closed(self, node_id: str, *, stream: int) -> None:
        pass


_stream_ids = itertools.count(1)


@dataclass(slots=True)
class _TypeStream:
    """One type's state on one stream."""

    wildcard: bool
    names: set[str] = field(default_factory=set)
    sent: dict[str, str] = field(default_factory=dict)  # name -> resource version the node has (or rejected)
    nonce: str = ""  # latest nonce sent for this type
    version: str = ""  # cache version of the latest response
    current: str = ""  # latest cache version whose content equals what was last sent
    acked: bool = False  # the latest response was acked
    started: bool = False  # at least one response went out
    absent: set[str] = field(default_factory=set)  # delta: requested names the node was told do not exist
    recheck: set[str] = field(default_factory=set)  # delta: unsubscribed under a wildcard, answer either way


class _StreamBase:
    def __init__(self, cache: Cache, observer: Observer | None, type_url: str | None, *,
                 identity: str | None = None, known_nodes: Callable[[str], bool] | None = None) -> None:
        self.cache = cache
        self.observer: Observer = observer or _NoObserver()
        self.type_url = type_url  # None: ADS, any type
        self.identity = identity  # the node id the transport proved (client certificate), if any
        self.known_nodes = known_nodes
        self.node_id = identity or ""
        self.stream_id = next(_stream_ids)
        self._nonce = 0
        self._types: dict[str, _TypeStream] = {}

    def _claim(self, node_id: str) -> None:
        """Bind the stream to the node a request names (an empty id names the stream's own)."""
        if not node_id or node_id == self.node_id:
            return
        if self.identity is not None:
            raise IdentityError(f"node id {node_id!r} is not the client certificate's {self.identity!r}")
        if self.node_id:
            raise IdentityError(f"node id {node_id!r} on a stream of node {self.node_id!r}")
        self.node_id = node_id

    def _known(self) -> bool:
        return self.known_nodes is None or self.known_nodes(self.node_id)

    def close(self) -> None:
        """The stream ended: its answers no longer count."""
        self.observer.on_closed(self.node_id, stream=self.stream_id)

    def _sent(self, type_url: str, version: str) -> None:
        if self._known():
            self.observer.on_sent(self.node_id, type_url, version, stream=self.stream_id)

    def _next_nonce(self) -> str:
        self._nonce += 1
        return str(self._nonce)

    def _visible(self, st: _TypeStream, type_url: str) -> tuple[str, dict[str, Resource]]:
        view = self.cache.view(type_url, self.node_id)
        if not self._known():
            return view.version, {}
        if st.wildcard:
            return view.version, dict(view.resources)
        return view.version, {n: r for n, r in view.resources.items() if n in st.names}

    def _ack(self, type_url: str, st: _TypeStream, error: str | None) -> None:
        st.acked = error is None
        if not self._known():
            return
        if error is None:
            self.observer.on_ack(self.node_id, type_url, st.current, stream=self.stream_id)
        else:
            self.observer.on_nack(self.node_id, type_url, st.version, error, stream=self.stream_id)

    def _unchanged(self, type_url: str, st: _TypeStream, version: str) -> None:
        """Content for this node did not change though the type's version may have."""
        if version != st.current:
            st.current = version
            if st.acked and self._known():
                self.observer.on_ack(self.node_id, type_url, version, stream=self.stream_id)

    def _subscribed(self, type_urls: Iterable[str] | None) -> list[str]:
        wanted = self._types.keys() if type_urls is None else [t for t in type_urls if t in self._types]
        return sorted(set(wanted), key=ads_rank)


def _any(r: Resource, type_url: str) -> any_pb2.Any:
    return any_pb2.Any(type_url=type_url, value=r.serialized)


def _eds_names(clusters: Iterable[Resource]) -> set[str]:
    """The EDS resource names that the given clusters wait for."""
    names = set()
    for r in clusters:
        msg = r.message
        if isinstance(msg, cluster_pb2.Cluster) and msg.type == cluster_pb2.Cluster.EDS:
            names.add(msg.eds_cluster_config.service_name or msg.name)
    return names


class SotwStream(_StreamBase):
    """State-of-the-world: every response carries all of a type's subscribed resources."""

    def handle(self, req: DiscoveryRequest) -> list[DiscoveryResponse]:
        type_url = req.type_url or self.type_url or ""
        if self.type_url is not None and type_url != self.type_url:
            return []
        self._claim(req.node.id)
        names = set(req.resource_names)
        wildcard = "*" in names or (not names and type_url in WILDCARD_TYPES)
        names.discard("*")
        st = self._types.get(type_url)
        if st is None:
            st = self._types[type_url] = _TypeStream(wildcard=wildcard, names=names)
            return self._push([type_url], force={type_url})
        if req.response_nonce != st.nonce:
            return []  # stale: Envoy will answer the latest response too
        self._ack(type_url, st, req.error_detail.message if req.HasField("error_detail") else None)
        if wildcard != st.wildcard or names != st.names:
            st.wildcard, st.names = wildcard, names
            return self._push([type_url], force={type_url})
        return self._push([type_url])

    def on_change(self, type_urls: Iterable[str] | None = None) -> list[DiscoveryResponse]:
        """Responses for the subscribed types whose content changed, in ADS order."""
        return self._push(self._subscribed(type_urls))

    def _push(self, type_urls: list[str], force: set[str] | None = None) -> list[DiscoveryResponse]:
        force = set(force or ())
        out: list[DiscoveryResponse] = []
        pending = list(type_urls)
        while pending:
            type_url = pending.pop(0)
            st = self._types[type_url]
            version, res = self._visible(st, type_url)
            sent = {n: r.version for n, r in res.items()}
            if type_url not in force and st.started and sent == st.sent:
                self._unchanged(type_url, st, version)
                continue
            st.sent, st.version, st.current = sent, version, version
            st.nonce, st.acked, st.started = self._next_nonce(), False, True
            out.append(
                DiscoveryResponse(
                    version_info=version,
                    type_url=type_url,
                    nonce=st.nonce,
                    resources=[_any(res[n], type_url) for n in sorted(res)],
                )
            )
            self._sent(type_url, version)
            if type_url == CLUSTER and self.type_url is None and ENDPOINT in self._types:
                force.add(ENDPOINT)  # new clusters warm on EDS: always answer it
                if ENDPOINT not in pending:
                    pending.append(ENDPOINT)
        return out


class DeltaStream(_StreamBase):
    """Incremental: responses carry only changed resources and the names of removed ones."""

    def handle(self, req: DeltaDiscoveryRequest) -> list[DeltaDiscoveryResponse]:
        type_url = req.type_url or self.type_url or ""
        if self.type_url is not None and type_url != self.type_url:
            return []
        self._claim(req.node.id)
        st = self._types.get(type_url)
        first = st is None
        if st is None:
            wildcard = not req.resource_names_subscribe and type_url in WILDCARD_TYPES
            st = self._types[type_url] = _TypeStream(wildcard=wildcard)
            st.sent = dict(req.initial_resource_versions)
        elif req.response_nonce and req.response_nonce == st.nonce:
            self._ack(type_url, st, req.error_detail.message if req.HasField("error_detail") else None)
        # A stale nonce only voids the ACK; subscription changes in the same request still count.
        for name in req.resource_names_subscribe:
            if name == "*":
                st.wildcard = True
            else:
                st.names.add(name)
                st.absent.discard(name)  # asked again: answer again, whether it exists or not
                if not first:
                    st.sent.pop(name, None)  # the node may have forgotten it (xDS spec): send it again
        for name in req.resource_names_unsubscribe:
            if name == "*":
                st.wildcard = False
            else:
                st.names.discard(name)
                st.absent.discard(name)
                st.sent.pop(name, None)  # the node forgets it; a later subscribe sends it again
                if st.wildcard:
                    st.recheck.add(name)  # the wildcard may still cover it: the node must be told which
        return self._push([type_url], first=first)

    def on_change(self, type_urls: Iterable[str] | None = None) -> list[DeltaDiscoveryResponse]:
        return self._push(self._subscribed(type_urls))

    def _push(self, type_urls: list[str], first: bool = False) -> list[DeltaDiscoveryResponse]:
        out: list[DeltaDiscoveryResponse] = []
        pending = sorted(set(type_urls), key=ads_rank)
        force_eds: set[str] = set()
        while pending:
            type_url = pending.pop(0)
            resp, changed = self._push_one(type_url, first, force_eds if type_url == ENDPOINT else set())
            if resp is None:
                continue
            out.append(resp)
            if type_url == CLUSTER and self.type_url is None and ENDPOINT in self._types:
                force_eds = _eds_names(changed)  # new clusters warm on EDS: always answer it
                if force_eds and ENDPOINT not in pending:
                    pending = sorted([*pending, ENDPOINT], key=ads_rank)
        return out

    def _push_one(
        self, type_url: str, first: bool, force: set[str]
    ) -> tuple[DeltaDiscoveryResponse | None, list[Resource]]:
        st = self._types[type_url]
        version, res = self._visible(st, type_url)
        changed = sorted(n for n, r in res.items() if st.sent.get(n) != r.version or n in force)
        # Requested names that do not exist go into removed_resources once, so the node need not
        # wait for its fetch timeout (xDS spec: "Knowing When a Requested Resource Does Not Exist").
        missing = {n for n in st.names | st.recheck if n not in res} - st.absent
        removed = sorted({n for n in st.sent if n not in res} | missing)
        st.recheck.clear()
        if not changed and not removed and not (first and not st.started):
            self._unchanged(type_url, st, version)
            return None, []
        for n in changed:
            st.sent[n] = res[n].version
        for n in removed:
            st.sent.pop(n, None)
        st.absent = {n for n in st.names if n not in res}
        st.version, st.current = version, version
        st.nonce, st.acked, st.started = self._next_nonce(), False, True
        self._sent(type_url, version)
        resp = DeltaDiscoveryResponse(
            system_version_info=version,
            type_url=type_url,
            nonce=st.nonce,
            resources=[
                discovery_pb2.Resource(name=n, version=res[n].version, resource=_any(res[n], type_url)) for n in changed
            ],
            removed_resources=removed,
        )
        return resp, [res[n] for n in changed]
