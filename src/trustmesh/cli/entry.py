"""``trustmesh entry``: registration entries (who gets which SPIFFE ID, where)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
import yaml

from trustmesh.cli._client import AdminClient, socket_option
from trustmesh.cli._output import emit_json, fail, output_option
from trustmesh.errors import InvalidInput, TrustmeshError


@click.group()
def entry() -> None:
    """Create, show, update, delete and list registration entries."""


def _print_entry(e: dict[str, Any]) -> None:
    click.echo(f"Entry ID      : {e['id']}")
    click.echo(f"SPIFFE ID     : {e['spiffe_id']}")
    click.echo(f"Parent ID     : {e['parent_id']}")
    click.echo(f"Revision      : {e['revision']}")
    click.echo(f"X509-SVID TTL : {e['x509_svid_ttl']}")
    click.echo(f"JWT-SVID TTL  : {e['jwt_svid_ttl']}")
    for s in e["selectors"]:
        click.echo(f"Selector      : {s}")
    for d in e["dns_names"]:
        click.echo(f"DNS name      : {d}")
    for td in e["federates_with"]:
        click.echo(f"FederatesWith : {td}")
    if e["admin"]:
        click.echo("Admin         : true")
    if e["downstream"]:
        click.echo("Downstream    : true")
    if e["hint"]:
        click.echo(f"Hint          : {e['hint']}")
    for k, v in sorted(e["labels"].items()):
        click.echo(f"Label         : {k}={v}")
    click.echo("")


def _load_entries_file(path: str) -> list[dict[str, Any]]:
    """Entries from YAML: a list, {entries: [...]}, or several documents."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror}", field="file") from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise InvalidInput(f"{path} is not valid YAML: {exc}", field="file") from None
    out: list[dict[str, Any]] = []
    for i, doc in enumerate(docs):
        if isinstance(doc, dict) and set(doc) == {"entries"}:
            doc = doc["entries"]
        items = doc if isinstance(doc, list) else [doc]
        for item in items:
            if not isinstance(item, dict):
                raise InvalidInput(f"{path}: document {i + 1}: each entry must be a mapping",
                                   field="file")
            out.append({k.replace("-", "_"): v for k, v in item.items()})
    if not out:
        raise InvalidInput(f"{path} holds no entries", field="file")
    return out


