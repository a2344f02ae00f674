"""``trustmesh demo``: the Istio + SPIRE scenario on loopback, with real processes.

:class:`MeshLab` starts a server, an agent, an echo application and two Envoy
sidecars (``echo`` and ``client``), each sidecar attested by the agent like any
workload. The demo walks through strict mTLS, XFCC, default deny, an ALLOW
for one principal, a method/path rule and ``policy explain``. The integration
tests drive the same lab and assert on every step.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trustmesh.errors import TrustmeshError, Unavailable
from trustmesh.mesh.sidecar import envoy_binary

__all__ = ["DEMO_STEPS", "CallResult", "MeshLab", "free_loopback_port", "run_demo"]

_TRUSTMESH = [sys.executable, "-m", "trustmesh.cli.main"]
_SIDECAR_UIDS = {"echo": 61001, "client": 61002}  # distinct users when run as root


_HANDED_OUT: set[int] = set()


def free_loopback_port() -> int:
    """A loopback port for a listener (the lab's, a test's, a benchmark's), free now.

    Taken below the kernel's ephemeral range, so that outgoing connections (Envoy to
    the agent and the server, clients) cannot take it before its listener binds it,
    and never the same one twice in a process.
    """
    rng = random.SystemRandom()
    top = min(_ephemeral_start(), 32768)
    for _ in range(200):
        port = rng.randrange(20000, top)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket() as s:  # a crowded range: let the kernel choose
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ephemeral_start() -> int:
    """The first port of the kernel's range for outgoing connections (32768 by default)."""
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        return max(21000, int(text.split()[0]))
    except (OSError, ValueError, IndexError):
        return 32768


@dataclass(frozen=True)
class CallResult:
    status: int  # 0: no HTTP answer (connection refused, handshake failed)
    body: str
    error: str = ""

    def json(self) -> Any:
        return json.loads(self.body)


