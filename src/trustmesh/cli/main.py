"""Entry point of the ``trustmesh`` command."""

from __future__ import annotations

import importlib
import sys

import click

from trustmesh import __version__
from trustmesh.errors import TrustmeshError


class _LazyGroup(click.Group):
    """Imports a command group's module only when that group is used (fast startup)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(attr for _, attr in _GROUPS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        for module, attr in _GROUPS:
            if attr == cmd_name:
                command = getattr(importlib.import_module(module), attr)
                assert isinstance(command, click.Command)
                return command
        return None


# (module, attribute) of every command group; each module owns one noun.
_GROUPS: tuple[tuple[str, str], ...] = (
    ("trustmesh.cli.server", "server"),
    ("trustmesh.cli.ca", "ca"),
    ("trustmesh.cli.entry", "entry"),
    ("trustmesh.cli.token", "token"),
    ("trustmesh.cli.bundle", "bundle"),
    ("trustmesh.cli.agent", "agent"),
    ("trustmesh.cli.netpol", "netpol"),
    ("trustmesh.cli.rbac", "rbac"),
    ("trustmesh.cli.netpol_lab", "netlab"),
    ("trustmesh.cli.sidecar", "sidecar"),
    ("trustmesh.cli.gateway", "gateway"),
    ("trustmesh.cli.mesh", "apply"),
    ("trustmesh.cli.mesh", "delete"),
    ("trustmesh.cli.mesh", "get"),
    ("trustmesh.cli.policy", "policy"),
    ("trustmesh.cli.demo", "demo"),
)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="trustmesh")
def cli() -> None:
    """trustmesh: workload identity, private CA, mTLS mesh and policy.

    Every command takes --help and --output json. Main options can also be set
    from the environment (TRUSTMESH_HOME, TRUSTMESH_DATA_DIR, TRUSTMESH_ADMIN_SOCKET,
    ...; each option's help names its variable).
    """


def main() -> None:
    try:
        cli(standalone_mode=True)
    except TrustmeshError as err:  # commands normally handle their own; this is the net
        click.echo(f"Error: {err}", err=True)
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()
