"""``trustmesh rbac``: Kubernetes-style RBAC evaluation (can-i, who-can)."""

from __future__ import annotations

import click


@click.group()
def rbac() -> None:
    """Evaluate Kubernetes RBAC: can-i and who-can."""
