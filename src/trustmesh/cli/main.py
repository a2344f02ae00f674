"""Entry point of the ``trustmesh`` command."""

from __future__ import annotations

import importlib
import sys

import click

from trustmesh import __version__
from trustmesh.errors import TrustmeshError

# (module, attribute) of every command group; each module owns one noun.
_GROUPS: tuple[tuple[str, str], ...] = (
    ("trustmesh.cli.server", "server"),
    ("trustmesh.cli.ca", "ca"),
    ("trustmesh.cli.netpol", "netpol"),
    ("trustmesh.cli.rbac", "rbac"),
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="trustmesh")
def cli() -> None:
    """trustmesh: workload identity, private CA, mTLS mesh and policy.

    Every command takes --help and --output json. Main options can also be set
    from the environment (TRUSTMESH_HOME, TRUSTMESH_DATA_DIR, TRUSTMESH_ADMIN_SOCKET,
    ...; each option's help names its variable).
    """


for _module, _attr in _GROUPS:
    cli.add_command(getattr(importlib.import_module(_module), _attr))


def main() -> None:
    try:
        cli(standalone_mode=True)
    except TrustmeshError as err:  # commands normally handle their own; this is the net
        click.echo(f"Error: {err}", err=True)
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()