class MeshLab:
    """Server, agent, echo app and two sidecars under one directory, all on loopback."""

    def __init__(self, base: Path | None = None, trust_domain: str = "example.org",
                 log: Callable[[str], None] = lambda _: None, svid_ttl: str = "1h",
                 sidecar_concurrency: int | None = None) -> None:
        self.base = base or Path(tempfile.mkdtemp(prefix="trustmesh-demo-"))
        self.base.mkdir(parents=True, exist_ok=True)
        self.base.chmod(0o755)
        self.trust_domain = trust_domain
        self.svid_ttl = svid_ttl
        self.sidecar_concurrency = sidecar_concurrency  # None: `sidecar run`'s default
        self.say = log
        self.as_root = os.geteuid() == 0
        self.ports = {name: free_loopback_port() for name in (
            "http", "agent_api", "attest", "agent_health", "echo_app", "echo_sidecar",
            "client_outbound", "echo_admin", "client_admin")}
        self.data_dir = self.base / "server"
        self.agent_socket = self.base / "agent" / "public" / "api.sock"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[Any] = []

    # -- processes -----------------------------------------------------------------
    def _spawn(self, name: str, cmd: Sequence[str], *, uid: int | None = None) -> None:
        log = open(self.base / f"{name}.log", "ab")  # noqa: SIM115 - closed in stop()
        self._logs.append(log)
        full = list(cmd)
        if uid is not None:
            full = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *full]
        self.procs[name] = subprocess.Popen(full, stdout=log, stderr=log,
                                            start_new_session=True)

    def log_tail(self, name: str, size: int = 4000) -> str:
        try:
            return (self.base / f"{name}.log").read_text(errors="replace")[-size:]
        except OSError:
            return ""

    def _wait(self, what: str, ready: Callable[[], bool], timeout: float = 60,
              proc: str | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None and self.procs[proc].poll() is not None:
                raise Unavailable(f"{what}: process exited\n{self.log_tail(proc)}")
            with contextlib.suppress(Exception):
                if ready():
                    return
            time.sleep(0.1)
        raise Unavailable(f"{what} did not become ready in {timeout:.0f}s\n"
                          + (self.log_tail(proc) if proc else ""))

    def cli(self, *args: str, check: bool = True, input: str | None = None
            ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([*_TRUSTMESH, *args, "--socket", str(self.data_dir / "admin.sock")],
                              capture_output=True, text=True, input=input, timeout=60)
        if check and proc.returncode != 0:
            raise TrustmeshError(f"trustmesh {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--output", "json").stdout)

    def spiffe_id(self, sa: str) -> str:
        return f"spiffe://{self.trust_domain}/ns/default/sa/{sa}"

    def start(self) -> MeshLab:
        p = self.ports
        self.say("starting the trustmesh server (SQLite, loopback)")
        self._spawn("server", [*_TRUSTMESH, "server", "run", "--data-dir", str(self.data_dir),
                               "--trust-domain", self.trust_domain,
                               "--http-address", f"127.0.0.1:{p['http']}",
                               "--bind-address", f"127.0.0.1:{p['agent_api']}",
                               "--attest-address", f"127.0.0.1:{p['attest']}",
                               "--admin-address", "", "--key-manager", "memory",
                               "--signing-workers", "0"])
        self._wait("server", lambda: (self.data_dir / "admin.sock").exists() and _http_ok(
            f"http://127.0.0.1:{p['http']}/healthz"), proc="server")
        token = self.cli_json("token", "create", "--spiffe-id",
                              f"spiffe://{self.trust_domain}/node/demo")["token"]
        bundle = self.base / "bundle.pem"
        bundle.write_text(self.cli("bundle", "show", "--format", "pem").stdout)
        self.say("starting the agent (join token) with the Workload API and SDS socket")
        self._spawn("agent", [*_TRUSTMESH, "agent", "run", "--server-address",
                              f"127.0.0.1:{p['agent_api']}", "--attest-address",
                              f"127.0.0.1:{p['attest']}", "--trust-bundle", str(bundle),
                              "--join-token", token, "--socket", str(self.agent_socket),
                              "--data-dir", str(self.base / "agent" / "data"),
                              "--sync-interval", "1s", "--health-address",
                              f"127.0.0.1:{p['agent_health']}"])
        self._wait("agent", lambda: self.agent_socket.exists() and _http_ok(
            f"http://127.0.0.1:{p['agent_health']}/healthz"), proc="agent")
        self.register_sidecars()
        self.cli("apply", "-f", "-", input=self.registry_yaml())
        self.say("starting the echo application and the two Envoy sidecars")
        self._spawn("echo-app", [sys.executable, "-m", "trustmesh.mesh.echo", "--port",
                                 str(p["echo_app"])])
        self._wait("echo app", lambda: _http_ok(f"http://127.0.0.1:{p['echo_app']}/"),
                   proc="echo-app")
        for name in ("echo", "client"):
            self.start_sidecar(name)
        self._wait("the mesh path client -> echo",
                   lambda: self.call("GET", "/").status == 200, timeout=60, proc="sidecar-client")
        return self

    def register_sidecars(self) -> None:
        """One registration entry per sidecar: a distinct uid when running as root, else
        this user and the Envoy binary (each sidecar then asks for its own SPIFFE ID)."""
        node = f"spiffe://{self.trust_domain}/node/demo"
        envoy = os.path.realpath(envoy_binary())
        for name in ("echo", "client"):
            selectors = ([f"unix:uid:{_SIDECAR_UIDS[name]}"] if self.as_root else
                         [f"unix:uid:{os.geteuid()}", f"unix:path:{envoy}"])
            args = ["entry", "create", "--spiffe-id", self.spiffe_id(name), "--parent-id", node,
                    "--x509-svid-ttl", self.svid_ttl]
            for s in selectors:
                args += ["--selector", s]
            self.cli(*args)

    def registry_yaml(self) -> str:
        p = self.ports
        return f"""\
apiVersion: mesh.trustmesh.io/v1alpha1
kind: Workload
metadata: {{name: echo, namespace: default, labels: {{app: echo}}}}
spec:
  serviceAccount: echo
  ports: [{{name: http, port: {p['echo_app']}, protocol: HTTP, sidecarPort: {p['echo_sidecar']}}}]
---
apiVersion: mesh.trustmesh.io/v1alpha1
kind: Service
metadata: {{name: echo, namespace: default}}
spec:
  selector: {{app: echo}}
  ports: [{{name: http, port: 80, targetPort: {p['echo_app']}, protocol: HTTP}}]
---
apiVersion: mesh.trustmesh.io/v1alpha1
kind: Workload
metadata: {{name: client, namespace: default, labels: {{app: client}}}}
spec:
  serviceAccount: client
  upstreams: [{{service: echo, port: 80, localPort: {p['client_outbound']}}}]
"""

    def start_sidecar(self, name: str) -> None:
        work = self.base / f"sidecar-{name}"
        work.mkdir(exist_ok=True)
        uid = _SIDECAR_UIDS[name] if self.as_root else None
        if uid is not None:
            os.chown(work, uid, uid)
        cmd = [*_TRUSTMESH, "sidecar", "run", "--workload", f"default/{name}",
               "--server-address", f"127.0.0.1:{self.ports['agent_api']}",
               "--agent-socket", str(self.agent_socket), "--trust-domain", self.trust_domain,
               "--admin-address", f"127.0.0.1:{self.ports[name + '_admin']}",
               "--work-dir", str(work), "--log-level", "warning"]
        if self.sidecar_concurrency is not None:
            cmd += ["--concurrency", str(self.sidecar_concurrency)]
        if not self.as_root:
            cmd += ["--svid", self.spiffe_id(name)]
        self._spawn(f"sidecar-{name}", cmd, uid=uid)

    def stop(self) -> None:
        for name in reversed(list(self.procs)):
            proc = self.procs[name]
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 15)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, 9)
                    proc.wait(timeout=15)
        self.procs.clear()
        for log in self._logs:
            log.close()
        self._logs.clear()

    # -- calls ---------------------------------------------------------------------
    def call(self, method: str, path: str, body: bytes | None = None) -> CallResult:
        """The client application's call: plaintext to its sidecar, mTLS onwards."""
        url = f"http://127.0.0.1:{self.ports['client_outbound']}{path}"
        req = urllib.request.Request(url, data=body, method=method)  # noqa: S310 - loopback
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310
                return CallResult(resp.status, resp.read().decode(errors="replace"))
        except urllib.error.HTTPError as exc:
            return CallResult(exc.code, exc.read().decode(errors="replace"))
        except (urllib.error.URLError, OSError) as exc:
            return CallResult(0, "", str(exc))

    def call_without_identity(self) -> CallResult:
        """A caller outside the mesh, straight to the echo sidecar with TLS but no
        client certificate."""
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # it has no trust bundle either; the server must refuse
        try:
            with socket.create_connection(("127.0.0.1", self.ports["echo_sidecar"]),
                                          timeout=5) as raw, \
                    ctx.wrap_socket(raw) as tls:
                tls.sendall(b"GET / HTTP/1.1\r\nhost: echo\r\nconnection: close\r\n\r\n")
                data = tls.recv(4096)
                if not data:
                    return CallResult(0, "", "connection closed without an answer")
                status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
                return CallResult(status, data.decode(errors="replace"))
        except (OSError, ssl.SSLError) as exc:
            return CallResult(0, "", f"{type(exc).__name__}: {exc}")

    def apply(self, text: str) -> subprocess.CompletedProcess[str]:
        return self.cli("apply", "-f", "-", input=text)

    def explain(self, method: str, path: str, source: str | None = None) -> dict[str, Any]:
        args = ["policy", "explain", "--to", "default/echo", "--method", method, "--path", path,
                "--port", str(self.ports["echo_app"]), "--output", "json"]
        if source is not None:
            args += ["--from", source]
        proc = self.cli(*args, check=False)
        if proc.returncode not in (0, 1):
            raise TrustmeshError(f"policy explain failed: {proc.stderr.strip()}")
        result: dict[str, Any] = json.loads(proc.stdout)
        return result

    def wait_status(self, method: str, path: str, status: int, timeout: float = 10
                    ) -> tuple[CallResult, float]:
        """Call until the answer has ``status``; returns it and the seconds it took."""
        start = time.monotonic()
        while True:
            result = self.call(method, path)
            if result.status == status or time.monotonic() - start > timeout:
                return result, time.monotonic() - start
            time.sleep(0.02)


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=1) as resp:  # noqa: S310 - loopback
        return bool(resp.status == 200)


