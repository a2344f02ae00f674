"""The ``trustmesh server run`` process: wires datastore, keys, CA and APIs, then serves."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import socket
import ssl
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import grpc
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from trustmesh.clock import Clock, SystemClock
from trustmesh.config import ServerConfig
from trustmesh.errors import ConfigError, PermissionDenied, Unauthenticated
from trustmesh.log import get_logger
from trustmesh.mesh.xds import add_ads_to_server
from trustmesh.pki.keys import open_key_manager
from trustmesh.proto import agent_pb2_grpc
from trustmesh.server.admin_api import Caller, build_admin_app, remote_caller_from_certificate
from trustmesh.server.agent_api import AgentApi, X509PopConfig
from trustmesh.server.authority import CertificateAuthority
from trustmesh.server.entry_cache import EntryCache
from trustmesh.server.http import build_public_app
from trustmesh.server.issuance import AsyncIssuer, default_worker_count
from trustmesh.server.mesh_config import MeshConfigService
from trustmesh.server.metrics import ServerMetrics
from trustmesh.server.ocsp_workers import OcspWorkers, default_ocsp_workers
from trustmesh.server.rbac_store import RbacPolicyStore
from trustmesh.server.registry import Registry
from trustmesh.spiffe.ids import TrustDomain
from trustmesh.store.datastore import Datastore

__all__ = ["run_server", "serve"]

log = get_logger("trustmesh.server")

_HOUSEKEEPING_INTERVAL = 10.0


def _prepare_data_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)


def _remove_stale_socket(path: Path) -> None:
    if not path.exists():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # nobody listens: left over from a crash
        return
    finally:
        probe.close()
    raise ConfigError(f"another server is already listening on {path}")


def build_authority(config: ServerConfig, clock: Clock,
                    environ: dict[str, str] | None = None) -> CertificateAuthority:
    _prepare_data_dir(config.data_dir)
    store = Datastore(config.datastore_url)
    store.migrate()
    keys = open_key_manager(config.key_manager, config.data_dir,
                            dict(os.environ) if environ is None else environ)
    return CertificateAuthority(config, store, keys, clock)


class ServerIdentity:
    """The server's own X509-SVID for the agent API, renewed at two thirds of its life."""

    def __init__(self, ca: CertificateAuthority, ttl: timedelta) -> None:
        self._ca = ca
        self._ttl = ttl
        self._lock = threading.Lock()
        self.version = 0
        self._on_rotate: list[Callable[[], None]] = []
        self._issue()

    def _signers(self) -> tuple[str, tuple[x509.Certificate, ...]]:
        return self._ca.ca_id, self._ca.anchors

    def _issue(self) -> None:
        self._issued_under = self._signers()  # reissued when the CA rotates
        key, chain = self._ca.issue_server_identity(self._ttl)
        leaf = chain[0]
        life = leaf.not_valid_after_utc - self._ca.clock.now()
        with self._lock:
            self.key_pem = key.private_bytes(serialization.Encoding.PEM,
                                             serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption())
            # the chain without the root: clients hold the root in their trust bundle
            self.chain_pem = "".join(
                c.public_bytes(serialization.Encoding.PEM).decode() for c in chain[:-1]
            ).encode()
            self.roots_pem = "".join(
                c.public_bytes(serialization.Encoding.PEM).decode() for c in self._ca.anchors
            ).encode()
            self.refresh_at = self._ca.clock.now() + life * 2 / 3
            self.version += 1

    def rotate_if_due(self) -> bool:
        if self._ca.clock.now() < self.refresh_at and self._issued_under == self._signers():
            return False
        self._issue()
        for reload in self._on_rotate:
            reload()
        log.info("renewed the server's X509-SVID")
        return True

    def on_rotate(self, callback: Callable[[], None]) -> None:
        self._on_rotate.append(callback)

    def admin_ssl_context(self, tls_dir: Path) -> ssl.SSLContext:
        """TLS for the remote admin API: our X509-SVID, client certificates required
        and verified against the trust anchors."""
        tls_dir.mkdir(mode=0o700, exist_ok=True)
        key_file, cert_file = tls_dir / "server.key", tls_dir / "server.pem"
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cadata=self.roots_pem.decode())

        def load() -> None:
            with self._lock:
                for path, data in ((key_file, self.key_pem), (cert_file, self.chain_pem)):
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                    try:
                        os.write(fd, data)
                    finally:
                        os.close(fd)
                ctx.load_cert_chain(cert_file, key_file)
                ctx.load_verify_locations(cadata=self.roots_pem.decode())  # a new CA's root

        load()
        self.on_rotate(load)
        return ctx

    def tls_config(self) -> grpc.ServerCertificateConfiguration:
        with self._lock:
            return grpc.ssl_server_certificate_configuration(
                [(self.key_pem, self.chain_pem)], root_certificates=self.roots_pem)


