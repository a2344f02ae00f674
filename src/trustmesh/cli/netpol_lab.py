"""``trustmesh netlab``: run a cluster's pods as network namespaces and enforce its policies."""

from __future__ import annotations

import ipaddress
import sys

import click

from trustmesh.cli._output import emit_json, fail, output_option
from trustmesh.cli.netpol import read_cluster
from trustmesh.enforce.netns import (
    DEFAULT_SUBNET,
    Lab,
    apply_policies,
    check,
    declared_ports,
    lab_down,
    lab_netns,
    lab_up,
    plan_lab,
    require_tools,
)
from trustmesh.enforce.nft import compile_cluster, compile_pod
from trustmesh.errors import InvalidInput, TrustmeshError
from trustmesh.policy.netpol import Cluster, parse_protocol
from trustmesh.policy.netpol_model import Protocol

_FILES = click.option(
    "--filename", "-f", "files", multiple=True, required=True, metavar="FILE",
    help="YAML with Namespaces, Pods and NetworkPolicies (repeatable; '-' reads stdin).",
)
_LAB = click.option("--lab", "lab_name", default="dev", show_default=True,
                    help="Lab name (1-12 lowercase letters or digits); namespaces are "
                         "tmnp-<lab>-*.")
_SUBNET = click.option("--subnet", default=str(DEFAULT_SUBNET), show_default=True,
                       help="Private range every pod IP must lie in.")


def _plan(files: tuple[str, ...], lab_name: str, subnet: str) -> tuple[Cluster, Lab]:
    try:
        net = ipaddress.IPv4Network(subnet)
    except ValueError:
        raise InvalidInput(f"invalid IPv4 subnet {subnet!r}", field="subnet") from None
    cluster = read_cluster(files)
    return cluster, plan_lab(cluster, lab_name, net)


@click.group()
def netlab() -> None:
    """Enforce NetworkPolicy with nftables on pods run as network namespaces (root)."""


@netlab.command("compile")
@_FILES
@click.option("--pod", "pod_key", metavar="NS/POD", help="Only this pod's ruleset.")
def compile_cmd(files: tuple[str, ...], pod_key: str | None) -> None:
    """Print the nftables ruleset each pod's namespace gets (nothing is loaded)."""
    try:
        cluster = read_cluster(files)
        if pod_key is not None:
            click.echo(compile_pod(cluster, cluster.pod(pod_key)).text, nl=False)
            return
        click.echo("\n".join(r.text for r in compile_cluster(cluster)), nl=False)
    except TrustmeshError as err:
        fail(err)


@netlab.command("up")
@_FILES
@_LAB
@_SUBNET
def up_cmd(files: tuple[str, ...], lab_name: str, subnet: str) -> None:
    """Create one namespace per pod on a private bridge and load the policies."""
    try:
        cluster, lab = _plan(files, lab_name, subnet)
        lab_up(lab, cluster)
    except TrustmeshError as err:
        fail(err)
        return
    for lp in lab.pods:
        click.echo(f"{lp.pod.key}\t{lp.ip}\t{lp.netns}")
    click.echo(f"lab {lab.name} is up: {len(lab.pods)} pods on bridge in {lab.host_netns}")


@netlab.command("apply")
@_FILES
@_LAB
@_SUBNET
def apply_cmd(files: tuple[str, ...], lab_name: str, subnet: str) -> None:
    """Replace the policies of a running lab (same pods, new NetworkPolicies)."""
    try:
        require_tools()
        cluster, lab = _plan(files, lab_name, subnet)
        apply_policies(lab, cluster)
    except TrustmeshError as err:
        fail(err)
        return
    click.echo(f"policies loaded into {len(lab.pods)} pod namespaces of lab {lab.name}")


@netlab.command("down")
@_LAB
@click.option("--all", "everything", is_flag=True,
              help="Remove every trustmesh lab (every tmnp-* namespace).")
def down_cmd(lab_name: str, everything: bool) -> None:
    """Delete the lab's namespaces (and the links, rules and processes in them)."""
    try:
        require_tools()
        removed = lab_down(None if everything else lab_name)
    except TrustmeshError as err:
        fail(err)
        return
    click.echo(f"removed {len(removed)} namespaces")


@netlab.command("status")
@_LAB
@output_option()
def status_cmd(lab_name: str, output: str) -> None:
    """List the lab's namespaces."""
    try:
        require_tools()
        names = lab_netns(lab_name)
    except TrustmeshError as err:
        fail(err, output)
        return
    if output == "json":
        emit_json({"lab": lab_name, "up": bool(names), "namespaces": names})
        return
    for name in names:
        click.echo(name)
    click.echo(f"lab {lab_name}: {'up' if names else 'down'}, {len(names)} namespaces")


@netlab.command("check")
@_FILES
@_LAB
@_SUBNET
@click.option("--port", type=int, help="Probe only this port (default: every declared port).")
@click.option("--protocol", help="TCP or UDP (with --port; default TCP).")
@click.option("--timeout", type=float, default=1.0, show_default=True,
              help="Seconds a connection may take before it counts as blocked.")
@click.option("--no-apply", is_flag=True, help="Probe the rules already loaded.")
@output_option()
def check_cmd(files: tuple[str, ...], lab_name: str, subnet: str, port: int | None,
              protocol: str | None, timeout: float, no_apply: bool, output: str) -> None:
    """Load the policies, open real connections between all pods, compare with the matrix.

    Exits 1 when the kernel and the evaluator disagree on any pair.
    """
    try:
        require_tools()
        cluster, lab = _plan(files, lab_name, subnet)
        if not 0.05 <= timeout <= 30:
            raise InvalidInput("timeout must be between 0.05 and 30 seconds", field="timeout")
        if port is not None:
            if not 1 <= port <= 65535:
                raise InvalidInput(f"{port} is out of range 1-65535", field="port")
            ports = [(port, parse_protocol((protocol or "TCP").upper()))]
        elif protocol is not None:
            proto = parse_protocol(protocol.upper())
            ports = [pp for pp in declared_ports(cluster) if pp[1] is proto]
        else:
            ports = [pp for pp in declared_ports(cluster) if pp[1] is not Protocol.SCTP]
        if not no_apply:
            apply_policies(lab, cluster)
        result = check(lab, cluster, ports, timeout)
    except TrustmeshError as err:
        fail(err, output)
        return
    if output == "json":
        emit_json(result.to_dict())
    else:
        for d in result.differences:
            click.echo(f"DIFF {d.describe()}")
        probed = ", ".join(f"{p.value}/{n}" for n, p in ports)
        verdict = "kernel matches the evaluator" if result.ok else (
            f"{len(result.differences)} difference(s)")
        click.echo(f"{result.probes} probes ({probed}) in {result.seconds:.1f}s: {verdict}")
    if not result.ok:
        sys.exit(1)
