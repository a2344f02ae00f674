"""SDS from the agent to real Envoys: mTLS between two sidecars, XFCC, attestation of the
Envoy process, refusals, and rotation under load with no failed request.

The Envoys here have static listeners and clusters and take only their secrets over
SDS, so this exercises the agent alone (the ADS path is covered by test_mesh_e2e).
Each Envoy runs as a user of its own (``setpriv``): the agent tells them apart by
``unix:uid`` like any other workload. The bootstraps of docs/sds.md are run as written.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from envoy.config.bootstrap.v3 import bootstrap_pb2
from google.protobuf import json_format

from harness import AgentProcess, ServerProcess, free_port, stop_process
from trustmesh.mesh.envoy.bootstrap import BootstrapParams, build_bootstrap
from trustmesh.mesh.envoy.compile import (
    InboundPort,
    SidecarPlan,
    Upstream,
    compile_clusters,
    compile_static_listeners,
)
from trustmesh.mesh.sidecar import envoy_binary

pytestmark = pytest.mark.slow

TD = "example.org"
ECHO_ID = f"spiffe://{TD}/ns/default/sa/echo"
CLIENT_ID = f"spiffe://{TD}/ns/default/sa/client"
UIDS = {"echo": 61011, "client": 61012, "stranger": 61013}
DOCS = Path(__file__).resolve().parents[2] / "docs" / "sds.md"
DOC_SOCKET = "/tmp/trustmesh-agent/public/api.sock"  # noqa: S108 - the path the docs show


class Envoy:
    """A real Envoy run as ``uid`` with the bootstrap ``config`` (JSON or YAML)."""

    def __init__(self, base: Path, name: str, config: str, uid: int, admin_port: int,
                 suffix: str = ".json") -> None:
        self.name = name
        self.admin_port = admin_port
        self.config = base / f"{name}{suffix}"
        self.config.write_text(config)
        self.config.chmod(0o644)
        self.log = base / f"{name}.log"
        self._out = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", envoy_binary(),
             "-c", str(self.config), "--disable-hot-restart", "--log-level", "warning",
             "--concurrency", "1"], stdout=self._out, stderr=self._out)

    def admin(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}",  # noqa: S310
                                    timeout=2) as r:
            return str(r.read().decode())

    def logs(self) -> str:
        return self.log.read_text(errors="replace")

    def cert_serial(self) -> str:
        """The serial of the certificate this Envoy presents now (admin /certs)."""
        certs = json.loads(self.admin("/certs"))["certificates"]
        return str(certs[0]["cert_chain"][0]["serial_number"])

    def stop(self) -> None:
        stop_process(self.proc, timeout=10)
        self._out.close()


class Echo:
    def __init__(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "trustmesh.mesh.echo", "--port",
                                      str(self.port)])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@dataclass
class Mesh:
    srv: ServerProcess
    agent: AgentProcess
    echo: Echo
    base: Path
    envoys: list[Envoy] = field(default_factory=list)

    def entry(self, spiffe_id: str, uid: int, ttl: str = "1h") -> None:
        self.srv.cli("entry", "create", "--spiffe-id", spiffe_id, "--parent-id",
                     f"spiffe://{TD}/node1", "--selector", f"unix:uid:{uid}",
                     "--x509-svid-ttl", ttl, check=True)

    def envoy(self, name: str, config: str, uid: int, admin_port: int,
              suffix: str = ".json") -> Envoy:
        envoy = Envoy(self.base, name, config, uid, admin_port, suffix)
        self.envoys.append(envoy)
        return envoy

    def compiled(self, name: str, plan: SidecarPlan, uid: int, delta: bool = False) -> Envoy:
        """An Envoy with trustmesh's own bootstrap and compiled listeners (routes inline),
        made static."""
        admin_port = free_port()
        boot = bootstrap_pb2.Bootstrap()
        boot.CopyFrom(build_bootstrap(BootstrapParams(
            node_id=plan.node_id, cluster=name, agent_socket=self.agent.socket,
            server_host="127.0.0.1", server_port=1, server_spiffe_id="spiffe://x/y",
            admin_port=admin_port)))
        boot.ClearField("dynamic_resources")
        del boot.static_resources.clusters[1:]  # only the SDS cluster; no ADS here
        boot.static_resources.listeners.extend(compile_static_listeners(plan))
        boot.static_resources.clusters.extend(compile_clusters(plan))
        text = json_format.MessageToJson(boot)
        if delta:  # incremental SDS (DeltaSecrets) instead of state of the world
            assert '"apiType": "GRPC"' in text
            text = text.replace('"apiType": "GRPC"', '"apiType": "DELTA_GRPC"')
        return self.envoy(name, text, uid, admin_port)


@pytest.fixture
def mesh(start_server: Callable[..., ServerProcess]) -> Iterator[Mesh]:
    srv = start_server("--key-manager", "memory", "--signing-workers", "0")
    base = Path(tempfile.mkdtemp(prefix="tm-sds-"))
    os.chmod(base, 0o755)  # noqa: S103 - the Envoys run as other users and read from here
    tok = srv.cli_json("token", "create", "--spiffe-id", f"spiffe://{TD}/node1")["token"]
    agent = AgentProcess(srv, base, tok)
    echo = Echo()
    m = Mesh(srv, agent, echo, base)
    try:
        agent.start()
        yield m
    finally:
        for e in m.envoys:
            e.stop()
        echo.stop()
        agent.stop()


def wait_for(fn: Callable[[], Any], timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = fn()
            if last:
                return last
        except Exception as exc:  # noqa: BLE001 - keep polling until the deadline
            last = exc
        time.sleep(0.1)
    raise AssertionError(f"timed out; last: {last!r}")


def get(port: int, path: str = "/") -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def get_ok(port: int, path: str = "/") -> str | None:
    status, body = get(port, path)
    return body if status == 200 else None


def xfcc(body: str) -> dict[str, str]:
    header = json.loads(body)["headers"]["x-forwarded-client-cert"]
    return dict(part.split("=", 1) for part in header.split(";"))


def tls_without_client_cert(port: int) -> str:
    """What a TLS client without a certificate gets from the port: the error, or the
    answer if it was served."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                ctx.wrap_socket(raw) as tls:  # TLS 1.3: the refusal comes after the Finished
            tls.sendall(b"GET / HTTP/1.1\r\nhost: echo\r\n\r\n")
            answer = tls.recv(1024)
    except (ssl.SSLError, OSError) as exc:  # not listening yet, reset, or a TLS alert
        return f"refused: {exc}"
    return f"answered: {answer!r}"