def _labels(values: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for v in values:
        key, sep, value = v.partition("=")
        if not sep or not key:
            raise InvalidInput(f"label {v!r} must be KEY=VALUE", field="labels")
        out[key] = value
    return out


def _entry_options(fn: Any) -> Any:
    for option in reversed([
        click.option("--spiffe-id", help="SPIFFE ID the workload gets."),
        click.option("--parent-id", help="SPIFFE ID of the agent (node) or parent entry."),
        click.option("--selector", "selectors", multiple=True,
                     help="type:value the workload must show, e.g. unix:uid:1000 "
                          "(repeatable; all must match)."),
        click.option("--x509-svid-ttl", help="X509-SVID lifetime  [default: 1h]"),
        click.option("--jwt-svid-ttl", help="JWT-SVID lifetime  [default: 5m]"),
        click.option("--dns-name", "dns_names", multiple=True, help="DNS SAN (repeatable)."),
        click.option("--federates-with", multiple=True,
                     help="Trust domain whose bundle the workload also gets (repeatable)."),
        click.option("--admin", is_flag=True, default=None, help="Workload may use admin APIs."),
        click.option("--downstream", is_flag=True, default=None,
                     help="Workload is a downstream CA."),
        click.option("--hint", help="Hint for workloads with several identities."),
        click.option("--label", "labels", multiple=True, help="KEY=VALUE (repeatable)."),
    ]):
        fn = option(fn)
    return fn


def _body_from_flags(flags: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for key in ("spiffe_id", "parent_id", "x509_svid_ttl", "jwt_svid_ttl", "hint", "admin",
                "downstream"):
        if flags.get(key) is not None:
            body[key] = flags[key]
    for key in ("selectors", "dns_names", "federates_with"):
        if flags.get(key):
            body[key] = list(flags[key])
    if flags.get("labels"):
        body["labels"] = _labels(flags["labels"])
    return body


@entry.command("create")
@click.option("-f", "--file", "file_path", metavar="FILE",
              help="Create every entry in this YAML file ('-' for stdin), all or none.")
@_entry_options
@socket_option
@output_option()
def create(file_path: str | None, socket_path: Path | None, output: str,
           **flags: Any) -> None:
    """Create a registration entry, or many from a YAML file.

    \b
    Example:
      trustmesh entry create --parent-id spiffe://example.org/node1 \\
          --spiffe-id spiffe://example.org/ns/web/sa/frontend --selector unix:uid:1000
    """
    try:
        if file_path:
            if _body_from_flags(flags):
                raise InvalidInput("give either -f FILE or entry flags, not both")
            bodies = _load_entries_file(file_path)
        else:
            bodies = [_body_from_flags(flags)]
        result = AdminClient(socket_path).request("POST", "/v1/entries",
                                                  json={"entries": bodies})
    except TrustmeshError as err:
        fail(err, output)
        return
    if output == "json":
        emit_json(result["entries"])
        return
    for e in result["entries"]:
        _print_entry(e)


@entry.command("show")
@click.argument("entry_id")
@socket_option
@output_option()
def show(entry_id: str, socket_path: Path | None, output: str) -> None:
    """Show one entry."""
    try:
        e = AdminClient(socket_path).request("GET", f"/v1/entries/{entry_id}")
    except TrustmeshError as err:
        fail(err, output)
        return
    if output == "json":
        emit_json(e)
    else:
        _print_entry(e)


@entry.command("list")
@click.option("--spiffe-id", help="Only entries for this SPIFFE ID.")
@click.option("--parent-id", help="Only entries under this parent.")
@socket_option
@output_option()
def list_(spiffe_id: str | None, parent_id: str | None, socket_path: Path | None,
          output: str) -> None:
    """List entries."""
    params = {k: v for k, v in (("spiffe_id", spiffe_id), ("parent_id", parent_id)) if v}
    try:
        entries = AdminClient(socket_path).request("GET", "/v1/entries", params=params)["entries"]
    except TrustmeshError as err:
        fail(err, output)
        return
    if output == "json":
        emit_json(entries)
        return
    click.echo(f"Found {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}")
    click.echo("")
    for e in entries:
        _print_entry(e)


_CLEARABLE = {"federates-with": ("federates_with", []), "dns-names": ("dns_names", []),
              "labels": ("labels", {}), "hint": ("hint", "")}


@entry.command("update")
@click.argument("entry_id")
@_entry_options
@click.option("--clear", "clear", multiple=True, type=click.Choice(sorted(_CLEARABLE)),
              help="Empty this field (repeatable), e.g. --clear federates-with.")
@socket_option
@output_option()
def update(entry_id: str, clear: tuple[str, ...], socket_path: Path | None, output: str,
           **flags: Any) -> None:
    """Change fields of an entry (the fields given replace the stored ones).

    \b
    Example:
      trustmesh entry update ENTRY_ID --federates-with partner.example
      trustmesh entry update ENTRY_ID --clear federates-with
    """
    try:
        body = _body_from_flags(flags)
        for name in clear:
            key, empty = _CLEARABLE[name]
            if key in body:
                raise InvalidInput(f"--clear {name} and a new value for it at once",
                                   field=key)
            body[key] = empty
        if not body:
            raise InvalidInput("nothing to update: give at least one field flag")
        e = AdminClient(socket_path).request("PATCH", f"/v1/entries/{entry_id}", json=body)
    except TrustmeshError as err:
        fail(err, output)
        return
    if output == "json":
        emit_json(e)
    else:
        _print_entry(e)


@entry.command("delete")
@click.argument("entry_id")
@socket_option
@output_option()
def delete(entry_id: str, socket_path: Path | None, output: str) -> None:
    """Delete an entry; agents drop it at their next sync."""
    try:
        result = AdminClient(socket_path).request("DELETE", f"/v1/entries/{entry_id}")
    except TrustmeshError as err:
        fail(err, output)
        return
    if output == "json":
        emit_json(result)
    else:
        click.echo(f"deleted entry {entry_id}")
