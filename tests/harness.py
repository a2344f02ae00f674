"""Start real trustmesh processes for tests and always stop them."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID

from trustmesh.mesh.demo import free_loopback_port

VENV_BIN = Path(sys.executable).parent
TRUSTMESH = str(VENV_BIN / "trustmesh")


def free_port() -> int:
    """A loopback port for a test's listener (below the ephemeral range, never reused)."""
    return free_loopback_port()


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 15,
                 sig: int = signal.SIGTERM) -> int:
    """Ask a child to exit (``sig``), kill it if it has not within ``timeout``; its code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
    return proc.returncode


def run(args: Sequence[str], *, check: bool = False, input: bytes | None = None,
        env: dict[str, str] | None = None, timeout: float = 60,
        user: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = list(args)
    if user:
        import pwd

        pw = pwd.getpwnam(user)
        cmd = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups",
               *cmd]
    proc = subprocess.run(
        cmd, input=input.decode() if input is not None else None, capture_output=True,
        text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout}\n"
            f"stderr:\n{proc.stderr}")
    return proc


def openssl(*args: str, check: bool = True, timeout: float = 30
            ) -> subprocess.CompletedProcess[str]:
    return run(["openssl", *args], check=check, timeout=timeout)


class ServerProcess:
    """``trustmesh server run`` as a real child process on a loopback port."""

    def __init__(self, data_dir: Path, extra_args: Sequence[str] = (),
                 env: dict[str, str] | None = None, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.agent_port = free_port()
        self.attest_port = free_port()
        self.admin_port = free_port()
        self.extra_args = list(extra_args)
        if not any(a.startswith("--ocsp-workers") for a in self.extra_args):
            # OCSP answered in the server process: each test server stays one process.
            # tests/integration/test_ocsp_workers.py runs the responder processes.
            self.extra_args += ["--ocsp-workers", "0"]
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"{data_dir.name}-server.log"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def socket(self) -> Path:
        return self.data_dir / "admin.sock"

    def start(self, timeout: float = 60) -> ServerProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._log = log
        self.proc = subprocess.Popen(
            [TRUSTMESH, "server", "run", "--data-dir", str(self.data_dir),
             "--http-address", f"127.0.0.1:{self.port}",
             "--bind-address", f"127.0.0.1:{self.agent_port}",
             "--attest-address", f"127.0.0.1:{self.attest_port}",
             "--admin-address", f"127.0.0.1:{self.admin_port}", *self.extra_args],
            stdout=log, stderr=log, env={**os.environ, **self.env},
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.base_url}/healthz", timeout=1).status_code == 200 and (
                    self.socket.exists()
                ):
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise AssertionError(f"server did not become ready in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-5000:]
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc is None:
            return None
        rc = stop_process(self.proc, sig=sig)
        self.proc = None
        self._log.close()
        return rc

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def cli(self, *args: str, check: bool = False, input: bytes | None = None,
            user: str | None = None) -> subprocess.CompletedProcess[str]:
        return run([TRUSTMESH, *args, "--socket", str(self.socket)], check=check,
                   input=input, user=user)

    def cli_json(self, *args: str) -> Any:
        proc = self.cli(*args, "--output", "json", check=True)
        return json.loads(proc.stdout)


# -- CA helpers shared by the integration tests --------------------------------


def make_csr(tmp: Path, name: str, *, key: str = "ec", subj: str = "/CN=web.internal",
             extra: tuple[str, ...] = ()) -> Path:
    csr = tmp / f"{name}.csr"
    keyfile = tmp / f"{name}.key"
    if key == "ec":
        newkey = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
    elif key.startswith("rsa"):
        newkey = ["-newkey", key]
    else:
        raise ValueError(key)
    openssl("req", "-new", *newkey, "-nodes", "-keyout", str(keyfile), "-subj", subj,
            "-out", str(csr), *extra)
    return csr


def split_chain(pem: str) -> list[str]:
    return re.findall(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----\n", pem,
                      flags=re.S)


def issue(srv: ServerProcess, tmp: Path, csr: Path, *args: str) -> dict[str, object]:
    out = srv.cli_json("ca", "issue", "--csr", str(csr), *args)
    chain = split_chain(str(out["chain_pem"]))
    leaf, inter, root = tmp / f"{csr.stem}.pem", tmp / "inter.pem", tmp / "root.pem"
    leaf.write_text(chain[0])
    inter.write_text(chain[1])
    root.write_text(chain[-1])
    return {**out, "leaf": leaf, "inter": inter, "root": root, "chain": chain}


def urls_of(cert_path: Path) -> tuple[str, str]:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    dp = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    crl_url = dp[0].full_name[0].value
    aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    ocsp_url = next(a.access_location.value for a in aia
                    if a.access_method == AuthorityInformationAccessOID.OCSP)
    return crl_url, ocsp_url


def ocsp_request(out: dict[str, object], *, nonce: bool) -> bytes:
    """A DER OCSP request (SHA-1 CertID, as openssl sends) for the leaf of ``issue``."""
    leaf = x509.load_pem_x509_certificate(Path(str(out["leaf"])).read_bytes())
    inter = x509.load_pem_x509_certificate(Path(str(out["inter"])).read_bytes())
    builder = ocsp.OCSPRequestBuilder().add_certificate(leaf, inter, hashes.SHA1())  # noqa: S303
    if nonce:
        builder = builder.add_extension(x509.OCSPNonce(os.urandom(16)), critical=False)
    return builder.build().public_bytes(serialization.Encoding.DER)


def audit_count(srv: ServerProcess) -> int:
    return len(srv.cli_json("ca", "audit"))


class AgentProcess:
    def __init__(self, srv: ServerProcess, base: Path, token: str) -> None:
        self.base = base
        self.socket = base / "public" / "api.sock"
        self.health = free_port()
        bundle = base / "bundle.pem"
        bundle.write_bytes(httpx.get(f"{srv.base_url}/ca/bundle.pem").content)
        self.log_path = base / "agent.log"
        self.args = [TRUSTMESH, "agent", "run", "--server-address",
                     f"127.0.0.1:{srv.agent_port}", "--attest-address",
                     f"127.0.0.1:{srv.attest_port}", "--trust-bundle", str(bundle),
                     "--join-token", token, "--socket", str(self.socket), "--data-dir",
                     str(base / "data"), "--sync-interval", "1s", "--health-address",
                     f"127.0.0.1:{self.health}"]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProcess:
        self._log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=self._log)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_path.read_text()[-3000:]
            try:
                r = httpx.get(f"http://127.0.0.1:{self.health}/healthz", timeout=1)
                if r.status_code == 200 and self.socket.exists():
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError("agent not ready:\n" + self.log_path.read_text()[-3000:])

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self._log.close()
        self.proc = None
