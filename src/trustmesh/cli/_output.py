"""Shared output plumbing for CLI commands: ``--output text|json`` and error reporting."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from trustmesh.errors import TrustmeshError

F = TypeVar("F", bound=Callable[..., Any])

OUTPUT_CHOICES = click.Choice(["text", "json"], case_sensitive=False)


def output_option(*choices: str) -> Callable[[F], F]:
    """The ``--output/-o`` option every command carries."""
    allowed = list(choices) if choices else ["text", "json"]
    return click.option(
        "--output",
        "-o",
        type=click.Choice(allowed, case_sensitive=False),
        default="text",
        show_default=True,
        help="Output format; json is stable for scripts.",
    )


def emit_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True, default=str))


def fail(err: TrustmeshError, output: str = "text") -> None:
    """Print an error the way the user asked for and exit with its code."""
    if output == "json":
        click.echo(json.dumps({"error": err.to_dict()}, indent=2), err=True)
    else:
        click.echo(f"Error: {err}", err=True)
    sys.exit(err.exit_code)
