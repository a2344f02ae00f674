"""``trustmesh netpol``: NetworkPolicy evaluation (matrix, explain, lint)."""

from __future__ import annotations

import ipaddress
import sys

import click

from trustmesh.cli._output import emit_json, fail, output_option
from trustmesh.errors import InvalidInput, TrustmeshError
from trustmesh.policy.netpol import (
    Cluster,
    IndexedEvaluator,
    explain,
    load_cluster,
    parse_endpoint,
    parse_protocol,
)
from trustmesh.policy.netpol_lint import lint, parse_required_label

_FILES = click.option(
    "--filename",
    "-f",
    "files",
    multiple=True,
    required=True,
    metavar="FILE",
    help="YAML with Namespaces, Pods and NetworkPolicies (repeatable; '-' reads stdin).",
)
_PROTOCOL = click.option(
    "--protocol",
    default="TCP",
    show_default=True,
    help="TCP, UDP or SCTP (any case).",
)


def read_cluster(files: tuple[str, ...]) -> Cluster:
    sources: list[tuple[str, str]] = []
    for name in files:
        if name == "-":
            sources.append(("<stdin>", sys.stdin.read()))
            continue
        try:
            with open(name, encoding="utf-8") as fh:
                sources.append((name, fh.read()))
        except OSError as err:
            raise InvalidInput(f"cannot read: {err.strerror}", field=name) from None
        except UnicodeDecodeError:
            raise InvalidInput("not UTF-8 text", field=name) from None
    return load_cluster(sources)


def _check_port(port: int) -> int:
    if not 1 <= port <= 65535:
        raise InvalidInput(f"{port} is out of range 1-65535", field="port")
    return port


@click.group()
def netpol() -> None:
    """Evaluate, explain and lint Kubernetes NetworkPolicy."""


@netpol.command()
@_FILES
@click.option("--port", type=int, default=80, show_default=True, help="Destination port.")
@_PROTOCOL
@output_option()
def matrix(files: tuple[str, ...], port: int, protocol: str, output: str) -> None:
    """Print who may open a connection to whom ('.' allowed, 'X' denied; rows are sources)."""
    try:
        proto = parse_protocol(protocol.upper())
        cluster = read_cluster(files)
        table = IndexedEvaluator(cluster).matrix(_check_port(port), proto)
    except TrustmeshError as err:
        fail(err, output)
        return
    if output == "json":
        emit_json(table.to_dict())
    else:
        click.echo(table.render_text())


@netpol.command("explain")
@_FILES
@click.option("--from", "src", metavar="NS/POD", help="Source pod.")
@click.option("--to", "dst", metavar="NS/POD", help="Destination pod.")
@click.option("--from-ip", "src_ip", metavar="IP", help="Source outside the cluster.")
@click.option("--to-ip", "dst_ip", metavar="IP", help="Destination outside the cluster.")
@click.option("--port", type=int, required=True, help="Destination port.")
@_PROTOCOL
@output_option()
def explain_cmd(
    files: tuple[str, ...],
    src: str | None,
    dst: str | None,
    src_ip: str | None,
    dst_ip: str | None,
    port: int,
    protocol: str,
    output: str,
) -> None:
    """Say whether SRC may open PORT on DST, and which policy and rule decided."""
    try:
        if (src is None) == (src_ip is None):
            raise InvalidInput("give exactly one of --from and --from-ip", field="from")
        if (dst is None) == (dst_ip is None):
            raise InvalidInput("give exactly one of --to and --to-ip", field="to")
        for flag, value in (("from-ip", src_ip), ("to-ip", dst_ip)):
            if value is not None:
                try:
                    ipaddress.ip_address(value)
                except ValueError:
                    raise InvalidInput(f"invalid IP address {value!r}", field=flag) from None
        cluster = read_cluster(files)
        source = parse_endpoint(cluster, src or src_ip or "")
        dest = parse_endpoint(cluster, dst or dst_ip or "")
        proto = parse_protocol(protocol.upper())
        verdict = explain(cluster, source, dest, _check_port(port), proto)
    except TrustmeshError as err:
        fail(err, output)
        return
    if output == "json":
        emit_json(verdict.to_dict())
    else:
        click.echo(verdict.render_text())


@netpol.command("lint")
@_FILES
@click.option(
    "--require-policy-for",
    "required",
    multiple=True,
    metavar="KEY=VALUE",
    help="Pods with this label must be selected by a NetworkPolicy (repeatable).",
)
@output_option()
def lint_cmd(files: tuple[str, ...], required: tuple[str, ...], output: str) -> None:
    """Report gaps: no default deny, unselected pods, unused policies, DNS blocked."""
    try:
        labels = [parse_required_label(r) for r in required]
        findings = lint(read_cluster(files), labels)
    except TrustmeshError as err:
        fail(err, output)
        return
    errors = sum(1 for f in findings if f.severity == "error")
    if output == "json":
        emit_json({"findings": [f.to_dict() for f in findings], "errors": errors,
                   "warnings": len(findings) - errors})
    else:
        for f in findings:
            click.echo(f"{f.severity.upper():7} {f.code} {f.object}: {f.message}")
        click.echo(f"{errors} error(s), {len(findings) - errors} warning(s)")
    if errors:
        sys.exit(1)
