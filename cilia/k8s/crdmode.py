"""Kubernetes without a kvstore (Cilium's CRD mode): the API server is the store agents share.

``CRDMode`` holds the parts: ``CRDAllocator`` (identities as ``CiliumIdentity`` objects, the
agent's allocator), ``CiliumEndpointPublisher`` (this node's endpoints as ``CiliumEndpoint``
objects, a realizer sink) and ``RemoteCiliumEndpoints`` (every other node's, through the watcher,
coalesced by ``RemoteFeed`` into one engine change per round, as the kvstore's are). The watcher
lists only this node's pods; every other pod is known from its CiliumEndpoint, with the identity
number its node allocated, which is the number every node allocates for those labels.

    api = connect(...); crd = CRDMode(api, node)
    agent = Agent(AgentConfig(..., allocator=crd.allocator)); agent.start(); crd.attach(agent)
    watcher = crd.watcher(agent, WatchConfig(node_name=node)); watcher.start()
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from ..cluster.remotefeed import RemoteBatch, RemoteFeed, engine_change
from .crd_endpoints import CiliumEndpointPublisher, RemoteCiliumEndpoints
from .crd_identities import CRDAllocator
from .watch import CILIUM_ENDPOINTS, CILIUM_IDENTITIES, WatchConfig, Watcher

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

    from ..agent.daemon import Agent


class CRDMode:
    def __init__(self, api: ApiClient, node: str) -> None:
        self.api = api
        self.node = node
        self.allocator = CRDAllocator(api)
        self.publisher = CiliumEndpointPublisher(api, node)
        self.feed = RemoteFeed(self._apply)
        self.remote = RemoteCiliumEndpoints(node, self.feed.add)
        self.allocator.on_learned.append(self.feed.learned)
        self._agent: Agent | None = None

    def attach(self, agent: Agent) -> None:
        self._agent = agent
        agent.realizer.add(self.publisher)
        self.publisher.start()
        self.feed.start()

    def watcher(self, agent: Agent, config: WatchConfig) -> Watcher:
        """The agent's watcher, with the CiliumIdentity and CiliumEndpoint watches added."""
        from ..agent.api import InProcess

        resources = tuple(dict.fromkeys((*config.resources, CILIUM_IDENTITIES, CILIUM_ENDPOINTS)))
        watcher = Watcher(self.api, InProcess(agent), dataclasses.replace(config, resources=resources),
                          extra={CILIUM_IDENTITIES: self.allocator, CILIUM_ENDPOINTS: self.remote})
        agent.kubernetes = watcher
        return watcher

    def _apply(self, batch: RemoteBatch) -> None:
        if self._agent is not None:
            self._agent.change_engine(engine_change(batch), persist=False)

    def stop(self) -> None:
        self.feed.stop()
        self.publisher.stop()

    def status(self) -> dict[str, Any]:
        return {"identities": self.allocator.status(), "remote_endpoints": len(self.remote.entries),
                "malformed_endpoints": self.remote.malformed, "publish_error": self.publisher.last_error}
