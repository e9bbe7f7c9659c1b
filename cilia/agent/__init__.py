"""The cilia agent: state, REST API, xDS and Envoy wired together (``cilia agent``)."""

from .daemon import Agent, AgentConfig, AgentError
from ..specs import EndpointSpec, PortSpec, StateError

__all__ = ["Agent", "AgentConfig", "AgentError", "EndpointSpec", "PortSpec", "StateError"]
