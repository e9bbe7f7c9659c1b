"""Who may speak for a node: rogue xDS clients against the real server (grpcio clients and real
Envoys). mTLS on TCP with the node id from the client certificate's CN, no plaintext TCP unless
chosen, streams bound to one node, unknown nodes served nothing, ACKs kept per stream, UNIX
sockets owner-only whatever the umask."""

from __future__ import annotations

import grp
import os
import queue
import stat
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from envoy.service.discovery.v3 import ads_pb2_grpc
from envoy.config.core.v3.base_pb2 import Node
from envoy.service.discovery.v3.discovery_pb2 import DeltaDiscoveryRequest, DiscoveryRequest, DiscoveryResponse
from google.rpc import status_pb2
from pki import Pki
from xds_support import free_port, http_get, http_listener, running_envoy, wait_for

from cilia.envoy.bootstrap import XdsClientTls
from cilia.xds import LISTENER, AckTracker, Cache, DeltaStream, IdentityError, ServerTls, SotwStream, XdsServer


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


class Client:
    """One ADS stream; ``send`` a request, ``recv`` the next response (raises grpc.RpcError)."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._q: queue.Queue[DiscoveryRequest | None] = queue.Queue()
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        self._responses = stub.StreamAggregatedResources(iter(self._q.get, None), timeout=20)

    def send(self, node: str = "", nonce: str = "", error: str | None = None) -> None:
        req = DiscoveryRequest(type_url=LISTENER, response_nonce=nonce)
        req.node.id = node
        if error is not None:
            req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        self._q.put(req)

    def recv(self) -> DiscoveryResponse:
        response: DiscoveryResponse = next(self._responses)
        return response

    def close(self) -> None:
        self._q.put(None)


def tls_channel(pki: Pki, port: int, client: tuple[Path, Path] | None) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(pki.ca.read_bytes(), client[1].read_bytes() if client else None,
                                         client[0].read_bytes() if client else None)
    return grpc.secure_channel(f"localhost:{port}", creds)


@pytest.fixture
def mtls(pki: Pki) -> Iterator[tuple[Cache, AckTracker, int]]:
    cache, tracker = Cache(), AckTracker()
    cache.upsert(LISTENER, "secret-listener", http_listener("secret-listener", free_port(), "x"))
    cert, key = pki.issue("xds-server", "xds-server")
    server = XdsServer(cache, tracker, known_nodes=lambda n: n in ("node-x", "node-y"))
    port = server.add_address("127.0.0.1:0", tls=ServerTls(cert, key, pki.ca))
    server.start()
    try:
        yield cache, tracker, port
    finally:
        server.stop(0)


def test_plaintext_tcp_is_refused_unless_chosen(tmp_path: Path) -> None:
    server = XdsServer(Cache())
    with pytest.raises(ValueError, match="needs mutual TLS"):
        server.add_address("127.0.0.1:0")
    assert server.add_address("127.0.0.1:0", insecure=True) > 0
    server.add_address(f"unix:{tmp_path}/xds.sock")  # a UNIX socket is protected by its mode
    server.stop(0)


def test_bad_tls_files_are_named(tmp_path: Path, pki: Pki) -> None:
    (tmp_path / "junk.pem").write_text("hello")
    with pytest.raises(ValueError, match=r"key .*junk.pem: not a PEM file"):
        ServerTls(pki.ca, tmp_path / "junk.pem", pki.ca).credentials()
    with pytest.raises(ValueError, match=r"CA .*missing.pem"):
        ServerTls(pki.ca, pki.ca_key, tmp_path / "missing.pem").credentials()


def test_tcp_client_without_a_certificate_gets_nothing(mtls: tuple[Cache, AckTracker, int], pki: Pki) -> None:
    _, tracker, port = mtls
    with tls_channel(pki, port, None) as channel:
        client = Client(channel)
        client.send("node-x")
        with pytest.raises(grpc.RpcError) as err:
            client.recv()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # the TLS handshake fails
    assert tracker.states() == {}


def test_certificate_for_one_node_claiming_another_is_refused(mtls: tuple[Cache, AckTracker, int],
                                                              pki: Pki) -> None:
    _, tracker, port = mtls
    with tls_channel(pki, port, pki.issue("node-x", "node-x")) as channel:
        client = Client(channel)
        client.send("node-y")
        with pytest.raises(grpc.RpcError) as err:
            client.recv()
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "not the client certificate's 'node-x'" in str(err.value.details())
    assert tracker.states() == {}


def test_certificate_without_a_cn_is_refused(mtls: tuple[Cache, AckTracker, int], pki: Pki) -> None:
    _, _, port = mtls
    with tls_channel(pki, port, pki.issue("anonymous", "")) as channel:
        client = Client(channel)
        client.send("node-x")
        with pytest.raises(grpc.RpcError) as err:
            client.recv()
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_forged_nack_from_another_certificate_leaves_the_real_node_alone(mtls: tuple[Cache, AckTracker, int],
                                                                         pki: Pki) -> None:
    cache, tracker, port = mtls
    version = cache.version(LISTENER)
    with tls_channel(pki, port, pki.issue("node-x", "node-x")) as real_ch, \
            tls_channel(pki, port, pki.issue("node-y", "node-y")) as rogue_ch:
        real = Client(real_ch)
        real.send("node-x")
        first = real.recv()
        assert len(first.resources) == 1
        real.send(nonce=first.nonce)  # the node id may be left out after the first request
        tracker.wait("node-x", LISTENER, version, timeout=10)
        rogue = Client(rogue_ch)
        rogue.send("node-y")
        rogue_first = rogue.recv()  # node-y is a node of its own
        rogue.send("node-x", nonce=rogue_first.nonce, error="forged rejection")
        with pytest.raises(grpc.RpcError) as err:
            rogue.recv()
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        tracker.wait("node-x", LISTENER, version, timeout=0)
        assert tracker.state("node-x", LISTENER).nacked == ""
        real.close()


def test_unknown_node_is_served_nothing_and_not_tracked(tmp_path: Path) -> None:
    cache, tracker = Cache(), AckTracker()
    cache.upsert(LISTENER, "a", http_listener("a", free_port(), "x"))
    server = XdsServer(cache, tracker, known_nodes=lambda n: n == "known")
    address = f"unix:{tmp_path}/xds.sock"
    server.add_address(address)
    server.start()
    try:
        with grpc.insecure_channel(address) as channel:
            rogue = Client(channel)
            rogue.send("stranger")
            assert list(rogue.recv().resources) == []
            known = Client(channel)
            known.send("known")
            assert len(known.recv().resources) == 1
            wait_for("the known node's send recorded", lambda: tracker.states())
            assert set(tracker.states()) == {("known", LISTENER)}  # a stranger cannot hold up a wait
            rogue.close()
            known.close()
    finally:
        server.stop(0)


def test_a_stream_cannot_switch_nodes(tmp_path: Path) -> None:
    cache, tracker = Cache(), AckTracker()
    cache.upsert(LISTENER, "a", http_listener("a", free_port(), "x"))
    server = XdsServer(cache, tracker)
    address = f"unix:{tmp_path}/xds.sock"
    server.add_address(address)
    server.start()
    try:
        with grpc.insecure_channel(address) as channel:
            client = Client(channel)
            client.send("n1")
            r = client.recv()
            client.send("n2", nonce=r.nonce, error="forged")
            with pytest.raises(grpc.RpcError) as err:
                client.recv()
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert tracker.state("n2", LISTENER).nacked == "" and tracker.state("n1", LISTENER).nacked == ""
    finally:
        server.stop(0)


def test_forged_ack_from_a_second_stream_does_not_realize_a_version(tmp_path: Path) -> None:
    cache, tracker = Cache(), AckTracker()
    version = cache.upsert(LISTENER, "a", http_listener("a", free_port(), "x"))
    server = XdsServer(cache, tracker)
    address = f"unix:{tmp_path}/xds.sock"
    server.add_address(address)
    server.start()
    try:
        with grpc.insecure_channel(address) as channel:
            real, second = Client(channel), Client(channel)
            real.send("n1")
            r_real = real.recv()  # the real proxy has not answered yet
            second.send("n1")
            second.send(nonce=second.recv().nonce)  # acks at once
            wait_for("two streams of n1", lambda: tracker.streams("n1") == 2)
            with pytest.raises(TimeoutError):
                tracker.wait("n1", LISTENER, version, timeout=0.2)
            real.send(nonce=r_real.nonce)
            tracker.wait("n1", LISTENER, version, timeout=10)
            second.close()
            wait_for("the second stream closed", lambda: tracker.streams("n1") == 1)
            real.close()
    finally:
        server.stop(0)


def test_unix_sockets_are_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        server = XdsServer(Cache())
        server.add_address(f"unix:{tmp_path}/a.sock")
        group = grp.getgrnam("nogroup").gr_gid
        server.add_address(f"unix:{tmp_path}/b.sock", group=group)
        server.start()
    finally:
        os.umask(old)
    try:
        a, b = (tmp_path / "a.sock").stat(), (tmp_path / "b.sock").stat()
        assert stat.S_ISSOCK(a.st_mode) and stat.S_IMODE(a.st_mode) == 0o600
        assert (stat.S_IMODE(b.st_mode), b.st_gid) == (0o660, group)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a.sock", "b.sock"]  # no staging left
    finally:
        server.stop(0)
    assert list(tmp_path.iterdir()) == []


def test_real_envoy_gets_its_config_over_mtls(mtls: tuple[Cache, AckTracker, int], pki: Pki, tmp_path: Path) -> None:
    cache, tracker, port = mtls
    listen = free_port()
    version = cache.upsert(LISTENER, "secret-listener", http_listener("secret-listener", listen, "over mtls"))
    cert, key = pki.issue("envoy-x", "node-x")
    with running_envoy(tmp_path, "node-x", f"127.0.0.1:{port}", xds_tls=XdsClientTls(cert, key, pki.ca)):
        tracker.wait("node-x", LISTENER, version, timeout=20)
        assert wait_for("the listener", lambda: http_get(listen)) == (200, "over mtls")


def test_real_envoy_whose_certificate_names_another_node_gets_nothing(
        mtls: tuple[Cache, AckTracker, int], pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache, tracker, port = mtls
    cert, key = pki.issue("envoy-y", "node-y")
    with running_envoy(tmp_path, "node-x", f"127.0.0.1:{port}", xds_tls=XdsClientTls(cert, key, pki.ca)) as env:
        wait_for("Envoy to be refused", lambda: [r for r in caplog.records
                                                 if "not the client certificate's 'node-y'" in r.getMessage()])
        assert env.dynamic("listeners") == {}
    assert tracker.states() == {}


@pytest.mark.parametrize("kind", [SotwStream, DeltaStream])
def test_stream_objects_hold_their_node(kind: type[SotwStream] | type[DeltaStream]) -> None:
    cache, tracker = Cache(epoch="e"), AckTracker()
    cache.upsert(LISTENER, "a", http_listener("a", 1, "x"))
    request = DiscoveryRequest if kind is SotwStream else DeltaDiscoveryRequest
    proven = kind(cache, tracker, None, identity="n1")
    with pytest.raises(IdentityError, match="not the client certificate's 'n1'"):
        proven.handle(request(type_url=LISTENER, node=Node(id="n2")))  # type: ignore[arg-type]
    [r] = proven.handle(request(type_url=LISTENER))  # type: ignore[arg-type]
    assert len(r.resources) == 1 and tracker.streams("n1") == 1  # no node named: the certificate's
    claimed = kind(cache, tracker, None, known_nodes=lambda n: n == "n1")
    [r] = claimed.handle(request(type_url=LISTENER, node=Node(id="n3")))  # type: ignore[arg-type]
    assert len(r.resources) == 0 and tracker.streams("n3") == 0  # unknown: nothing, not tracked
    with pytest.raises(IdentityError, match="on a stream of node 'n3'"):
        claimed.handle(request(type_url=LISTENER, node=Node(id="n1")))  # type: ignore[arg-type]
