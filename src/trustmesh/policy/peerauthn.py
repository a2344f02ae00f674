"""PeerAuthentication: the mTLS mode of a workload's port, with Istio's precedence. Pure.

Most specific wins: a policy selecting the workload, then its namespace's
policy without selector, then the mesh-wide one (root namespace, no
selector), then the default. trustmesh's default is STRICT (Istio's is
PERMISSIVE): nothing talks to a workload without an identity until a
PeerAuthentication says so. ``UNSET`` inherits from the level
above; ``portLevelMtls`` of the workload's policy overrides for its ports.
When a level has several policies the oldest wins (Istio uses creation time);
callers pass policies oldest first.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from trustmesh.policy.mesh_model import PeerAuthentication

__all__ = ["DEFAULT_MODE", "effective_mtls"]

DEFAULT_MODE = "STRICT"


def _first(policies: list[PeerAuthentication]) -> PeerAuthentication | None:
    return policies[0] if policies else None


def effective_mtls(policies: Iterable[PeerAuthentication], namespace: str,
                   labels: Mapping[str, str], port: int, root_namespace: str
                   ) -> tuple[str, str | None]:
    """(mode, the policy that decided it or None for the default)."""
    policies = list(policies)
    mesh = _first([p for p in policies if p.meta.namespace == root_namespace
                   and not p.selector])
    ns = _first([p for p in policies if p.meta.namespace == namespace and not p.selector
                 and namespace != root_namespace])
    workload = _first([p for p in policies if p.meta.namespace == namespace and p.selector
                       and all(labels.get(k) == v for k, v in p.selector.items())])
    mode, decided = DEFAULT_MODE, None
    for level in (mesh, ns, workload):
        if level is not None and level.mode != "UNSET":
            mode, decided = level.mode, level.ref
    if workload is not None:
        port_mode = workload.port_modes.get(port)
        if port_mode is not None and port_mode != "UNSET":
            mode, decided = port_mode, f"{workload.ref} (port {port})"
    return mode, decided
