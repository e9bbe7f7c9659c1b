"""Services: frontends load-balanced to backends (ClusterIP, NodePort, API-driven), as values.

``model`` holds the shared types; the agent validates and persists them, the BPF load balancer
(``cilia.bpf.lb``) realizes them, and the policy engine resolves ``toServices`` through them.
"""
