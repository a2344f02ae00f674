"""The ``trustmesh agent run`` process: attest, sync, rotate, serve workloads.

The loop keeps going when the server is away: cached SVIDs are served until
they expire, and calls are retried with exponential backoff and jitter.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import random
import signal
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

from trustmesh.agent.cache import CachedEntry, CachedSvid, SvidCache, rotation_due
from trustmesh.agent.node_store import load_bundle, load_node, save_bundle, save_node
from trustmesh.agent.server_client import NodeCredentials, ServerClient, make_csr
from trustmesh.config import AgentConfig
from trustmesh.errors import ConfigError, PermissionDenied, TrustmeshError, Unavailable
from trustmesh.log import get_logger
from trustmesh.proto import agent_pb2
from trustmesh.spiffe.bundle import Bundle

if TYPE_CHECKING:
    from trustmesh.agent.sds import SecretDiscovery

__all__ = ["Agent", "run_agent"]

log = get_logger("trustmesh.agent")

_BACKOFF_MIN = 0.5
_BACKOFF_MAX = 30.0
_SIGN_BATCH = 200


def entry_from_proto(e: agent_pb2.Entry) -> CachedEntry:
    return CachedEntry(
        id=e.id, spiffe_id=e.spiffe_id, parent_id=e.parent_id,
        selectors=frozenset(e.selectors), x509_svid_ttl=e.x509_svid_ttl,
        jwt_svid_ttl=e.jwt_svid_ttl, dns_names=tuple(e.dns_names),
        federates_with=tuple(e.federates_with), hint=e.hint, revision=e.revision)


class ChangeNotifier:
    """A generation counter that waiters can block on (an Event that never stays set)."""

    def __init__(self) -> None:
        self.generation = 0
        self._cond: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        if self._cond is None:
            self._cond = asyncio.Condition()
        return self._cond

    def set(self) -> None:
        self.generation += 1
        cond = self._condition()

        async def notify() -> None:
            async with cond:
                cond.notify_all()

        with contextlib.suppress(RuntimeError):  # no running loop: nobody can be waiting
            asyncio.get_running_loop().create_task(notify())

    async def wait(self, seen: int, timeout: float) -> int:
        """Return when the generation differs from ``seen`` or after ``timeout``."""
        if self.generation != seen:
            return self.generation
        cond = self._condition()
        with contextlib.suppress(TimeoutError):
            async with cond:
                await asyncio.wait_for(cond.wait_for(lambda: self.generation != seen),
                                       timeout)
        return self.generation


class Agent:
    def __init__(self, config: AgentConfig, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        try:
            self.bundle_pem = Path(config.trust_bundle).read_bytes()
            self.roots = tuple(x509.load_pem_x509_certificates(self.bundle_pem))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load the trust bundle {config.trust_bundle}: {exc}",
                              field="trust_bundle") from None
        cached = load_bundle(config.data_dir)
        if cached:  # the roots fetched last time, besides the bootstrap ones (CA rotation)
            try:
                extra = [r for r in x509.load_pem_x509_certificates(cached)
                         if r not in self.roots]
            except ValueError:
                extra = []
            self.roots = (*self.roots, *extra)
            self.bundle_pem += b"".join(r.public_bytes(serialization.Encoding.PEM)
                                        for r in extra)
        self.client = ServerClient(config.server_address, config.effective_attest_address,
                                   self.bundle_pem)
        self.cache = SvidCache()
        self.node: NodeCredentials | None = None
        self.changes = ChangeNotifier()  # pulsed whenever workloads may see something new
        self.changed = self.changes
        self.server_reachable = False
        self.bundle_doc: dict[str, object] | None = None  # the SPIFFE bundle from the server
        # trust domain name -> bundle, for the trust domains this node's entries federate with
        self.federated: dict[str, Bundle] = {}
        self.crls: tuple[x509.CertificateRevocationList, ...] = ()
        self._crls_stale_logged = False
        self.sds: SecretDiscovery | None = None  # Envoy SDS, set when the socket serves

    # -- node identity -----------------------------------------------------------------
    async def establish_node(self) -> NodeCredentials:
        """Reuse the stored node SVID (renewing it proves the agent is still trusted),
        or attest with a join token / x509pop."""
        stored = load_node(self.config.data_dir)
        if stored is not None and stored.expires_at > self.clock():
            try:
                node = await self.client.renew(stored)
                log.info("re-attested with the stored node SVID",
                         extra={"spiffe_id": node.spiffe_id})
                return self._keep(node)
            except PermissionDenied:
                raise
            except TrustmeshError as exc:
                log.warning("could not renew the stored node SVID; using it as is",
                            extra={"error": str(exc)})
                return stored
        if self.config.join_token:
            node = await self.client.attest_join_token(self.config.join_token)
        elif self.config.x509pop_cert and self.config.x509pop_key:
            node = await self._attest_x509pop()
        elif stored is not None:
            raise ConfigError("the stored node SVID has expired; attest again with "
                              "--join-token or the x509pop flags")
        else:
            raise ConfigError("first start: give --join-token or --x509pop-cert/--x509pop-key")
        log.info("node attested", extra={"spiffe_id": node.spiffe_id})
        return self._keep(node)

    async def _attest_x509pop(self) -> NodeCredentials:
        assert self.config.x509pop_cert and self.config.x509pop_key
        try:
            certs = x509.load_pem_x509_certificates(Path(self.config.x509pop_cert).read_bytes())
            key = serialization.load_pem_private_key(
                Path(self.config.x509pop_key).read_bytes(), None)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load the x509pop certificate or key: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError("x509pop needs an EC node key")
        chain = b"".join(c.public_bytes(serialization.Encoding.DER) for c in certs)
        return await self.client.attest_x509pop(chain, key)

    def _keep(self, node: NodeCredentials) -> NodeCredentials:
        if node.received_at is None:
            node = dataclasses.replace(node, received_at=self.clock())
        save_node(self.config.data_dir, node)
        self.node = node
        return node

    # -- one round of work ---------------------------------------------------------------
    async def sync_once(self) -> None:
        assert self.node is not None
        if rotation_due(self.node.lifetime_start, self.node.expires_at, self.clock()):
            self._keep(await self.client.renew(self.node))
            log.info("renewed the node SVID")
        more = True
        while more:
            resp = await self.client.sync_entries(self.node, self.cache.revision)
            upserts = [entry_from_proto(c.entry) for c in resp.changes if not c.removed]
            removed = [c.id for c in resp.changes if c.removed]
            if self.cache.apply_changes(upserts, removed, resp.revision):
                self.changed.set()
            more = resp.more
        await self.refresh_bundle()
        await self.rotate()

    async def refresh_bundle(self) -> None:
        """Keep the trust domain's bundle (X.509 roots and JWT keys) current."""
        assert self.node is not None
        raw, federated, crls = await self.client.fetch_bundle(self.node)
        self._keep_federated(federated)
        self._keep_crls(crls)
        doc = json.loads(raw)
        if self.bundle_doc is None or doc.get("spiffe_sequence") != self.bundle_doc.get(
                "spiffe_sequence"):
            self.bundle_doc = doc
            roots = [x509.load_der_x509_certificate(base64.b64decode(k["x5c"][0]))
                     for k in doc.get("keys", []) if k.get("use") == "x509-svid" and k.get("x5c")]
            if roots:
                self.roots = tuple(roots)
                # the server's own SVID follows the CA when it rotates
                pem = b"".join(r.public_bytes(serialization.Encoding.PEM) for r in roots)
                self.client.update_trust(pem)
                save_bundle(self.config.data_dir, pem)
            self.changed.set()
            log.info("bundle updated", extra={"sequence": doc.get("spiffe_sequence")})

    def _keep_crls(self, ders: list[bytes]) -> None:
        """This trust domain's CRLs: handed to Envoy (SDS) and used to replace any SVID
        of this agent's that one of them lists."""
        if sorted(ders) == sorted(c.public_bytes(serialization.Encoding.DER)
                                  for c in self.crls):
            return
        try:
            crls = tuple(x509.load_der_x509_crl(d) for d in ders)
        except ValueError as exc:
            log.warning("ignoring unreadable CRLs from the server", extra={"error": str(exc)})
            return
        self.crls = crls
        self.cache.revoked = frozenset((c.issuer.public_bytes(), r.serial_number)
                                       for c in crls for r in c)
        self.changed.set()
        log.info("revocation lists updated", extra={
            "crls": len(crls), "revoked": len(self.cache.revoked)})

    def current_crls(self) -> tuple[x509.CertificateRevocationList, ...]:
        """The CRLs to give validators: all of them while every one is current, none once
        one has expired (a validator would then refuse every chain; SVIDs are short-lived
        and the next sync brings fresh CRLs)."""
        now = self.clock()
        if any(c.next_update_utc is None or c.next_update_utc.timestamp() <= now
               for c in self.crls):
            if not self._crls_stale_logged:
                log.warning("CRLs expired without a fresh copy from the server; validators "
                            "get none until the next sync", extra={"crls": len(self.crls)})
                self._crls_stale_logged = True
            return ()
        self._crls_stale_logged = False
        return self.crls

    def _keep_federated(self, documents: Mapping[str, bytes]) -> None:
        bundles: dict[str, Bundle] = {}
        for name, doc in documents.items():
            try:
                bundles[name] = Bundle.parse_jwks(doc, name)
            except TrustmeshError as exc:  # keep what we had for it; the rest still counts
                log.warning("ignoring an unreadable federated bundle",
                            extra={"trust_domain": name, "error": str(exc)})
                if name in self.federated:
                    bundles[name] = self.federated[name]
        if bundles != self.federated:
            added = sorted(set(bundles) - set(self.federated))
            removed = sorted(set(self.federated) - set(bundles))
            self.federated = bundles
            self.changed.set()
            log.info("federated bundles updated", extra={
                "trust_domains": sorted(bundles), "added": added, "removed": removed})

    def federated_for(self, federates_with: Iterable[str]) -> dict[str, Bundle]:
        """The federated bundles (trust domain name -> bundle) an entry may see."""
        return {td: b for td in federates_with if (b := self.federated.get(td)) is not None}

    def jwt_bundle_jwks(self) -> bytes:
        """The JWT authorities only, as a JWKS (what Workload API clients expect)."""
        keys = [k for k in (self.bundle_doc or {}).get("keys", [])  # type: ignore[attr-defined]
                if k.get("use") == "jwt-svid"]
        return json.dumps({"keys": keys}).encode()

    async def rotate(self) -> None:
        assert self.node is not None
        due = self.cache.due(self.clock())
        for start in range(0, len(due), _SIGN_BATCH):
            batch = due[start:start + _SIGN_BATCH]
            keys = {e: ec.generate_private_key(ec.SECP256R1()) for e in batch}
            results = await self.client.sign_svids(self.node,
                                                   [(e, make_csr(keys[e])) for e in batch])
            fresh = []
            for r in results:
                entry = self.cache.entries.get(r.entry_id)
                if r.error_code or entry is None:
                    log.warning("SVID not signed", extra={"entry_id": r.entry_id,
                                                          "error": r.error_message})
                    continue
                chain = tuple(x509.load_der_x509_certificate(d) for d in r.svid_chain)
                fresh.append(CachedSvid(r.entry_id, entry.revision, entry.spiffe_id,
                                        keys[r.entry_id], chain, entry.hint,
                                        received_at=self.clock()))
            self.cache.store(fresh)
            if fresh:
                log.info("signed SVIDs", extra={"count": len(fresh)})
                self.changed.set()
        if self.cache.expire(self.clock()):
            self.changed.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Sync and rotate until ``stop`` is set; never give up on a missing server."""
        backoff = _BACKOFF_MIN
        while not stop.is_set():
            try:
                await self.sync_once()
                if not self.server_reachable:
                    log.info("connected to the server", extra={
                        "server": self.config.server_address})
                self.server_reachable = True
                backoff = _BACKOFF_MIN
                wait = self.config.sync_interval.total_seconds()
            except PermissionDenied as exc:
                log.error("the server refuses this agent", extra={"error": str(exc)})
                self.server_reachable = False
                wait = backoff = min(_BACKOFF_MAX, backoff * 2)
            except (Unavailable, TrustmeshError) as exc:
                if self.server_reachable:
                    log.warning("lost the server; serving cached SVIDs",
                                extra={"error": str(exc)})
                self.server_reachable = False
                backoff = min(_BACKOFF_MAX, backoff * 2)
                wait = backoff
                if self.cache.expire(self.clock()):
                    self.changed.set()
            jittered = wait * random.uniform(0.8, 1.2)  # noqa: S311 - jitter, not crypto
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=jittered)


async def serve_agent(config: AgentConfig, stop: asyncio.Event) -> None:
    agent = Agent(config)
    backoff = _BACKOFF_MIN
    while not stop.is_set():
        try:
            await agent.establish_node()
            break
        except (ConfigError, PermissionDenied):
            raise
        except TrustmeshError as exc:
            log.warning("cannot reach the server to attest; retrying",
                        extra={"error": str(exc)})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=backoff)
            backoff = min(_BACKOFF_MAX, backoff * 2)
    if stop.is_set():
        return
    from trustmesh.agent.workload_source import start_workload_api

    workload_api = await start_workload_api(agent, config.socket)
    health = await start_health(agent, config.health_address)
    log.info("agent ready", extra={"spiffe_id": agent.node.spiffe_id if agent.node else "",
                                   "socket": str(config.socket)})
    try:
        await agent.run(stop)
    finally:
        if health is not None:
            await health.cleanup()
        await workload_api.stop()
        await agent.client.close()


async def start_health(agent: Agent, address: str | None) -> web.AppRunner | None:
    """/healthz (200 once attested and serving) and /metrics (Prometheus) of the agent."""
    if not address:
        return None
    registry = CollectorRegistry()
    Gauge("trustmesh_agent_entries", "Registration entries this agent serves.",
          registry=registry).set_function(lambda: len(agent.cache.entries))
    Gauge("trustmesh_agent_svids", "X509-SVIDs in the agent's cache.",
          registry=registry).set_function(lambda: len(agent.cache.svids))
    Gauge("trustmesh_agent_server_reachable", "1 when the last sync with the server worked.",
          registry=registry).set_function(lambda: 1.0 if agent.server_reachable else 0.0)
    Gauge("trustmesh_agent_registry_revision", "Registry revision the agent has synced to.",
          registry=registry).set_function(lambda: agent.cache.revision)
    Gauge("trustmesh_agent_sds_streams", "Open Envoy SDS streams.", registry=registry
          ).set_function(lambda: agent.sds.open_streams if agent.sds else 0)
    Gauge("trustmesh_agent_node_svid_not_after_seconds", "Expiry of the node X509-SVID.",
          registry=registry).set_function(
              lambda: agent.node.expires_at if agent.node else 0.0)

    async def healthz(_: web.Request) -> web.Response:
        body = {"status": "ok" if agent.node is not None else "starting",
                "spiffe_id": agent.node.spiffe_id if agent.node else None,
                "server_reachable": agent.server_reachable,
                "entries": len(agent.cache.entries), "svids": len(agent.cache.svids)}
        return web.json_response(body, status=200 if agent.node is not None else 503)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, _, port = address.rpartition(":")
    try:
        await web.TCPSite(runner, host.strip("[]"), int(port), reuse_address=True).start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"cannot listen on {address}: {exc.strerror}",
                          field="health_address") from None
    return runner


def run_agent(config: AgentConfig) -> None:
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve_agent(config, stop)

    asyncio.run(main())
