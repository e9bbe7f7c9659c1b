"""cilia: identity-aware L3-L7 network policy, the way Cilium does it.

Subpackages: ``policy`` (the single source of policy truth), ``xds`` (generic xDS
server), ``envoy`` (policy -> Envoy resources), ``l7parsers`` (sans-I/O protocol
parsers), ``bpf`` (kernel datapath), ``agent`` and ``cli``.
"""

__version__ = "0.1.0"