def refused_secret(envoy: Envoy, name: str, port: int) -> None:
    """The Envoy runs but never gets secret ``name``: it stays warming, no certificate is
    loaded, and the listener on ``port`` serves nobody (Envoy reports LIVE once its
    initial fetch times out, 15 s by default, but the listener still has no certificate)."""
    assert envoy.proc.poll() is None, envoy.logs()[-2000:]

    def names(resource: str) -> set[str]:
        dump = json.loads(envoy.admin(f"/config_dump?resource={resource}"))
        return {c["name"] for c in dump.get("configs", [])}

    assert name in names("dynamic_warming_secrets")
    assert name not in names("dynamic_active_secrets")
    certs = json.loads(envoy.admin("/certs"))["certificates"]
    assert not [c for c in certs if c.get("cert_chain")], certs
    assert tls_without_client_cert(port).startswith("refused:")


# -- the bootstraps of docs/sds.md, as written ----------------------------------------------
def doc_bootstrap(name: str, agent_socket: Path, ports: dict[int, int]) -> str:
    """The YAML block of docs/sds.md that starts with ``# <name>``, with this test's socket
    and ports in place of the documented ones."""
    blocks = dict(re.findall(r"```yaml\n# (\S+)\n(.*?)```", DOCS.read_text(), re.S))
    text = blocks[name].replace(DOC_SOCKET, str(agent_socket))

    def port(m: re.Match[str]) -> str:
        return f"port_value: {ports[int(m.group(1))]}"

    return re.sub(r"port_value: (\d+)", port, text)


