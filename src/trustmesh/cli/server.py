"""``trustmesh server``: run the trust authority, or check its configuration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from trustmesh.cli._output import emit_json, fail, output_option
from trustmesh.config import ServerConfig, load_config_file
from trustmesh.errors import TrustmeshError


def _server_options(fn: Any) -> Any:
    options = [
        click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
                     envvar="TRUSTMESH_CONFIG",
                     help="TOML or YAML file with the same keys as these flags."),
        click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
                     envvar="TRUSTMESH_DATA_DIR",
                     help="State directory  [default: $TRUSTMESH_HOME/server]"),
        click.option("--trust-domain", envvar="TRUSTMESH_TRUST_DOMAIN",
                     help="Trust domain  [default: example.org]"),
        click.option("--http-address", envvar="TRUSTMESH_HTTP_ADDRESS",
                     help="HOST:PORT for /healthz, /metrics, CRL and OCSP  "
                          "[default: 127.0.0.1:8080]"),
        click.option("--bind-address", envvar="TRUSTMESH_BIND_ADDRESS",
                     help="HOST:PORT of the agent API (gRPC, mutual TLS with the node SVID)  "
                          "[default: 127.0.0.1:8081]"),
        click.option("--attest-address", envvar="TRUSTMESH_ATTEST_ADDRESS",
                     help="HOST:PORT where nodes without an SVID attest (TLS, Attest only)  "
                          "[default: 127.0.0.1:8082]"),
        click.option("--admin-address", envvar="TRUSTMESH_ADMIN_ADDRESS",
                     help="HOST:PORT of the remote admin API (HTTPS, client certificate, "
                          "RBAC); empty to disable  [default: 127.0.0.1:8443]"),
        click.option("--agent-svid-ttl", help="Lifetime of node X509-SVIDs  [default: 1h]"),
        click.option("--x509pop-ca", type=click.Path(dir_okay=False, path_type=Path),
                     help="PEM CAs whose node certificates may attest with x509pop."),
        click.option("--public-url", envvar="TRUSTMESH_PUBLIC_URL",
                     help="Base URL written into certificates for CRL and OCSP  "
                          "[default: http://<http-address>]"),
        click.option("--datastore", envvar="TRUSTMESH_DATASTORE",
                     help="sqlite:///PATH or postgresql://USER@HOST/DB  "
                          "[default: SQLite in the data dir]"),
        click.option("--key-manager", type=click.Choice(["memory", "disk", "pkcs11"]),
                     envvar="TRUSTMESH_KEY_MANAGER",
                     help="Where CA keys live  [default: disk]"),
        click.option("--key-passphrase-file", type=click.Path(dir_okay=False, path_type=Path),
                     help="disk: encrypt key files with the passphrase in this file."),
        click.option("--key-passphrase-env",
                     help="disk: encrypt key files with the passphrase in this env variable."),
        click.option("--pkcs11-module", type=click.Path(dir_okay=False, path_type=Path),
                     help="pkcs11: path of the PKCS#11 module (e.g. libsofthsm2.so)."),
        click.option("--pkcs11-token-label", help="pkcs11: label of the token."),
        click.option("--pkcs11-pin-file", type=click.Path(dir_okay=False, path_type=Path),
                     help="pkcs11: file holding the user PIN."),
        click.option("--pkcs11-pin-env", help="pkcs11: env variable holding the user PIN."),
        click.option("--ca-key-algorithm",
                     type=click.Choice(["ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "rsa-4096"]),
                     help="CA key type  [default: ec-p256]"),
        click.option("--ca-mode", type=click.Choice(["general", "short-lived"]),
                     help="short-lived caps leaf validity at 7 days  [default: general]"),
        click.option("--ca-subject", help="Subject of CA certificates  [default: O=trustmesh]"),
        click.option("--root-ttl", help="Root CA lifetime  [default: 3650d]"),
        click.option("--intermediate-ttl", help="Signing CA lifetime  [default: 365d]"),
        click.option("--ca-propagation",
                     help="Time a new CA is in the published bundle before it signs  "
                          "[default: 5m]"),
        click.option("--crl-validity", help="Time between CRL thisUpdate and nextUpdate "
                                            "[default: 24h]"),
        click.option("--backdate", help="notBefore is set this far in the past  [default: 60s]"),
        click.option("--default-validity", help="Leaf validity when a request names none  "
                                                "[default: 24h]"),
        click.option("--permitted-dns-domain", "permitted_dns_domains", multiple=True,
                     help="Name constraint on the signing CA (repeatable); none by default."),
        click.option("--upstream-ca-cert", type=click.Path(dir_okay=False, path_type=Path),
                     help="Have the signing CA signed by this CA (PEM; a chain may follow)."),
        click.option("--upstream-ca-key", type=click.Path(dir_okay=False, path_type=Path),
                     help="Private key of --upstream-ca-cert (PEM)."),
        click.option("--upstream-ca-key-passphrase-file",
                     type=click.Path(dir_okay=False, path_type=Path),
                     help="Passphrase of an encrypted --upstream-ca-key."),
        click.option("--mesh-root-namespace", envvar="TRUSTMESH_MESH_ROOT_NAMESPACE",
                     help="Namespace of mesh-wide policies  [default: istio-system]"),
        click.option("--signing-workers", type=click.IntRange(0, 64),
                     envvar="TRUSTMESH_SIGNING_WORKERS",
                     help="Processes that sign certificates; 0 signs in the server process  "
                          "[default: one per core]"),
        click.option("--ocsp-workers", type=click.IntRange(0, 64),
                     envvar="TRUSTMESH_OCSP_WORKERS",
                     help="OCSP responder processes sharing --http-address; 0 answers OCSP "
                          "in the server process  [default: one per core]"),
        click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
                     envvar="TRUSTMESH_LOG_LEVEL", help="[default: info]"),
        click.option("--log-format", type=click.Choice(["json", "text"]),
                     envvar="TRUSTMESH_LOG_FORMAT", help="[default: json]"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _build_config(config_file: Path | None, flags: dict[str, Any]) -> ServerConfig:
    file_values = load_config_file(config_file) if config_file else {}
    overrides = dict(flags)
    km_keys = {
        "key_manager": "key_manager.kind",
        "key_passphrase_file": "key_manager.passphrase_file",
        "key_passphrase_env": "key_manager.passphrase_env",
        "pkcs11_module": "key_manager.pkcs11_module",
        "pkcs11_token_label": "key_manager.pkcs11_token_label",
        "pkcs11_pin_file": "key_manager.pkcs11_pin_file",
        "pkcs11_pin_env": "key_manager.pkcs11_pin_env",
    }
    for flag, target in km_keys.items():
        overrides[target] = overrides.pop(flag, None)
    if isinstance(file_values.get("key_manager"), str):
        file_values["key_manager"] = {"kind": file_values["key_manager"]}
    return ServerConfig.build(file_values, overrides)


@click.group()
def server() -> None:
    """Run the trust authority (CA, CRL, OCSP, admin API)."""


@server.command("run")
@_server_options
def run(config_file: Path | None, **flags: Any) -> None:
    """Start the trust authority and serve until SIGINT or SIGTERM.

    On first start it creates a root and a signing CA in the data directory
    (or has the signing CA signed by --upstream-ca-cert). Local admin commands
    reach it on <data-dir>/admin.sock (mode 0600).

    \b
    Example:
      trustmesh server run --trust-domain prod.example.com --http-address 127.0.0.1:8080
    """
    from trustmesh.log import configure_logging
    from trustmesh.server.app import run_server

    try:
        config = _build_config(config_file, flags)
        configure_logging(config.log_level, config.log_format)
        run_server(config)
    except TrustmeshError as err:
        fail(err)


@server.command("validate")
@_server_options
@output_option()
def validate(config_file: Path | None, output: str, **flags: Any) -> None:
    """Check a configuration (file, env and flags) without starting anything."""
    try:
        config = _build_config(config_file, flags)
    except TrustmeshError as err:
        fail(err, output)
        return
    if output == "json":
        emit_json({"valid": True, "config": config.model_dump(mode="json")})
    else:
        click.echo("configuration is valid")
        for key, value in config.model_dump(mode="json").items():
            click.echo(f"  {key}: {value}")
