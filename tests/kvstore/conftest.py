"""tests/kvstore: the kvstore interface, its etcd backend and the cluster records, against real etcd."""

from tests.kvstore.etcd_support import etcd1, etcd3  # noqa: F401  (fixtures)
