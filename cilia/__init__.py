"""cilia: identity-aware L3-L7 network policy, the way Cilium does it.

Subpackages: ``policy`` (the single source of policy truth), ``xds`` (generic xDS
server), ``envoy`` (policy -> Envoy resources, and the services Envoy calls back),
``l7parsers`` (sans-I/O protocol parsers), ``bpf`` (kernel datapath), ``agent``, ``cli``,
``cni`` (the CNI plugin) and ``k8s`` (the Kubernetes watcher); ``specs`` holds the endpoint and
port specs they share.
"""

__version__ = "0.1.0"
