"""``trustmesh apply | delete | get``: mesh policy and the service registry as YAML.

The same multi-document YAML users keep for Istio (``security.istio.io/v1``
AuthorizationPolicy and PeerAuthentication) plus trustmesh's registry kinds
(``mesh.trustmesh.io/v1alpha1`` Workload and Service).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
import yaml

from trustmesh.cli._client import AdminClient, socket_option
from trustmesh.cli._output import emit_json, fail, output_option
from trustmesh.errors import InvalidInput, TrustmeshError

_FILES = click.option("-f", "--filename", "files", multiple=True, required=True,
                      help="YAML file with one or more resources; '-' reads stdin. Repeatable.")


def _read(files: tuple[str, ...]) -> tuple[str, str]:
    texts, names = [], []
    for f in files:
        if f == "-":
            texts.append(sys.stdin.read())
            names.append("<stdin>")
            continue
        try:
            texts.append(Path(f).read_text())
        except OSError as exc:
            raise InvalidInput(f"cannot read {f}: {exc.strerror}", field="filename") from None
        names.append(f)
    return "\n---\n".join(texts), ", ".join(names)


def _print_results(report: dict[str, Any], suffix: str = "") -> None:
    for w in report.get("warnings", []):
        click.echo(f"Warning: {w}", err=True)
    for r in report["results"]:
        click.echo(f"{r['kind'].lower()}/{r['name']} ({r['namespace']}) {r['outcome']}{suffix}")


@click.command("apply")
@_FILES
@click.option("--dry-run", is_flag=True, help="Validate and show what would change; store "
              "nothing.")
@socket_option
@output_option()
def apply(files: tuple[str, ...], dry_run: bool, socket_path: Path | None, output: str) -> None:
    """Create or update mesh resources; every document is checked before any is stored.

    \b
    Example:
      trustmesh apply -f default-deny.yaml
    """
    try:
        text, source = _read(files)
        report = AdminClient(socket_path).request(
            "POST", "/v1/mesh/apply", json={"yaml": text, "source": source, "dry_run": dry_run})
    except TrustmeshError as err:
        fail(err, output)
        return
    if output == "json":
        emit_json(report)
    else:
        _print_results(report, " (dry run)" if dry_run else "")


@click.command("delete")
@_FILES
@click.option("--ignore-not-found", is_flag=True, help="Missing resources are not an error.")
@socket_option
@output_option()
def delete(files: tuple[str, ...], ignore_not_found: bool, socket_path: Path | None,
           output: str) -> None:
    """Delete the mesh resources named in the files (all or nothing)."""
    try:
        text, source = _read(files)
        report = AdminClient(socket_path).request(
            "POST", "/v1/mesh/delete",
            json={"yaml": text, "source": source, "ignore_not_found": ignore_not_found})
    except TrustmeshError as err:
        fail(err, output)
        return
    if output == "json":
        emit_json(report)
    else:
        _print_results(report)


@click.command("get")
@click.argument("kind", required=False)
@click.option("-n", "--namespace", help="Only this namespace  [default: all]")
@socket_option
@output_option("text", "json", "yaml")
def get(kind: str | None, namespace: str | None, socket_path: Path | None, output: str) -> None:
    """List mesh resources: authorizationpolicies, peerauthentications, workloads, services
    (singular, plural and Kubernetes short names work)."""
    params = {k: v for k, v in (("kind", kind), ("namespace", namespace)) if v}
    try:
        report = AdminClient(socket_path).request("GET", "/v1/mesh/resources", params=params)
    except TrustmeshError as err:
        fail(err, output)
        return
    resources = report["resources"]
    if output == "json":
        emit_json(report)
        return
    if output == "yaml":
        click.echo(yaml.safe_dump_all(resources, sort_keys=False), nl=False)
        return
    if not resources:
        click.echo("No resources found.")
        return
    rows = [("KIND", "NAMESPACE", "NAME", "DETAIL")]
    for r in resources:
        meta = r.get("metadata", {})
        rows.append((r.get("kind", ""), meta.get("namespace", ""), meta.get("name", ""),
                     _detail(r)))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row[:3], widths, strict=True))
                   + "  " + row[3])


def _detail(r: dict[str, Any]) -> str:
    spec = r.get("spec") or {}
    kind = r.get("kind")
    if kind == "AuthorizationPolicy":
        rules = spec.get("rules")
        dry = (r.get("metadata", {}).get("annotations") or {}).get("istio.io/dry-run")
        return (f"action={spec.get('action', 'ALLOW')} rules="
                f"{len(rules) if rules is not None else 0}" + (" dry-run" if dry == "true"
                                                              else ""))
    if kind == "PeerAuthentication":
        return f"mode={(spec.get('mtls') or {}).get('mode', 'UNSET')}"
    if kind == "Workload":
        return f"serviceAccount={spec.get('serviceAccount', 'default')}"
    if kind == "Service":
        return "ports=" + ",".join(str(p.get("port")) for p in spec.get("ports", []))
    return ""
