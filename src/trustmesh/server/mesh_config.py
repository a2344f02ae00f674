"""The server's mesh configuration: policies and the service registry, stored with
revisions, compiled per sidecar and followed by the ADS streams.

``apply``/``delete`` validate a whole multi-document input before anything is
stored (all or nothing). Every replica follows the datastore's mesh revision,
so a change applied on one server reaches sidecars connected to another.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trustmesh.mesh.plan as mesh_plan
from trustmesh.errors import InvalidInput, NotFound, PermissionDenied
from trustmesh.log import get_logger
from trustmesh.mesh.envoy.compile import (
    CLUSTER_TYPE,
    LISTENER_TYPE,
    ROUTE_TYPE,
    compile_clusters,
    compile_listeners,
    compile_routes,
    resource_version,
)
from trustmesh.mesh.xds import NodeConfig
from trustmesh.policy import mesh_model
from trustmesh.store.datastore import Datastore

__all__ = ["MeshConfigService", "MeshSnapshot"]

log = get_logger("trustmesh.server.mesh")

KIND_ORDER = ("Workload", "Service", "PeerAuthentication", "AuthorizationPolicy")


@dataclass(frozen=True)
class MeshSnapshot:
    revision: int
    resources: tuple[Any, ...]  # mesh_model resources, oldest first
    created_at: dict[tuple[str, str, str], int]


class MeshConfigService:
    def __init__(self, store: Datastore, trust_domain: str, *,
                 root_namespace: str = "istio-system",
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.trust_domain = trust_domain
        self.root_namespace = root_namespace
        self.clock = clock
        self.generation = 0
        self._lock = threading.Lock()  # guards the snapshot and the compiled configs
        self._reload_lock = threading.Lock()  # one reload at a time (several threads call it)
        self._snapshot = MeshSnapshot(-1, (), {})
        self._compiled: dict[str, NodeConfig] = {}
        self._cond: asyncio.Condition | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- snapshot ----------------------------------------------------------------------
    def snapshot(self) -> MeshSnapshot:
        with self._lock:
            return self._snapshot

    def reload(self) -> bool:
        """Read the datastore if its mesh revision moved; True when something changed.

        Serialized, and never goes backwards: a slow reader that read an older revision
        cannot replace a newer snapshot another thread loaded meanwhile.
        """
        with self._reload_lock:
            return self._reload()

    def _reload(self) -> bool:
        revision = self.store.mesh_revision()
        if revision <= self._snapshot.revision:
            return False
        revision, rows = self.store.list_mesh_resources()
        resources = []
        created: dict[tuple[str, str, str], int] = {}
        for kind, namespace, name, body, created_at in rows:
            try:
                resources.append(mesh_model.resource_from_dict(body))
            except InvalidInput as exc:  # stored by a newer/older server; keep the rest
                log.error("stored mesh resource no longer loads; ignoring it", extra={
                    "kind": kind, "namespace": namespace, "name": name, "error": str(exc)})
                continue
            created[(kind, namespace, name)] = created_at
        with self._lock:
            self._snapshot = MeshSnapshot(revision, tuple(resources), created)
            self._compiled = {}
            self.generation += 1
        log.info("mesh configuration loaded", extra={"revision": revision,
                                                     "resources": len(resources)})
        return True

    async def refresh(self) -> None:
        """Reload in a worker thread and wake the ADS streams if anything changed."""
        loop = asyncio.get_running_loop()
        if await loop.run_in_executor(None, self.reload):
            await self._notify()

    async def _notify(self) -> None:
        cond = self._condition()
        async with cond:
            cond.notify_all()

    def _condition(self) -> asyncio.Condition:
        if self._cond is None:
            self._cond = asyncio.Condition()
        return self._cond

    async def wait_change(self, seen: int, timeout: float) -> int:
        if self.generation != seen:
            return self.generation
        cond = self._condition()
        with contextlib.suppress(TimeoutError):
            async with cond:
                await asyncio.wait_for(cond.wait_for(lambda: self.generation != seen), timeout)
        return self.generation

    async def follow(self, stop: asyncio.Event, interval: float = 1.0) -> None:
        """Poll the datastore's mesh revision (changes made through other replicas)."""
        while not stop.is_set():
            try:
                await self.refresh()
            except Exception:
                log.exception("could not read the mesh configuration; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)

    # -- admin operations ------------------------------------------------------------------
    def apply(self, text: str, source: str = "<input>", *, dry_run: bool = False,
              authorize: Callable[[str, Any], None] | None = None) -> dict[str, Any]:
        """Validate every document, then store them all in one transaction."""
        docs = mesh_model.load_mesh_resources(text, source=source)
        if not docs:
            raise InvalidInput(f"{source}: no resources found")
        for d in docs:
            if authorize is not None:
                authorize("update", d)
        merged = self._merge(docs)
        warnings = mesh_plan.check_resources(merged, docs, self.trust_domain,
                                             self.root_namespace)
        bodies = [(*mesh_model.resource_key(d), mesh_model.dump_resource(d)) for d in docs]
        if dry_run:
            stored = self.store.list_mesh_resources()[1]
            current = {(k, ns, n): body for k, ns, n, body, _ in stored}
            outcomes = ["unchanged" if current.get((k, ns, n)) == body else
                        ("configured" if (k, ns, n) in current else "created")
                        for k, ns, n, body in bodies]
            revision = self.store.mesh_revision()
        else:
            revision, outcomes = self.store.apply_mesh_resources(
                bodies, int(self.clock() * 1_000_000))
        return {"revision": revision, "dry_run": dry_run, "warnings": warnings,
                "results": [{"kind": k, "namespace": ns, "name": n, "outcome": o}
                            for (k, ns, n, _), o in zip(bodies, outcomes, strict=True)]}

    def _merge(self, docs: list[Any]) -> tuple[Any, ...]:
        """The stored resources with ``docs`` applied over them (what apply would leave)."""
        self.reload()
        replaced = {mesh_model.resource_key(d) for d in docs}
        kept = [r for r in self.snapshot().resources
                if mesh_model.resource_key(r) not in replaced]
        return (*kept, *docs)

    def delete(self, text: str, source: str = "<input>", *, ignore_not_found: bool = False,
               authorize: Callable[[str, Any], None] | None = None) -> dict[str, Any]:
        docs = mesh_model.load_mesh_resources(text, source=source)
        if authorize is not None:
            for d in docs:
                authorize("delete", d)
        keys = [mesh_model.resource_key(d) for d in docs]
        revision, deleted = self.store.delete_mesh_resources(keys,
                                                             ignore_missing=ignore_not_found)
        return {"revision": revision, "results": [
            {"kind": k, "namespace": ns, "name": n, "outcome": "deleted" if gone else "not found"}
            for (k, ns, n), gone in zip(keys, deleted, strict=True)]}

    def get(self, kind: str | None = None, namespace: str | None = None) -> dict[str, Any]:
        if kind is not None:
            kind = mesh_model.canonical_kind(kind)
        revision, rows = self.store.list_mesh_resources(kind)
        return {"revision": revision, "resources": [
            body for _, ns, _, body, _ in rows if namespace is None or ns == namespace]}

    def explain(self, query: dict[str, Any]) -> dict[str, Any]:
        self.reload()
        return mesh_plan.explain(self.snapshot().resources, query, self.trust_domain,
                                 self.root_namespace)

    # -- sidecars --------------------------------------------------------------------------
    def config_for(self, node_id: str, peer_spiffe_id: str) -> NodeConfig:
        with self._lock:
            snap = self._snapshot
            cached = self._compiled.get(node_id)
        workload = mesh_plan.find_workload(snap.resources, node_id)
        if workload is None:
            raise NotFound(f"no Workload {node_id}; apply one before starting its sidecar")
        expected = mesh_model.workload_spiffe_id(workload, self.trust_domain)
        if expected != peer_spiffe_id:
            raise PermissionDenied(f"sidecar for {node_id} must present {expected}, "
                                   f"not {peer_spiffe_id}")
        if cached is not None:
            return cached
        plan = mesh_plan.plan_sidecar(snap.resources, workload, self.trust_domain,
                                      self.root_namespace)
        clusters = tuple(compile_clusters(plan))
        listeners = tuple(compile_listeners(plan))
        routes = tuple(compile_routes(plan))  # HTTP RBAC: a policy change moves only these
        config = NodeConfig(
            resources={CLUSTER_TYPE: clusters, LISTENER_TYPE: listeners, ROUTE_TYPE: routes},
            versions={CLUSTER_TYPE: resource_version(clusters),
                      LISTENER_TYPE: resource_version(listeners),
                      ROUTE_TYPE: resource_version(routes)})
        with self._lock:
            if self._snapshot is snap:
                self._compiled[node_id] = config
        return config
