"""End to end: server, `trustmesh agent run`, and the real py-spiffe client as the workload."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from spiffe import JwtSvid, WorkloadApiClient, X509Source
from spiffe._proto import workload_pb2, workload_pb2_grpc  # py-spiffe's own stubs

from harness import AgentProcess, ServerProcess, free_port, openssl, run


@pytest.fixture
def world(start_server: Callable[..., ServerProcess]) -> Iterator[tuple[ServerProcess,
                                                                       AgentProcess]]:
    srv = start_server("--key-manager", "memory", "--signing-workers", "0")
    base = Path(tempfile.mkdtemp(prefix="tm-agent-"))  # traversable by other users
    os.chmod(base, 0o755)
    tok = srv.cli_json("token", "create", "--spiffe-id", "spiffe://example.org/node1")["token"]
    agent = AgentProcess(srv, base, tok)
    try:
        yield srv, agent
    finally:
        agent.stop()
        shutil.rmtree(base, ignore_errors=True)


def entry(srv: ServerProcess, spiffe_id: str, *selectors: str, ttl: str = "1h") -> None:
    args = ["entry", "create", "--parent-id", "spiffe://example.org/node1", "--spiffe-id",
            spiffe_id, "--x509-svid-ttl", ttl]
    for s in selectors:
        args += ["--selector", s]
    srv.cli_json(*args)


def wait_for(fn: Callable[[], object], timeout: float = 20) -> object:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - retried until the deadline
            last = exc
            time.sleep(0.3)
    raise AssertionError(f"timed out: {last!r}")


def test_py_spiffe_gets_x509_and_jwt_svids(world: tuple[ServerProcess, AgentProcess],
                                           tmp_path: Path) -> None:
    srv, agent = world
    entry(srv, "spiffe://example.org/tests", f"unix:uid:{os.getuid()}")
    agent.start()
    client = WorkloadApiClient(socket_path=f"unix://{agent.socket}")
    ctx = wait_for(client.fetch_x509_context)
    svid = ctx.default_svid  # type: ignore[attr-defined]
    assert str(svid.spiffe_id) == "spiffe://example.org/tests"
    bundle = ctx.x509_bundle_set.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)  # type: ignore[attr-defined]
    assert bundle is not None
    (tmp_path / "roots.pem").write_bytes(b"".join(
        c.public_bytes(serialization.Encoding.PEM) for c in bundle.x509_authorities))
    (tmp_path / "leaf.pem").write_bytes(svid.leaf.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "inter.pem").write_bytes(b"".join(
        c.public_bytes(serialization.Encoding.PEM) for c in svid.cert_chain[1:]))
    res = openssl("verify", "-CAfile", str(tmp_path / "roots.pem"), "-untrusted",
                  str(tmp_path / "inter.pem"), str(tmp_path / "leaf.pem"))
    assert res.stdout.strip().endswith(": OK")

    jwt = client.fetch_jwt_svid(audience={"billing"})
    assert str(jwt.spiffe_id) == "spiffe://example.org/tests"
    validated = client.validate_jwt_svid(jwt.token, "billing")
    assert str(validated.spiffe_id) == "spiffe://example.org/tests"
    bundles = client.fetch_jwt_bundles()
    jwt_bundle = bundles.get_bundle_for_trust_domain(jwt.spiffe_id.trust_domain)
    assert JwtSvid.parse_and_validate(jwt.token, jwt_bundle, {"billing"}).spiffe_id == (
        jwt.spiffe_id)
    with pytest.raises(Exception, match="(?i)audience doesn.t match"):
        client.validate_jwt_svid(jwt.token, "someone-else")
    with pytest.raises(Exception):  # noqa: B017 - py-spiffe wraps the InvalidArgument
        client.validate_jwt_svid("not.a.jwt", "billing")
    client.close()

    # Without the security header: InvalidArgument (a raw call with py-spiffe's stubs).
    with grpc.insecure_channel(f"unix://{agent.socket}") as ch:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            next(iter(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), timeout=5)))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as info:
            stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(), timeout=5,
                              metadata=[("workload.spiffe.io", "true")])
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # no audience


def test_other_uid_is_denied_until_an_entry_names_it(
        world: tuple[ServerProcess, AgentProcess]) -> None:
    srv, agent = world
    entry(srv, "spiffe://example.org/tests", f"unix:uid:{os.getuid()}")
    agent.start()
    script = textwrap.dedent(f"""
        import json, sys
        from spiffe import WorkloadApiClient
        c = WorkloadApiClient(socket_path="unix://{agent.socket}")
        try:
            svid = c.fetch_x509_svid(timeout=5)
            print(json.dumps({{"ok": str(svid.spiffe_id)}}))
        except Exception as exc:
            print(json.dumps({{"error": repr(exc)}}))
    """)

    def as_nobody() -> dict[str, str]:
        out = run([sys.executable, "-c", script], user="nobody", timeout=60)
        return dict(json.loads(out.stdout.strip().splitlines()[-1]))

    denied = as_nobody()
    assert "error" in denied and "PERMISSION_DENIED" in denied["error"].upper().replace(
        " ", "_"), denied
    entry(srv, "spiffe://example.org/nobody", "unix:uid:65534")

    def granted() -> dict[str, str]:
        result = as_nobody()
        assert "ok" in result, result
        return result

    result = wait_for(granted, timeout=30)  # the agent syncs every second
    assert isinstance(result, dict) and result["ok"] == "spiffe://example.org/nobody"


def test_x509_source_sees_rotation(world: tuple[ServerProcess, AgentProcess]) -> None:
    srv, agent = world
    entry(srv, "spiffe://example.org/short", f"unix:uid:{os.getuid()}", ttl="8s")
    agent.start()
    source = X509Source(socket_path=f"unix://{agent.socket}", timeout_in_seconds=20)
    try:
        first = source.get_x509_context().default_svid.leaf.serial_number
        started = time.monotonic()
        deadline = started + 30
        def serial() -> int:
            return int(source.get_x509_context().default_svid.leaf.serial_number)

        while time.monotonic() < deadline and serial() == first:
            time.sleep(0.5)
        assert source.get_x509_context().default_svid.leaf.serial_number != first, (
            "no rotation observed")
        # renewed at half of its 8 s life, not at once (notBefore is backdated)
        assert time.monotonic() - started >= 2.5
        leaf: x509.Certificate = source.get_x509_context().default_svid.leaf
        assert leaf.not_valid_after_utc > leaf.not_valid_before_utc
    finally:
        source.close()


# spiffe-tls 0.4.0 itself still uses deprecated APIs of py-spiffe and pyOpenSSL.
@pytest.mark.filterwarnings("ignore:X509Source.* is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:Passing pyOpenSSL .* objects is deprecated")
def test_spiffe_tls_between_two_workloads(world: tuple[ServerProcess, AgentProcess]) -> None:
    """Two workloads (root and nobody) open mutual TLS to each other with their SVIDs."""
    import threading

    from spiffe import SpiffeId
    from spiffetls import ListenOptions, ServerTlsMode, listen
    from spiffetls.tlsconfig.authorize import authorize_id

    srv, agent = world
    entry(srv, "spiffe://example.org/server-side", f"unix:uid:{os.getuid()}")
    entry(srv, "spiffe://example.org/client-side", "unix:uid:65534")
    agent.start()
    source = X509Source(socket_path=f"unix://{agent.socket}", timeout_in_seconds=20)
    port = free_port()
    listener = listen(f"127.0.0.1:{port}", source, ListenOptions(
        tls_mode=ServerTlsMode.MTLS,
        authorize_fn=authorize_id(SpiffeId("spiffe://example.org/client-side"))))
    got: list[bytes] = []

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            got.append(conn.recv(64))
            conn.sendall(b"hello from the server side")
        finally:
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    client = textwrap.dedent(f"""
        import time
        from spiffe import SpiffeId, X509Source
        from spiffetls import ClientTlsMode, dial
        from spiffetls.tlsconfig.authorize import authorize_id
        src = X509Source(socket_path="unix://{agent.socket}", timeout_in_seconds=20)
        conn = dial("127.0.0.1:{port}", src, ClientTlsMode.TLS,  # presents its SVID
                    authorize_id(SpiffeId("spiffe://example.org/server-side")))
        conn.sendall(b"hello from the client side")
        print(conn.recv(64).decode())
        conn.close()
        src.close()
    """)
    out = run([sys.executable, "-W", "ignore::DeprecationWarning", "-c", client],
              user="nobody", timeout=60)
    t.join(timeout=10)
    listener.close()
    source.close()
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "hello from the server side"
    assert got == [b"hello from the client side"]
