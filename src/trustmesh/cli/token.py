"""``trustmesh token``: one-time join tokens for node attestation."""

from __future__ import annotations

from pathlib import Path

import click

from trustmesh.cli._client import AdminClient, socket_option
from trustmesh.cli._output import emit_json, fail, output_option
from trustmesh.errors import TrustmeshError


@click.group()
def token() -> None:
    """Create one-time join tokens that let an agent attest its node."""


@token.command("create")
@click.option("--ttl", default="10m", show_default=True, help="How long the token is valid.")
@click.option("--spiffe-id", help="Agent SPIFFE ID the token grants  "
              "[default: spiffe://<td>/trustmesh/agent/join_token/<digest>]")
@socket_option
@output_option()
def create(ttl: str, spiffe_id: str | None, socket_path: Path | None, output: str) -> None:
    """Create a join token; it can be used exactly once, before it expires."""
    body = {"ttl": ttl, **({"spiffe_id": spiffe_id} if spiffe_id else {})}
    try:
        result = AdminClient(socket_path).request("POST", "/v1/tokens", json=body)
    except TrustmeshError as err:
        fail(err, output)
        return
    if output == "json":
        emit_json(result)
    else:
        click.echo(f"Token: {result['token']}")
        click.echo(f"Agent SPIFFE ID: {result['spiffe_id']}")
