"""PeerAuthentication: the mTLS mode of a workload's port, with Istio's precedence. Pure.

Most specific wins: a policy selecting the workload, then its namespace's
policy without selector, then the mesh-wide one (root namespace, no
selector), then the default. trustmesh's default is STRICT (Istio's is
PERMISSIVE): nothing talks to a workload without an identity until a
PeerAuthentication says so; pass ``default="PERMISSIVE"`` for Istio's.
``UNSET`` inherits from the level above; ``portLevelMtls`` of the workload's
policy overrides for its ports (``UNSET`` there inherits the workload's mode).

When a level has several policies the oldest wins, as in Istio, which uses the
creation time. Callers either pass policies oldest first (the datastore lists
them in that order) or give ``created``, a creation time per
``(namespace, name)``; equal times are broken by name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from trustmesh.policy.mesh_model import MTLS_MODES, PeerAuthentication

__all__ = ["DEFAULT_MODE", "effective_mtls"]

DEFAULT_MODE = "STRICT"


def _oldest(policies: list[PeerAuthentication]) -> PeerAuthentication | None:
    return policies[0] if policies else None


def effective_mtls(policies: Iterable[PeerAuthentication], namespace: str,
                   labels: Mapping[str, str], port: int, root_namespace: str, *,
                   created: Mapping[tuple[str, str], float] | None = None,
                   default: str = DEFAULT_MODE) -> tuple[str, str | None]:
    """(mode, the policy that decided it, or None for the default) for one port of a
    workload in ``namespace`` with ``labels``."""
    if default not in MTLS_MODES or default == "UNSET":
        raise ValueError(f"default mTLS mode must be STRICT, PERMISSIVE or DISABLE, "
                         f"not {default!r}")
    ordered = list(policies)
    if created is not None:
        # a policy without a known creation time counts as the newest
        ordered.sort(key=lambda p: (created.get((p.meta.namespace, p.meta.name),
                                                float("inf")), p.meta.name))
    mesh = _oldest([p for p in ordered if p.meta.namespace == root_namespace
                    and not p.selector])
    ns = _oldest([p for p in ordered if p.meta.namespace == namespace and not p.selector
                  and namespace != root_namespace])
    workload = _oldest([p for p in ordered if p.meta.namespace == namespace and p.selector
                        and all(labels.get(k) == v for k, v in p.selector.items())])
    mode, decided = default, None
    for level in (mesh, ns, workload):
        if level is not None and level.mode != "UNSET":
            mode, decided = level.mode, level.ref
    if workload is not None:
        port_mode = workload.port_modes.get(port)
        if port_mode is not None and port_mode != "UNSET":
            mode, decided = port_mode, f"{workload.ref} (port {port})"
    return mode, decided
