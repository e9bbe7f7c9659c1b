"""The cilia agent: state, REST API, xDS and Envoy wired together (``cilia agent``).

Import what you need from its modules (``cilia.agent.daemon``, ``cilia.agent.client``, ...):
this package imports none of them, so a client does not load the daemon.
"""
