"""``cilia connectivity test``: endpoints, servers, policies and probes that check a running
agent's L3/L4/L7 allow and deny paths end to end, like ``cilium connectivity test``."""
