"""Between the policy engine and what enforces it: the agent's state at each revision (``Desired``)
handed to sinks (Envoy through xDS, the BPF datapath, the L7 parsers' views, ...) that each
realize only what changed. See docs/architecture.md for how a change travels."""

from .desired import Desired, EndpointState, PortMap
from .realizer import Realizer, Sink

__all__ = ["Desired", "EndpointState", "PortMap", "Realizer", "Sink"]
