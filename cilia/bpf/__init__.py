"""cilia.bpf: the kernel datapath (bcc, tc).

A tc program per endpoint veth (``datapath.c``, compiled and attached by ``loader``) enforces
L3/L4 policy from pinned maps (``maps``, ``policykey``) and redirects L7 ports to Envoy
(``proxyroute``). ``node`` drives it for the agent, ``datapath`` decodes its events, ``netns``
plumbs endpoints (namespace and veth pair) and ``paths`` says where the maps are pinned.
See docs/architecture.md.
"""
