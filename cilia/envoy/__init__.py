"""cilia.envoy: policy as Envoy configuration, and the services Envoy calls back.

``translate`` (with ``rbac`` and ``resources``) turns resolved map states into listeners and
clusters; ``bootstrap`` and ``supervisor`` run the agent's own Envoy and ``admin`` reads it.
``accesslog`` receives Envoy's access logs; ``l7service`` hosts the L7 parsers in Envoy's data
path over network ext_proc, with ``l7views`` (the policy they read) and ``l7workers`` (several
processes). ``metadata`` names what the listeners write and the services read back;
``loopback`` runs translated policy on a local Envoy (tests, benchmarks). See
docs/architecture.md.
"""
