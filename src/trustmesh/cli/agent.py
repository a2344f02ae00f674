"""``trustmesh agent``: the node agent and the server's view of agents."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import click

from trustmesh.cli._client import AdminClient, socket_option
from trustmesh.cli._output import emit_json, fail, output_option
from trustmesh.errors import TrustmeshError


@click.group()
def agent() -> None:
    """Run the node agent; list and evict attested agents."""


@agent.command("run")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
              help="TOML or YAML file with the same keys as these flags.")
@click.option("--server-address", envvar="TRUSTMESH_SERVER_ADDRESS",
              help="HOST:PORT of the server's agent API (mutual TLS)  [default: 127.0.0.1:8081]")
@click.option("--attest-address", help="HOST:PORT where the node attests  "
              "[default: server host, port + 1]")
@click.option("--trust-bundle", type=click.Path(dir_okay=False, path_type=Path),
              envvar="TRUSTMESH_TRUST_BUNDLE",
              help="PEM roots of the trust domain (trustmesh bundle show).")
@click.option("--join-token", envvar="TRUSTMESH_JOIN_TOKEN",
              help="One-time token from `trustmesh token create` (first start only).")
@click.option("--x509pop-cert", type=click.Path(dir_okay=False, path_type=Path),
              help="Node certificate (PEM, chain after it) for x509pop attestation.")
@click.option("--x509pop-key", type=click.Path(dir_okay=False, path_type=Path),
              help="Key of --x509pop-cert.")
@click.option("--socket", type=click.Path(dir_okay=False, path_type=Path),
              envvar="TRUSTMESH_AGENT_SOCKET",
              help="Workload API socket  [default: /tmp/trustmesh-agent/public/api.sock]")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Agent state  [default: $TRUSTMESH_HOME/agent]")
@click.option("--sync-interval", help="How often to ask the server for changes  [default: 5s]")
@click.option("--health-address", help="HOST:PORT for /healthz and /metrics; empty disables  "
              "[default: 127.0.0.1:8088]")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--log-format", type=click.Choice(["json", "text"]))
def run(config_file: Path | None, **flags: object) -> None:
    """Attest this node, keep workload SVIDs fresh, and serve the Workload API.

    \b
    Example:
      trustmesh agent run --server-address 127.0.0.1:8081 --trust-bundle bundle.pem \\
          --join-token $(trustmesh token create -o json | jq -r .token)
    """
    from trustmesh.agent.app import run_agent
    from trustmesh.config import AgentConfig, load_config_file
    from trustmesh.log import configure_logging

    try:
        file_values = load_config_file(config_file) if config_file else {}
        config = AgentConfig.build(file_values, dict(flags))
        configure_logging(config.log_level, config.log_format)
        run_agent(config)
    except TrustmeshError as err:
        fail(err)


@agent.command("list")
@socket_option
@output_option()
def list_(socket_path: Path | None, output: str) -> None:
    """Agents that have attested to this server."""
    try:
        agents = AdminClient(socket_path).request("GET", "/v1/agents")["agents"]
    except TrustmeshError as err:
        fail(err, output)
        return
    if output == "json":
        emit_json(agents)
        return
    click.echo(f"Found {len(agents)} attested agent{'' if len(agents) == 1 else 's'}")
    for a in agents:
        exp = datetime.fromtimestamp(a["expires_at"], UTC).isoformat() if a["expires_at"] else "-"
        state = "evicted" if a["banned"] else "attested"
        click.echo(f"{a['spiffe_id']}  {a['attestation']}  {state}  node SVID until {exp}")


@agent.command("evict")
@click.argument("spiffe_id")
@socket_option
@output_option()
def evict(spiffe_id: str, socket_path: Path | None, output: str) -> None:
    """Ban an agent: it can no longer renew its SVID or fetch entries."""
    try:
        result = AdminClient(socket_path).request("POST", "/v1/agents/evict",
                                                  json={"spiffe_id": spiffe_id})
    except TrustmeshError as err:
        fail(err, output)
        return
    if output == "json":
        emit_json(result)
    else:
        click.echo(f"evicted {spiffe_id}")