def test_the_bootstraps_in_the_docs_give_mtls_with_xfcc(mesh: Mesh) -> None:
    mesh.entry(ECHO_ID, UIDS["echo"])
    mesh.entry(CLIENT_ID, UIDS["client"])
    ports = {15000: free_port(), 15001: free_port(), 15443: free_port(), 15080: free_port(),
             18080: mesh.echo.port}
    inbound = mesh.envoy("inbound", doc_bootstrap("inbound.yaml", mesh.agent.socket, ports),
                         UIDS["echo"], ports[15000], ".yaml")
    outbound = mesh.envoy("outbound", doc_bootstrap("outbound.yaml", mesh.agent.socket, ports),
                          UIDS["client"], ports[15001], ".yaml")
    body = wait_for(lambda: get_ok(ports[15080], "/hello"))
    fields = xfcc(body)
    assert fields["By"] == ECHO_ID and fields["URI"] == CLIENT_ID
    assert re.fullmatch(r"[0-9a-f]{64}", fields["Hash"]), fields
    # each Envoy presents the identity of its own entry, taken by name and as "default"
    for envoy, spiffe_id in ((inbound, ECHO_ID), (outbound, CLIENT_ID)):
        certs = json.loads(envoy.admin("/certs"))["certificates"]
        uris = {s["uri"] for c in certs for cc in c.get("cert_chain", [])
                for s in cc.get("subject_alt_names", []) if "uri" in s}
        assert uris == {spiffe_id}, (envoy.name, uris)
    # no client certificate: the inbound Envoy ends the handshake
    refused = tls_without_client_cert(ports[15443])
    assert refused.startswith("refused:"), refused
    no_cert = re.search(r"^listener\.127\.0\.0\.1_\d+\.ssl\.fail_verify_no_cert: (\d+)$",
                        inbound.admin("/stats?filter=fail_verify_no_cert"), re.M)
    assert no_cert and int(no_cert.group(1)) >= 1, inbound.admin("/stats?filter=ssl")
    metrics = urllib.request.urlopen(  # noqa: S310
        f"http://127.0.0.1:{mesh.agent.health}/metrics").read().decode()
    streams = re.search(r"^trustmesh_agent_sds_streams (\S+)$", metrics, re.M)
    assert streams and float(streams.group(1)) >= 4, metrics  # cert + bundle per Envoy


def test_an_envoy_asking_for_an_identity_it_lacks_is_refused(mesh: Mesh) -> None:
    """inbound.yaml run by the client's user: it may be the client, not echo."""
    mesh.entry(CLIENT_ID, UIDS["client"])
    ports = {15000: free_port(), 15443: free_port(), 18080: mesh.echo.port}
    impostor = mesh.envoy("impostor", doc_bootstrap("inbound.yaml", mesh.agent.socket, ports),
                          UIDS["client"], ports[15000], ".yaml")
    denial = f"closed: 7, this caller is not entitled to the identity {ECHO_ID}"
    wait_for(lambda: denial in impostor.logs())
    refused_secret(impostor, ECHO_ID, ports[15443])


def test_an_envoy_without_an_entry_gets_no_secret(mesh: Mesh) -> None:
    mesh.entry(ECHO_ID, UIDS["echo"])
    port = free_port()
    plan = SidecarPlan(node_id="default/stranger", spiffe_id="default", address="127.0.0.1",
                       inbound=(InboundPort(mesh.echo.port, port, "HTTP", "STRICT"),))
    stranger = mesh.compiled("stranger", plan, UIDS["stranger"])
    # SDS refuses it (PERMISSION_DENIED, code 7) and keeps refusing on every retry
    denial = "StreamSecrets gRPC config stream to sds-grpc closed: 7, no identity issued"
    wait_for(lambda: denial in stranger.logs())
    refused_secret(stranger, "default", port)


