"""SDS from the agent to real Envoys: mTLS between two sidecars, XFCC, attestation of the
Envoy process, and rotation under load with no failed request.

The Envoys here get static listeners and clusters (compiled by trustmesh.mesh) and
only their secrets over SDS, so this exercises the agent alone; the ADS path is
covered by test_mesh_e2e.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from envoy.config.bootstrap.v3 import bootstrap_pb2
from google.protobuf import json_format

from harness import AgentProcess, ServerProcess, free_port
from trustmesh.mesh.envoy.bootstrap import BootstrapParams, build_bootstrap
from trustmesh.mesh.envoy.compile import (
    InboundPort,
    SidecarPlan,
    Upstream,
    compile_clusters,
    compile_listeners,
)
from trustmesh.mesh.sidecar import envoy_binary

pytestmark = pytest.mark.slow

TD = "example.org"
ECHO_ID = f"spiffe://{TD}/ns/default/sa/echo"
CLIENT_ID = f"spiffe://{TD}/ns/default/sa/client"
UIDS = {"echo": 61011, "client": 61012, "stranger": 61013}


class Envoy:
    def __init__(self, base: Path, name: str, plan: SidecarPlan, agent_socket: Path,
                 uid: int, delta: bool = False) -> None:
        self.admin_port = free_port()
        boot = bootstrap_pb2.Bootstrap()
        boot.CopyFrom(build_bootstrap(BootstrapParams(
            node_id=plan.node_id, cluster=name, agent_socket=agent_socket,
            server_host="127.0.0.1", server_port=1, server_spiffe_id="spiffe://x/y",
            admin_port=self.admin_port)))
        boot.ClearField("dynamic_resources")
        del boot.static_resources.clusters[1:]  # only the SDS cluster; no ADS here
        boot.static_resources.listeners.extend(compile_listeners(plan))
        boot.static_resources.clusters.extend(compile_clusters(plan))
        self.config = base / f"{name}.json"
        text = json_format.MessageToJson(boot)
        if delta:  # incremental SDS (DeltaSecrets) instead of state of the world
            assert '"apiType": "GRPC"' in text
            text = text.replace('"apiType": "GRPC"', '"apiType": "DELTA_GRPC"')
        self.config.write_text(text)
        self.config.chmod(0o644)
        self.log = base / f"{name}.log"
        out = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        self._out = out
        self.proc = subprocess.Popen(
            ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", envoy_binary(),
             "-c", str(self.config), "--disable-hot-restart", "--log-level", "warning",
             "--concurrency", "1"], stdout=out, stderr=out)

    def admin(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}",
                                    timeout=2) as r:
            return str(r.read().decode())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._out.close()


def wait_for(fn: Callable[[], object], timeout: float = 30) -> object:
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


class Echo:
    def __init__(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "trustmesh.mesh.echo", "--port",
                                      str(self.port)])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture
def mesh(start_server: Callable[..., ServerProcess]) -> Iterator[dict[str, object]]:
    srv = start_server("--key-manager", "memory", "--signing-workers", "0")
    base = Path(tempfile.mkdtemp(prefix="tm-sds-"))
    os.chmod(base, 0o755)
    tok = srv.cli_json("token", "create", "--spiffe-id", f"spiffe://{TD}/node1")["token"]
    agent = AgentProcess(srv, base, tok)
    echo = Echo()
    envoys: list[Envoy] = []
    try:
        agent.start()
        yield {"srv": srv, "agent": agent, "echo": echo, "base": base, "envoys": envoys}
    finally:
        for e in envoys:
            e.stop()
        echo.stop()
        agent.stop()


def entry(srv: ServerProcess, spiffe_id: str, uid: int, ttl: str = "1h") -> None:
    srv.cli("entry", "create", "--spiffe-id", spiffe_id, "--parent-id", f"spiffe://{TD}/node1",
            "--selector", f"unix:uid:{uid}", "--x509-svid-ttl", ttl, check=True)


def start_pair(m: dict[str, object], delta: bool = False) -> tuple[Envoy, Envoy, int]:
    agent: AgentProcess = m["agent"]  # type: ignore[assignment]
    echo: Echo = m["echo"]  # type: ignore[assignment]
    base: Path = m["base"]  # type: ignore[assignment]
    envoys: list[Envoy] = m["envoys"]  # type: ignore[assignment]
    inbound, outbound = free_port(), free_port()
    server_plan = SidecarPlan(node_id="default/echo", spiffe_id="default", address="127.0.0.1",
                              inbound=(InboundPort(echo.port, inbound, "HTTP", "STRICT"),))
    client_plan = SidecarPlan(node_id="default/client", spiffe_id=CLIENT_ID,
                              address="127.0.0.1", upstreams=(Upstream(
                                  "echo.default:80", outbound, "HTTP", (("127.0.0.1", inbound),),
                                  (ECHO_ID,)),))
    server = Envoy(base, "echo", server_plan, agent.socket, UIDS["echo"], delta=delta)
    envoys.append(server)
    client = Envoy(base, "client", client_plan, agent.socket, UIDS["client"], delta=delta)
    envoys.append(client)
    return server, client, outbound


def get(port: int, path: str = "/") -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def test_two_envoys_open_mtls_with_svids_from_sds(mesh: dict[str, object]) -> None:
    srv: ServerProcess = mesh["srv"]  # type: ignore[assignment]
    entry(srv, ECHO_ID, UIDS["echo"])
    entry(srv, CLIENT_ID, UIDS["client"])
    server, client, outbound = start_pair(mesh)
    status, body = wait_for(lambda: (r := get(outbound, "/x")) and r[0] == 200 and r)  # type: ignore[misc]
    headers = json.loads(body)["headers"]
    xfcc = dict(p.split("=", 1) for p in headers["x-forwarded-client-cert"].split(";"))
    assert xfcc["By"] == ECHO_ID and xfcc["URI"] == CLIENT_ID
    # the secrets came from SDS: Envoy's own view of its certificates
    certs = json.loads(server.admin("/certs"))["certificates"]
    uris = {s["uri"] for c in certs for cc in c.get("cert_chain", [])
            for s in cc.get("subject_alt_names", []) if "uri" in s}
    assert ECHO_ID in uris
    assert "trustmesh_agent_sds_streams" in urllib.request.urlopen(  # noqa: S310
        f"http://127.0.0.1:{mesh['agent'].health}/metrics").read().decode()  # type: ignore[attr-defined]


def test_an_envoy_without_an_entry_gets_no_secret(mesh: dict[str, object]) -> None:
    srv: ServerProcess = mesh["srv"]  # type: ignore[assignment]
    agent: AgentProcess = mesh["agent"]  # type: ignore[assignment]
    echo: Echo = mesh["echo"]  # type: ignore[assignment]
    entry(srv, ECHO_ID, UIDS["echo"])
    port = free_port()
    plan = SidecarPlan(node_id="default/stranger", spiffe_id="default", address="127.0.0.1",
                       inbound=(InboundPort(echo.port, port, "HTTP", "STRICT"),))
    stranger = Envoy(mesh["base"], "stranger", plan, agent.socket,  # type: ignore[arg-type]
                     UIDS["stranger"])
    mesh["envoys"].append(stranger)  # type: ignore[attr-defined]
    # SDS refuses it (PERMISSION_DENIED, code 7) and keeps refusing on every retry
    denial = "StreamSecrets gRPC config stream to sds-grpc closed: 7, no identity issued"
    wait_for(lambda: denial in stranger.log.read_text(errors="replace"))
    state = json.loads(stranger.admin("/server_info"))["state"]
    assert state != "LIVE", "Envoy must not go live while its secret is refused"
    certs = json.loads(stranger.admin("/certs"))["certificates"]
    assert not [c for c in certs if c.get("cert_chain")], certs
    assert stranger.proc.poll() is None


def test_rotation_under_load_drops_no_request(mesh: dict[str, object]) -> None:
    srv: ServerProcess = mesh["srv"]  # type: ignore[assignment]
    entry(srv, ECHO_ID, UIDS["echo"], ttl="6s")
    entry(srv, CLIENT_ID, UIDS["client"], ttl="6s")
    server, _client, outbound = start_pair(mesh)
    wait_for(lambda: get(outbound)[0] == 200)

    def serial() -> str:
        certs = json.loads(server.admin("/certs"))["certificates"]
        return str(certs[0]["cert_chain"][0]["serial_number"])

    serials = {serial()}
    failures: list[str] = []
    count = [0, 0]
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
                count[0] += 1
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
                count[1] += 1
            except (OSError, http.client.HTTPException) as exc:
                failures.append(f"new connection: {exc!r}")

    threads = [threading.Thread(target=keepalive), threading.Thread(target=fresh)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            serials.add(serial())
            time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
    assert not failures, failures[:10]
    assert count[0] > 100 and count[1] > 100, count
    assert len(serials) >= 3, f"the SVID rotated {len(serials) - 1} times in 30 s"


def test_delta_sds_serves_and_rotates(mesh: dict[str, object]) -> None:
    """Envoys configured for incremental SDS (DeltaSecrets) get their secrets and rotations."""
    srv: ServerProcess = mesh["srv"]  # type: ignore[assignment]
    entry(srv, ECHO_ID, UIDS["echo"], ttl="4s")
    entry(srv, CLIENT_ID, UIDS["client"], ttl="4s")
    server, _client, outbound = start_pair(mesh, delta=True)
    assert '"DELTA_GRPC"' in server.config.read_text()
    wait_for(lambda: get(outbound)[0] == 200)

    def serial() -> str:
        certs = json.loads(server.admin("/certs"))["certificates"]
        return str(certs[0]["cert_chain"][0]["serial_number"])

    first = serial()
    wait_for(lambda: serial() != first, timeout=20)
    assert get(outbound)[0] == 200

