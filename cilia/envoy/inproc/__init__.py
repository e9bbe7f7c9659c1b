"""cilia's L7 parsers inside Envoy's process: a dynamic-module network filter embedding CPython.

``cilia_l7.c`` is the filter (built by ``build``), ``host`` the Python it calls per connection
and chunk, ``channel`` the agent's end of the link that brings policy in and records out.
"""
