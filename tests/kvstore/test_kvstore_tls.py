"""etcd with TLS and client certificates: the agent connects with --kvstore-ca/-cert/-key, and
wrong certificates are a clear error at start, not a later failure."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent_support import run_cli
from cilia.kvstore import KVStoreError
from cilia.kvstore.etcd import ClientTls, EtcdKVStore
from etcd_support import EtcdCluster
from pki import Pki


def test_tls_with_client_certificates(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    server = pki.issue("etcd", "etcd")
    client = pki.issue("agent", "node-a")
    other = Pki(tmp_path / "other", "other-ca")
    stranger = other.issue("stranger", "node-x")
    cluster = EtcdCluster(tmp_path, members=2, tls=(pki.ca, *server))
    try:
        store = EtcdKVStore(cluster.endpoints, ClientTls(pki.ca, *client), timeout=3)
        try:
            store.put("cilia/tls", b"ok")
            assert store.get("cilia/tls").value == b"ok"  # type: ignore[union-attr]
        finally:
            store.close()
        # a client certificate from another CA: refused by the members
        with pytest.raises(KVStoreError):
            bad = EtcdKVStore(cluster.endpoints, ClientTls(pki.ca, *stranger), timeout=2)
            try:
                bad.revision()
            finally:
                bad.close()
        # the agent says why it cannot start
        state = tmp_path / "state"
        base = ("agent", "--envoy", "none", "--kvstore", "etcd", "--kvstore-endpoints", ",".join(cluster.endpoints))
        res = run_cli(state, *base, "--kvstore-ca", str(other.ca), "--kvstore-cert", str(client[0]),
                      "--kvstore-key", str(client[1]))
        assert res.code == 1 and "error: --kvstore etcd:" in res.err and "unreachable" in res.err
        res = run_cli(state, *base)
        assert res.code == 1 and "no CA was given (--kvstore-ca)" in res.err
        res = run_cli(state, *base, "--kvstore-ca", str(tmp_path / "missing.pem"))
        assert res.code == 1 and "missing.pem" in res.err
        res = run_cli(state, *base, "--kvstore-cert", str(client[0]), "--kvstore-ca", str(pki.ca))
        assert res.code == 2 and "--kvstore-key" in res.err
    finally:
        cluster.close()
