"""``trustmesh server``."""

from __future__ import annotations

import click


@click.group()
def server() -> None:
    """server commands."""
