"""cilia.l7parsers: sans-I/O L7 protocol parsers and their interface.

``base`` is the interface (bytes in, decisions and bytes out); Kafka, Cassandra and Memcached are
built in and plugins register through ``registry``; ``policycheck`` makes a connection's
``Check`` from policy. No sockets, gRPC or Envoy here: ``cilia.envoy.l7service`` hosts the
parsers in Envoy's data path. See docs/architecture.md.
"""
