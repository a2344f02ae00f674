"""``trustmesh netpol``: NetworkPolicy evaluation (matrix, explain, lint)."""

from __future__ import annotations

import click


@click.group()
def netpol() -> None:
    """Evaluate, explain and lint Kubernetes NetworkPolicy."""
