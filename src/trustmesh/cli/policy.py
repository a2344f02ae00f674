"""``trustmesh policy``: explain what the mesh's AuthorizationPolicies decide."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from trustmesh.cli._client import AdminClient, socket_option
from trustmesh.cli._output import emit_json, fail, output_option
from trustmesh.errors import InvalidInput, TrustmeshError


@click.group()
def policy() -> None:
    """Explain mesh authorization decisions."""


@policy.command("explain")
@click.option("--from", "source", default="", metavar="SPIFFE_ID",
              help="The caller's SPIFFE ID (its sidecar's identity); omit for a caller "
              "without mTLS.")
@click.option("--to", "target", required=True, metavar="NAMESPACE/WORKLOAD",
              help="The Workload that receives the call.")
@click.option("--port", type=int, help="The workload's application port  [default: its first]")
@click.option("--method", default="GET", show_default=True)
@click.option("--path", default="/", show_default=True)
@click.option("--host", default="", help="Host/:authority header  [default: none]")
@click.option("--header", "headers", multiple=True, metavar="NAME=VALUE",
              help="A request header (repeatable).")
@click.option("--source-ip", default="127.0.0.1", show_default=True)
@socket_option
@output_option()
def explain(source: str, target: str, port: int | None, method: str, path: str, host: str,
            headers: tuple[str, ...], source_ip: str, socket_path: Path | None,
            output: str) -> None:
    """Say whether a call is allowed, and which policy and rule decided.

    \b
    Example:
      trustmesh policy explain --from spiffe://example.org/ns/default/sa/client \\
          --to default/echo --method POST --path /api/payment
    """
    try:
        parsed: dict[str, str] = {}
        for h in headers:
            name, sep, value = h.partition("=")
            if not sep or not name:
                raise InvalidInput(f"{h!r} is not NAME=VALUE", field="header")
            parsed[name.lower()] = value
        namespace, sep, name = target.partition("/")
        if not sep:
            namespace, name = "default", target
        query: dict[str, Any] = {"source_principal": source or None, "namespace": namespace,
                                 "workload": name, "port": port, "method": method,
                                 "path": path, "host": host, "headers": parsed,
                                 "source_ip": source_ip}
        result = AdminClient(socket_path).request("POST", "/v1/mesh/explain", json=query)
    except TrustmeshError as err:
        fail(err, output)
        return
    if output == "json":
        emit_json(result)
    else:
        for line in result.get("explanation", []):
            click.echo(line)
    raise SystemExit(0 if result.get("allowed") else 1)
