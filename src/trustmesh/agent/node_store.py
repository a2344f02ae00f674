"""The node's own credentials on disk (key 0600), so a restarted agent needs no new token."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from trustmesh.agent.server_client import NodeCredentials
from trustmesh.errors import ConfigError

__all__ = ["load_bundle", "load_node", "save_bundle", "save_node"]

_KEY = "node.key"
_CHAIN = "node.pem"
_ID = "node.id"
_BUNDLE = "bundle.pem"  # the server's roots as last fetched (they rotate)


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def save_node(data_dir: Path, creds: NodeCredentials) -> None:
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write_private(data_dir / _KEY, creds.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    _write_private(data_dir / _CHAIN, b"".join(
        c.public_bytes(serialization.Encoding.PEM) for c in creds.chain))
    _write_private(data_dir / _ID, creds.spiffe_id.encode())


def load_node(data_dir: Path) -> NodeCredentials | None:
    """The stored credentials, or None when there are none (first start)."""
    paths = [data_dir / n for n in (_KEY, _CHAIN, _ID)]
    if not all(p.exists() for p in paths):
        return None
    try:
        key = serialization.load_pem_private_key(paths[0].read_bytes(), None)
        chain = tuple(x509.load_pem_x509_certificates(paths[1].read_bytes()))
        spiffe_id = paths[2].read_text().strip()
        received_at = paths[1].stat().st_mtime  # written when it was received
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the node credentials in {data_dir}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"the node key in {data_dir} is not an EC key")
    return NodeCredentials(spiffe_id, key, chain, received_at)


def save_bundle(data_dir: Path, bundle_pem: bytes) -> None:
    """Keep the latest trust bundle, so a restart after a CA rotation still trusts the
    server even when the root it was bootstrapped with has been retired."""
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write_private(data_dir / _BUNDLE, bundle_pem)


def load_bundle(data_dir: Path) -> bytes | None:
    try:
        return (data_dir / _BUNDLE).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read the cached trust bundle in {data_dir}: {exc}") from None
