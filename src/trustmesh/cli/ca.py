"""``trustmesh ca``."""

from __future__ import annotations

import click


@click.group()
def ca() -> None:
    """ca commands."""