async def start_agent_api(config: ServerConfig, ca: CertificateAuthority, issuer: AsyncIssuer,
                          registry: Registry, identity: ServerIdentity,
                          clock: Clock, mesh: MeshConfigService | None = None,
                          metrics: ServerMetrics | None = None) -> grpc.aio.Server:
    x509pop = None
    if config.x509pop_ca is not None:
        try:
            cas = x509.load_pem_x509_certificates(Path(config.x509pop_ca).read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load x509pop CAs from {config.x509pop_ca}: {exc}",
                              field="x509pop_ca") from None
        x509pop = X509PopConfig(tuple(cas))
    api = AgentApi(ca, issuer, registry, EntryCache(ca.store), clock,
                   agent_svid_ttl=int(config.agent_svid_ttl.total_seconds()), x509pop=x509pop,
                   jwt=ca.jwt)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 16 * 1024 * 1024)])
    agent_pb2_grpc.add_AgentServicer_to_server(api, server)
    if mesh is not None:  # sidecars fetch their Envoy configuration here (ADS over mTLS)
        ads = add_ads_to_server(server, mesh)
        if metrics is not None:
            metrics.track_xds(ads.stats, lambda: mesh.snapshot().revision)
    def credentials(require_client_cert: bool) -> grpc.ServerCredentials:
        seen = {"version": identity.version}

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            if identity.version == seen["version"]:
                return None  # unchanged: keep serving the current certificate
            seen["version"] = identity.version
            return identity.tls_config()

        return grpc.dynamic_ssl_server_credentials(
            identity.tls_config(), fetch, require_client_authentication=require_client_cert)

    # grpcio can either require a client certificate or not ask for one, so the
    # agent API has two ports: mutual TLS for agents, plain TLS for Attest only.
    for address, mutual, name in ((config.bind_address, True, "bind_address"),
                                  (config.attest_address, False, "attest_address")):
        try:
            port = server.add_secure_port(address, credentials(mutual))
        except RuntimeError as exc:
            raise ConfigError(f"cannot listen on {address}: {exc}", field=name) from None
        if port == 0:
            raise ConfigError(f"cannot listen on {address}", field=name)
    await server.start()
    return server


def _update_gauges(ca: CertificateAuthority, metrics: ServerMetrics) -> None:
    latest = ca.store.latest_crl(ca.ca_id)
    if latest is not None:
        metrics.crl_number.labels(ca.ca_id).set(latest.number)
    for i, cert in enumerate(ca.chain):
        role = "signing" if i == 0 else "issuer"
        metrics.ca_expiry.labels(format(cert.serial_number, "x")[:16], role).set(
            cert.not_valid_after_utc.timestamp())
    metrics.update_ca_slots(ca.slot_states())