# -- compiled sidecars: rotation ------------------------------------------------------------
def start_pair(mesh: Mesh, delta: bool = False) -> tuple[Envoy, Envoy, int]:
    inbound, outbound = free_port(), free_port()
    server_plan = SidecarPlan(node_id="default/echo", spiffe_id="default", address="127.0.0.1",
                              inbound=(InboundPort(mesh.echo.port, inbound, "HTTP", "STRICT"),))
    client_plan = SidecarPlan(node_id="default/client", spiffe_id=CLIENT_ID,
                              address="127.0.0.1", upstreams=(Upstream(
                                  "echo.default:80", outbound, "HTTP", (("127.0.0.1", inbound),),
                                  (ECHO_ID,)),))
    server = mesh.compiled("echo", server_plan, UIDS["echo"], delta=delta)
    client = mesh.compiled("client", client_plan, UIDS["client"], delta=delta)
    return server, client, outbound


def test_rotation_under_load_drops_no_request(mesh: Mesh) -> None:
    """SVIDs of 6 s rotate every ~3 s on both sides while requests flow for 30 s, on one
    kept-alive connection and on a new connection per request: none may fail."""
    mesh.entry(ECHO_ID, UIDS["echo"], ttl="6s")
    mesh.entry(CLIENT_ID, UIDS["client"], ttl="6s")
    server, client, outbound = start_pair(mesh)
    wait_for(lambda: get_ok(outbound))

    serials = {"server": {server.cert_serial()}, "client": {client.cert_serial()}}
    failures: list[str] = []
    count = {"keep-alive": 0, "new": 0}
    stop = threading.Event()

    def keepalive() -> None:  # one connection reused for every request
        conn = http.client.HTTPConnection("127.0.0.1", outbound, timeout=5)
        while not stop.is_set():
            try:
                conn.request("GET", "/ka")
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    failures.append(f"keep-alive: HTTP {resp.status}")
                count["keep-alive"] += 1
            except (OSError, http.client.HTTPException) as exc:
                failures.append(f"keep-alive: {exc!r}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", outbound, timeout=5)
        conn.close()

    def fresh() -> None:  # a new connection per request
        while not stop.is_set():
            try:
                status, _ = get(outbound, "/new")
                if status != 200:
                    failures.append(f"new connection: HTTP {status}")
                count["new"] += 1
            except (OSError, http.client.HTTPException) as exc:
                failures.append(f"new connection: {exc!r}")

    threads = [threading.Thread(target=keepalive), threading.Thread(target=fresh)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            serials["server"].add(server.cert_serial())
            serials["client"].add(client.cert_serial())
            time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
    assert not failures, failures[:10]
    assert count["keep-alive"] > 100 and count["new"] > 100, count
    for side, seen in serials.items():
        assert len(seen) >= 3, f"the {side} SVID rotated {len(seen) - 1} times in 30 s"


def test_delta_sds_serves_and_rotates(mesh: Mesh) -> None:
    """Envoys configured for incremental SDS (DeltaSecrets) get their secrets and rotations."""
    mesh.entry(ECHO_ID, UIDS["echo"], ttl="4s")
    mesh.entry(CLIENT_ID, UIDS["client"], ttl="4s")
    server, _client, outbound = start_pair(mesh, delta=True)
    assert '"DELTA_GRPC"' in server.config.read_text()
    wait_for(lambda: get_ok(outbound))
    first = server.cert_serial()
    wait_for(lambda: server.cert_serial() != first, timeout=20)
    assert get_ok(outbound)
