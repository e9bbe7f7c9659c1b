"""toFQDNs: what the DNS proxy learned (names -> addresses with TTLs), kept and persisted.

``cache.FqdnCache`` is pure (time and conntrack's open flows are given); ``store.CacheStore``
keeps it in the agent's state directory. The policy engine turns the names into selections
(``PolicyEngine.update_fqdn``); the agent ties them together (``Agent.learn_fqdn``).
"""
