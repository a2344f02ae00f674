"""``trustmesh bundle``: this trust domain's bundle, and the bundles of the trust domains
it federates with."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import click

from trustmesh.cli._client import AdminClient, socket_option
from trustmesh.cli._output import emit_json, fail, output_option
from trustmesh.errors import InvalidInput, TrustmeshError


@click.group()
def bundle() -> None:
    """Trust bundles: show this trust domain's (what `trustmesh agent run --trust-bundle`
    is started with) and manage the federated ones (other trust domains whose SVIDs the
    entries that federate with them accept)."""


def _td_path(trust_domain: str) -> str:
    return "/v1/federation/bundles/" + quote(trust_domain.removeprefix("spiffe://"), safe="")


@bundle.command("show")
@click.option("--format", "fmt", type=click.Choice(["pem", "spiffe"]), default="pem",
              show_default=True,
              help="pem: the X.509 trust anchors; spiffe: the SPIFFE bundle (JWKS) with "
                   "X.509 and JWT authorities and spiffe_sequence.")
@click.option("--trust-domain", "trust_domain", metavar="TD",
              help="Show the federated bundle of this trust domain instead of this one's.")
@socket_option
def show(fmt: str, trust_domain: str | None, socket_path: Path | None) -> None:
    """Print this trust domain's bundle, or a federated one.

    \b
    Example:
      trustmesh bundle show > bundle.pem
      trustmesh bundle show --format spiffe | jq .spiffe_sequence
      trustmesh bundle show --trust-domain partner.example --format spiffe
    """
    try:
        client = AdminClient(socket_path)
        if trust_domain:
            found = client.request("GET", _td_path(trust_domain))
            doc: dict[str, Any] = found["bundle"]
            if fmt == "spiffe":
                click.echo(json.dumps(doc, indent=2))
            else:
                from trustmesh.spiffe.bundle import Bundle

                click.echo(Bundle.parse_jwks(doc, found["trust_domain"]).to_pem().decode(),
                           nl=False)
            return
        result = client.request("GET", "/v1/bundle")
    except TrustmeshError as err:
        fail(err)
        return
    if fmt == "pem":
        click.echo(result["pem"], nl=False)
    else:
        click.echo(json.dumps(result["bundle"], indent=2))


@bundle.command("set")
@click.option("--trust-domain", "trust_domain", required=True, metavar="TD",
              help="The trust domain the bundle belongs to (partner.example or "
                   "spiffe://partner.example).")
@click.option("-f", "--file", "path", required=True, metavar="FILE",
              help="The bundle to trust; - reads standard input.")
@click.option("--format", "fmt", type=click.Choice(["spiffe", "pem"]), default="spiffe",
              show_default=True,
              help="spiffe: a SPIFFE bundle (JWKS, as `trustmesh bundle show --format "
                   "spiffe` prints); pem: X.509 CA certificates only.")
@socket_option
@output_option()
def set_(trust_domain: str, path: str, fmt: str, socket_path: Path | None,
         output: str) -> None:
    """Federate with another trust domain: store (or replace) its bundle.

    Registration entries that name the trust domain in --federates-with then get this
    bundle from their agent (Workload API and Envoy SDS), so their workloads accept that
    trust domain's SVIDs. Replacing a bundle reaches agents on their next sync.

    \b
    Example (trust domain a.example federates with b.example):
      # on b.example's server
      trustmesh bundle show --format spiffe > b.example.json
      # on a.example's server
      trustmesh bundle set --trust-domain b.example -f b.example.json
      trustmesh entry update --id ENTRY --federates-with b.example
    """
    try:
        try:
            data = sys.stdin.read() if path == "-" else Path(path).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"cannot read {path}: {exc}", field="file") from None
        result = AdminClient(socket_path).request(
            "PUT", _td_path(trust_domain), json={"bundle": data, "format": fmt})
    except TrustmeshError as err:
        fail(err, output)
        return
    if output == "json":
        emit_json(result)
        return
    what = "set" if result["changed"] else "unchanged"
    click.echo(f"bundle for {result['trust_domain']} {what}: "
               f"{len(result['x509_authorities'])} X.509 authorities, "
               f"{len(result['jwt_authorities'])} JWT authorities")


@bundle.command("list")
@socket_option
@output_option()
def list_(socket_path: Path | None, output: str) -> None:
    """List the federated bundles."""
    try:
        bundles = AdminClient(socket_path).request("GET", "/v1/federation/bundles")["bundles"]
    except TrustmeshError as err:
        fail(err, output)
        return
    if output == "json":
        emit_json(bundles)
        return
    if not bundles:
        click.echo("no federated bundles")
        return
    for b in bundles:
        click.echo(f"{b['trust_domain']}  {len(b['x509_authorities'])} X.509, "
                   f"{len(b['jwt_authorities'])} JWT  revision {b['revision']}  "
                   f"set by {b['updated_by']}")


@bundle.command("delete")
@click.option("--trust-domain", "trust_domain", required=True, metavar="TD",
              help="The federated trust domain to forget.")
@socket_option
@output_option()
def delete(trust_domain: str, socket_path: Path | None, output: str) -> None:
    """Stop federating with a trust domain: its bundle leaves the agents on their next
    sync, and its SVIDs are refused from then on."""
    try:
        result = AdminClient(socket_path).request("DELETE", _td_path(trust_domain))
    except TrustmeshError as err:
        fail(err, output)
        return
    if output == "json":
        emit_json(result)
        return
    click.echo(f"deleted the federated bundle of {trust_domain.removeprefix('spiffe://')}")