DEFAULT_DENY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: default}
spec: {}
"""

ALLOW_CLIENT = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-client, namespace: default}
spec:
  selector: {matchLabels: {app: echo}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["example.org/ns/default/sa/client"]}}]
"""

ALLOW_PAYMENT_ONLY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-client, namespace: default}
spec:
  selector: {matchLabels: {app: echo}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["example.org/ns/default/sa/client"]}}]
    to: [{operation: {methods: ["POST"], paths: ["/api/payment"]}}]
"""

DEMO_STEPS = ("no identity", "identity", "default deny", "allow client", "payment only",
              "explain")


def run_demo(echo: Callable[[str], None], keep: bool = False) -> bool:
    """Run the scenario, printing each step and its result; True when all went as
    expected."""
    lab = MeshLab(log=lambda m: echo(f"  .. {m}"))
    ok = True

    def check(step: str, passed: bool, detail: str) -> None:
        nonlocal ok
        ok = ok and passed
        echo(f"[{'PASS' if passed else 'FAIL'}] {step}: {detail}")

    try:
        echo(f"trustmesh demo in {lab.base}")
        lab.start()
        r = lab.call_without_identity()
        check("1. a caller without an identity is refused by strict mTLS", r.status == 0,
              r.error or f"HTTP {r.status}")
        r = lab.call("GET", "/")
        xfcc = r.json()["headers"].get("x-forwarded-client-cert", "") if r.status == 200 else ""
        check("2. the client's sidecar calls echo over mTLS", r.status == 200 and
              f"URI={lab.spiffe_id('client')}" in xfcc, f"HTTP {r.status}; XFCC {xfcc}")
        lab.apply(DEFAULT_DENY)
        r, took = lab.wait_status("GET", "/", 403)
        check("3. default deny (AuthorizationPolicy with an empty spec)", r.status == 403 and
              "RBAC: access denied" in r.body, f"HTTP {r.status} {r.body!r} after {took:.2f}s")
        lab.apply(ALLOW_CLIENT)
        r, took = lab.wait_status("GET", "/", 200)
        check("4. ALLOW for the client's principal", r.status == 200,
              f"HTTP {r.status} after {took:.2f}s")
        lab.apply(ALLOW_PAYMENT_ONLY)
        post, took = lab.wait_status("POST", "/api/payment", 200)
        get, _ = lab.wait_status("GET", "/list", 403)
        check("5. ALLOW only POST /api/payment", post.status == 200 and get.status == 403,
              f"POST /api/payment -> {post.status}, GET /list -> {get.status}")
        client = lab.spiffe_id("client")
        allowed = lab.explain("POST", "/api/payment", client)
        denied = lab.explain("GET", "/list", client)
        check("6. policy explain agrees", allowed.get("allowed") is True and
              denied.get("allowed") is False,
              f"POST /api/payment: {allowed.get('summary')}; GET /list: {denied.get('summary')}")
        return ok
    finally:
        lab.stop()
        if not keep:
            shutil.rmtree(lab.base, ignore_errors=True)
        else:
            echo(f"logs kept in {lab.base}")