async def serve(config: ServerConfig, stop: asyncio.Event, clock: Clock | None = None) -> None:
    """Run until ``stop`` is set."""
    clock = clock or SystemClock()
    loop = asyncio.get_running_loop()
    ca = await loop.run_in_executor(None, build_authority, config, clock)
    metrics = ServerMetrics()
    _update_gauges(ca, metrics)

    workers = (config.signing_workers if config.signing_workers is not None
               else default_worker_count())
    issuer = AsyncIssuer(ca, workers, pool_allowed=ca.keys.name != "pkcs11")
    await issuer.start()
    ocsp_count = (config.ocsp_workers if config.ocsp_workers is not None
                  else default_ocsp_workers())
    ocsp_workers = OcspWorkers(
        ocsp_count, address=config.http_address, datastore_url=config.datastore_url,
        data_dir=config.data_dir, metrics=metrics, log_level=config.log_level,
        log_format=config.log_format) if ocsp_count else None
    public = web.AppRunner(build_public_app(
        ca, metrics, before_scrape=ocsp_workers.collect if ocsp_workers else None),
        access_log=None)
    registry = Registry(ca.store, TrustDomain.parse(config.trust_domain), clock)
    rbac_policy = RbacPolicyStore(ca.store)
    mesh = MeshConfigService(ca.store, config.trust_domain,
                             root_namespace=config.mesh_root_namespace)
    await mesh.refresh()
    admin = web.AppRunner(build_admin_app(ca, metrics, issuer, registry,
                                          policy=rbac_policy, mesh=mesh), access_log=None)
    identity = ServerIdentity(ca, config.server_svid_ttl)
    agent_server = await start_agent_api(config, ca, issuer, registry, identity, clock,
                                         mesh=mesh, metrics=metrics)
    remote: web.AppRunner | None = None
    if config.admin_address:
        def authenticate(request: web.Request) -> Caller:
            ssl_object = request.transport.get_extra_info("ssl_object") if (
                request.transport) else None
            der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
            if not der:
                raise Unauthenticated("a client certificate is required")
            cert = x509.load_der_x509_certificate(der)
            status = ca.store.certificate_status(format(cert.serial_number, "x"))
            if status is not None and status[1] == "revoked":
                raise PermissionDenied("the client certificate has been revoked")
            return remote_caller_from_certificate(cert)

        remote = web.AppRunner(build_admin_app(ca, metrics, issuer, registry,
                                               authenticate=authenticate, policy=rbac_policy,
                                               mesh=mesh),
                               access_log=None)
        await remote.setup()
        rhost, _, rport = config.admin_address.rpartition(":")
        try:
            await web.TCPSite(remote, rhost.strip("[]"), int(rport),
                              ssl_context=identity.admin_ssl_context(config.data_dir / "tls"),
                              reuse_address=True).start()
        except OSError as exc:
            raise ConfigError(f"cannot listen on {config.admin_address}: {exc.strerror}",
                              field="admin_address") from None
    await public.setup()
    await admin.setup()
    host, _, port = config.http_address.rpartition(":")
    host = host.strip("[]")
    try:
        if ocsp_workers is not None:  # they hold the port and pass other routes to `public`
            await ocsp_workers.start(public, lambda: ca.ocsp_responder)
        else:
            await web.TCPSite(public, host, int(port), reuse_address=True).start()
    except (OSError, ConfigError) as exc:
        await public.cleanup()
        await admin.cleanup()
        await issuer.close()
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"cannot listen on {config.http_address}: {exc.strerror}",
                          field="http_address") from None
    sock_path = config.admin_socket
    _remove_stale_socket(sock_path)
    old_umask = os.umask(0o177)  # the socket is born 0600: no window where others may connect
    try:
        await web.UnixSite(admin, str(sock_path)).start()
    finally:
        os.umask(old_umask)
    os.chmod(sock_path, 0o600)
    if ocsp_workers is not None:
        ocsp_workers.open()
    settle_garbage_collector()
    log.info(
        "server ready",
        extra={"trust_domain": config.trust_domain, "http": f"http://{config.http_address}",
               "admin_socket": str(sock_path), "datastore": ca.store.redacted_url,
               "ca_id": ca.ca_id, "crl_url": ca.authority.urls.crl_url,
               "ocsp_url": ca.authority.urls.ocsp_url,
               "signing_workers": issuer.pool.workers if issuer.pool else 0,
               "ocsp_workers": ocsp_count,
               "agent_api": config.bind_address, "attest_api": config.attest_address,
               "remote_admin_api": config.admin_address},
    )

    async def housekeeping() -> None:
        while True:
            await asyncio.sleep(min(_HOUSEKEEPING_INTERVAL, ca.seconds_until_rotation() + 0.05))
            try:
                await loop.run_in_executor(None, ca.rotate_x509)
                await loop.run_in_executor(None, ca.ensure_crl)
                await loop.run_in_executor(None, ca.rotate_responder_if_due)
                await loop.run_in_executor(None, identity.rotate_if_due)
                await loop.run_in_executor(None, ca.jwt.rotate)
                _update_gauges(ca, metrics)
            except Exception:
                log.exception("housekeeping failed; retrying at the next interval")

    task = asyncio.create_task(housekeeping())
    mesh_follower = asyncio.create_task(mesh.follow(stop))
    try:
        await stop.wait()
    finally:
        task.cancel()
        mesh_follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        with contextlib.suppress(asyncio.CancelledError):
            await mesh_follower
        await agent_server.stop(grace=2)
        if remote is not None:
            await remote.cleanup()
        if ocsp_workers is not None:
            await ocsp_workers.close()
        await public.cleanup()
        await admin.cleanup()
        await issuer.close()
        with contextlib.suppress(FileNotFoundError):
            sock_path.unlink()
        ca.store.close()
        close_keys = getattr(ca.keys, "close", None)
        if callable(close_keys):
            close_keys()  # releases an HSM session and login
        log.info("server stopped")


def settle_garbage_collector() -> None:
    """Keep the collector off what start-up built, and collect the young less often.

    A started server holds a large, long-lived heap (modules, the CA, caches, gRPC
    and SQLAlchemy state) that every full collection would walk again, while a busy
    server makes many short-lived objects (a batch of 200 CSRs is thousands). Measured
    on the SVID signing benchmark, this saves about 5-10 % of the server process's
    CPU per SVID. Freezing start-up's objects (``gc.freeze``) takes them out of every
    collection; a larger first-generation threshold means fewer collections of the
    young, which still run (reference cycles are still freed).
    """
    gc.collect()
    gc.freeze()
    _, second, third = gc.get_threshold()
    gc.set_threshold(_GC_YOUNG_THRESHOLD, second, third)


_GC_YOUNG_THRESHOLD = 20_000


def run_server(config: ServerConfig) -> None:
    """Blocking entry point used by the CLI; SIGINT/SIGTERM stop it cleanly."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(config, stop)

    asyncio.run(main())
