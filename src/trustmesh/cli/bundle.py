"""``trustmesh bundle``: the trust domain's bundle, for agents and relying parties."""

from __future__ import annotations

import json
from pathlib import Path

import click

from trustmesh.cli._client import AdminClient, socket_option
from trustmesh.cli._output import fail
from trustmesh.errors import TrustmeshError


@click.group()
def bundle() -> None:
    """Show the trust bundle (what `trustmesh agent run --trust-bundle` is started with)."""


@bundle.command("show")
@click.option("--format", "fmt", type=click.Choice(["pem", "spiffe"]), default="pem",
              show_default=True,
              help="pem: the X.509 trust anchors; spiffe: the SPIFFE bundle (JWKS) with "
                   "X.509 and JWT authorities and spiffe_sequence.")
@socket_option
def show(fmt: str, socket_path: Path | None) -> None:
    """Print this trust domain's bundle.

    \b
    Example:
      trustmesh bundle show > bundle.pem
      trustmesh bundle show --format spiffe | jq .spiffe_sequence
    """
    try:
        result = AdminClient(socket_path).request("GET", "/v1/bundle")
    except TrustmeshError as err:
        fail(err)
        return
    if fmt == "pem":
        click.echo(result["pem"], nl=False)
    else:
        click.echo(json.dumps(result["bundle"], indent=2))
