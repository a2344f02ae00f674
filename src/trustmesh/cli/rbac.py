"""``trustmesh rbac``: Kubernetes-style RBAC evaluation (can-i, who-can, lint)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from trustmesh.cli._client import AdminClient, socket_option
from trustmesh.cli._output import emit_json, fail, output_option
from trustmesh.errors import InvalidInput, TrustmeshError
from trustmesh.policy.rbac import (
    DEFAULT_POLICY_YAML,
    Authorizer,
    RbacObjects,
    Request,
    load_rbac,
)
from trustmesh.policy.rbac_lint import lint

_FILES = click.option(
    "--filename",
    "-f",
    "files",
    multiple=True,
    required=True,
    metavar="FILE",
    help="YAML with Roles, ClusterRoles and bindings (repeatable; a directory reads its "
    "*.yaml, *.yml and *.json; '-' reads stdin).",
)
_NAMESPACE = click.option(
    "--namespace", "-n", default="default", show_default=True,
    help="Namespace of the request (ignored for non-resource URLs).",
)
_ALL_NAMESPACES = click.option(
    "--all-namespaces", "-A", is_flag=True,
    help="Ask cluster-wide (namespace ''): only ClusterRoleBindings count.",
)
_SUBRESOURCE = click.option("--subresource", default="", help="Subresource, e.g. log.")
_API_GROUP = click.option(
    "--api-group", default=None, help="API group ('' is the core group); also RESOURCE.GROUP.",
)


def _read_sources(files: tuple[str, ...]) -> list[tuple[str, str]]:
    names: list[str] = []
    for name in files:
        if name != "-" and os.path.isdir(name):
            found = sorted(e.path for e in os.scandir(name)
                           if e.is_file() and e.name.endswith((".yaml", ".yml", ".json")))
            if not found:
                raise InvalidInput("no *.yaml, *.yml or *.json files in directory", field=name)
            names += found
        else:
            names.append(name)
    sources: list[tuple[str, str]] = []
    for name in names:
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
    return sources


def _load(files: tuple[str, ...]) -> RbacObjects:
    return load_rbac(_read_sources(files))


def _request_target(resource: str, subresource: str,
                    api_group: str | None) -> tuple[str, str, str, str | None]:
    """Split RESOURCE (``pods``, ``pods/log``, ``deployments.apps``, ``/healthz``).

    Returns (resource, subresource, api group, non-resource path).
    """
    if resource.startswith("/"):
        if subresource or api_group:
            raise InvalidInput("a non-resource URL takes no --subresource or --api-group",
                               field="RESOURCE")
        return "", "", "", resource
    res, sep, sub = resource.partition("/")
    if sep:
        if not sub or "/" in sub:
            raise InvalidInput(f"expected RESOURCE or RESOURCE/SUBRESOURCE, got {resource!r}",
                               field="RESOURCE")
        if subresource and subresource != sub:
            raise InvalidInput(f"subresource given twice ({sub!r} and --subresource "
                               f"{subresource!r})", field="subresource")
        subresource = sub
    res, dot, group = res.partition(".")
    if dot:
        if api_group is not None and api_group != group:
            raise InvalidInput(f"API group given twice ({group!r} and --api-group "
                               f"{api_group!r})", field="api-group")
        api_group = group
    if not res:
        raise InvalidInput(f"no resource in {resource!r}", field="RESOURCE")
    return res, subresource, api_group or "", None


@click.group()
def rbac() -> None:
    """Evaluate Kubernetes RBAC: can-i, who-can, lint.

    Reads Role, ClusterRole, RoleBinding and ClusterRoleBinding manifests
    (rbac.authorization.k8s.io/v1) and answers as the Kubernetes API server would.
    """


@rbac.command("can-i")
@click.argument("verb")
@click.argument("resource")
@click.argument("name", required=False, default="")
@_FILES
@_NAMESPACE
@_ALL_NAMESPACES
@click.option("--as", "user", required=True, metavar="USER",
              help="User to ask for (system:serviceaccount:NS:NAME for a service account).")
@click.option("--as-group", "groups", multiple=True, metavar="GROUP",
              help="A group of the user (repeatable); system:authenticated is implied.")
@_SUBRESOURCE
@_API_GROUP
@click.option("--quiet", "-q", is_flag=True, help="Print nothing; the exit code answers.")
@output_option()
def can_i(verb: str, resource: str, name: str, files: tuple[str, ...], namespace: str,
          all_namespaces: bool, user: str, groups: tuple[str, ...], subresource: str,
          api_group: str | None, quiet: bool, output: str) -> None:
    """Say whether USER may VERB RESOURCE [NAME]: 'yes' (exit 0) or 'no' (exit 1).

    RESOURCE is pods, pods/log (a subresource), deployments.apps (with its API
    group) or a non-resource URL such as /healthz.
    """
    try:
        res, sub, group, path = _request_target(resource, subresource, api_group)
        if path is not None and name:
            raise InvalidInput("a non-resource URL takes no NAME", field="NAME")
        ns = "" if (all_namespaces or path is not None) else namespace
        request = Request(user, verb, res, sub, group, name, ns, path, tuple(groups))
        decision = Authorizer(_load(files)).authorize(request)
    except TrustmeshError as err:
        fail(err, output)
        return
    if not quiet:
        if output == "json":
            emit_json(decision.to_dict())
        else:
            click.echo(decision.render_text())
    sys.exit(0 if decision.allowed else 1)


@rbac.command("who-can")
@click.argument("verb")
@click.argument("resource")
@click.argument("name", required=False, default="")
@_FILES
@_NAMESPACE
@_ALL_NAMESPACES
@_SUBRESOURCE
@_API_GROUP
@output_option()
def who_can(verb: str, resource: str, name: str, files: tuple[str, ...], namespace: str,
            all_namespaces: bool, subresource: str, api_group: str | None,
            output: str) -> None:
    """List the subjects that may VERB RESOURCE [NAME], with the bindings that grant it."""
    try:
        res, sub, group, path = _request_target(resource, subresource, api_group)
        if path is not None and name:
            raise InvalidInput("a non-resource URL takes no NAME", field="NAME")
        ns = "" if (all_namespaces or path is not None) else namespace
        answer = Authorizer(_load(files)).who_can(
            verb, res, subresource=sub, api_group=group, name=name, namespace=ns, path=path)
    except TrustmeshError as err:
        fail(err, output)
        return
    if output == "json":
        emit_json(answer.to_dict())
    else:
        click.echo(answer.render_text())


@rbac.command("lint")
@_FILES
@output_option()
def lint_cmd(files: tuple[str, ...], output: str) -> None:
    """Report bindings to missing roles and rules that do not do what they seem to.

    Exit 1 when there are warnings; notes (info) alone exit 0.
    """
    try:
        findings = lint(_load(files))
    except TrustmeshError as err:
        fail(err, output)
        return
    warnings = sum(1 for f in findings if f.severity == "warning")
    if output == "json":
        emit_json({"findings": [f.to_dict() for f in findings], "warnings": warnings,
                   "infos": len(findings) - warnings})
    else:
        for f in findings:
            click.echo(f"{f.severity.upper():7} {f.code} {f.object}: {f.message}")
        click.echo(f"{warnings} warning(s), {len(findings) - warnings} note(s)")
    if warnings:
        sys.exit(1)


@rbac.command("defaults")
def defaults() -> None:
    """Print the roles and binding a new trustmesh server starts with (YAML)."""
    click.echo(DEFAULT_POLICY_YAML, nl=False)


@rbac.group("policy")
def policy() -> None:
    """The RBAC policy the server enforces on its remote admin API."""


@policy.command("show")
@socket_option
def policy_show(socket_path: Path | None) -> None:
    """Print the server's RBAC policy (YAML)."""
    try:
        result = AdminClient(socket_path).request("GET", "/v1/rbac")
    except TrustmeshError as err:
        fail(err)
        return
    click.echo(result["policy"], nl=False)


@policy.command("apply")
@click.option("-f", "--file", "file_path", required=True, metavar="FILE",
              help="RBAC YAML (Roles, ClusterRoles, bindings); '-' for stdin.")
@socket_option
@output_option()
def policy_apply(file_path: str, socket_path: Path | None, output: str) -> None:
    """Replace the server's RBAC policy; nothing changes if the file is invalid.

    \b
    Example (let the group "auditors" read everything):
      trustmesh rbac policy show > policy.yaml   # edit, then:
      trustmesh rbac policy apply -f policy.yaml
    """
    try:
        text = (sys.stdin.read() if file_path == "-" else Path(file_path).read_text())
    except OSError as exc:
        fail(InvalidInput(f"cannot read {file_path}: {exc.strerror}"), output)
        return
    try:
        result = AdminClient(socket_path).request("PUT", "/v1/rbac", json={"policy": text})
    except TrustmeshError as err:
        fail(err, output)
        return
    if output == "json":
        emit_json(result)
    else:
        click.echo("RBAC policy applied")
        for b in result["bindings_to_missing_roles"]:
            click.echo(f"warning: {b} refers to a role that does not exist", err=True)
