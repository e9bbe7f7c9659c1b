"""cilia.policy: the single source of policy truth.

Stages (each a named, immutable value built by a named step):

    YAML --parse--> Policy --compile--> CompiledRule
         --resolve--> SelectorPolicy (per endpoint, in selectors)
         --distill--> MapState (per endpoint, in identities) --> Envoy / BPF

``PolicyEngine`` keeps policies, endpoints and identities resolved incrementally;
``trace`` runs one flow through the same path and explains the verdict.
"""

from .compile import CompiledRule, Note, compile_policy
from .engine import Change, Endpoint, EndpointPolicy, PolicyEngine
from .errors import L7ConflictError, LabelError, PolicyError, Problem, SourceRef, ValidationError
from .flows import DNSRequest, GenericL7Request, HTTPRequest, KafkaRequest, L7Request
from .identity import (
    ANY_IDENTITY,
    FileAllocator,
    Identity,
    IdentityAllocator,
    IdentityFileError,
    IdentityKind,
    MemoryAllocator,
    RESERVED,
)
from .ipcache import IPCache
from .l7.evaluate import L7Verdict, evaluate
from .l7.registry import L7Registry, default_registry
from .labels import Label, LabelSet
from .mapstate import (
    ANY_L4,
    DirectionMapState,
    L4Key,
    L7Policy,
    MapState,
    PolicyEntry,
    RuleOrigin,
    Verdict,
)
from .model import Direction, Policy, PolicyKind, Protocol
from .parse import LoadResult, load_files, load_paths, parse_text
from .selectors import LabelSelector
from .trace import Peer, TraceRequest, TraceResult, trace

__all__ = [
    "ANY_IDENTITY", "ANY_L4", "Change", "CompiledRule", "DNSRequest", "Direction",
    "DirectionMapState", "Endpoint", "EndpointPolicy", "FileAllocator", "IdentityFileError", "GenericL7Request",
    "HTTPRequest", "IPCache", "Identity", "IdentityAllocator", "IdentityKind", "KafkaRequest",
    "L4Key", "L7ConflictError", "L7Policy", "L7Registry", "L7Request", "L7Verdict", "Label",
    "LabelError", "LabelSelector", "LabelSet", "LoadResult", "MapState", "MemoryAllocator", "Note",
    "Peer", "Policy", "PolicyEngine", "PolicyEntry", "PolicyError", "PolicyKind", "Problem",
    "Protocol", "RESERVED", "RuleOrigin", "SourceRef", "TraceRequest", "TraceResult",
    "ValidationError", "Verdict", "compile_policy", "default_registry", "evaluate", "load_files",
    "load_paths", "parse_text", "trace",
]
