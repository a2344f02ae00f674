"""``trustmesh demo``: the mesh scenario on loopback, step by step."""

from __future__ import annotations

import click


@click.command("demo")
@click.option("--keep", is_flag=True, help="Keep the demo's directory and logs afterwards.")
def demo(keep: bool) -> None:
    """Run server, agent, an echo app and two Envoy sidecars on loopback, and walk
    through strict mTLS, XFCC, default deny, ALLOW rules and policy explain.

    Everything runs in a temporary directory and stops at the end (about 20 s).
    """
    from trustmesh.mesh.demo import run_demo

    ok = run_demo(click.echo, keep=keep)
    click.echo("demo finished: every step as expected" if ok else "demo finished with failures")
    raise SystemExit(0 if ok else 1)
