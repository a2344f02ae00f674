"""Where CA keys live: in memory, in files on disk, or on a PKCS#11 token.

``open_key_manager`` turns the ``key_manager`` settings into a manager. The
PKCS#11 manager imports python-pkcs11 only when one is created.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from trustmesh.config import KeyManagerConfig
from trustmesh.errors import ConfigError
from trustmesh.pki.keys.base import KeyAlgorithm, KeyManager, SigningKey
from trustmesh.pki.keys.disk import DiskKeyManager
from trustmesh.pki.keys.memory import MemoryKeyManager
from trustmesh.pki.keys.pkcs11 import PKCS11KeyManager

__all__ = [
    "DiskKeyManager",
    "KeyAlgorithm",
    "KeyManager",
    "MemoryKeyManager",
    "PKCS11KeyManager",
    "SigningKey",
    "open_key_manager",
]


def open_key_manager(
    config: KeyManagerConfig, data_dir: Path, environ: Mapping[str, str]
) -> KeyManager:
    """The key manager ``config`` describes; disk keys go to ``<data_dir>/keys``.

    Secrets (the disk passphrase, the PKCS#11 PIN) come from a file or from the
    named variable in ``environ``; a file's trailing newline is dropped.
    """
    if config.kind == "memory":
        return MemoryKeyManager()
    if config.kind == "disk":
        passphrase = _read_secret(
            "passphrase", config.passphrase_file, config.passphrase_env, environ
        )
        return DiskKeyManager(Path(data_dir) / "keys", passphrase)
    if config.kind == "pkcs11":
        if config.pkcs11_module is None:
            raise ConfigError(
                "the pkcs11 key manager needs the path of a PKCS#11 module "
                "(e.g. /usr/lib/softhsm/libsofthsm2.so)",
                field="key_manager.pkcs11_module",
            )
        if not config.pkcs11_token_label:
            raise ConfigError(
                "the pkcs11 key manager needs the label of a token",
                field="key_manager.pkcs11_token_label",
            )
        pin = _read_secret("pkcs11_pin", config.pkcs11_pin_file, config.pkcs11_pin_env, environ)
        if pin is None:
            raise ConfigError(
                "the pkcs11 key manager needs the token's user PIN: "
                "set key_manager.pkcs11_pin_file or pkcs11_pin_env",
                field="key_manager.pkcs11_pin_file",
            )
        try:
            pin_text = pin.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(
                "the PKCS#11 PIN is not valid UTF-8", field="key_manager.pkcs11_pin_file"
            ) from None
        return PKCS11KeyManager(config.pkcs11_module, config.pkcs11_token_label, pin_text)
    raise ConfigError(f"unknown key manager kind {config.kind!r}", field="key_manager.kind")


def _read_secret(
    setting: str, path: Path | None, env_name: str | None, environ: Mapping[str, str]
) -> bytes | None:
    """Read ``<setting>_file`` or ``<setting>_env``; None when neither is set."""
    file_field, env_field = f"key_manager.{setting}_file", f"key_manager.{setting}_env"
    if path is not None and env_name:
        raise ConfigError(f"set only one of {file_field} and {env_field}", field=file_field)
    if path is not None:
        try:
            secret = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}", field=file_field) from None
        secret = secret.rstrip(b"\r\n")
        if not secret:
            raise ConfigError(f"{path} is empty", field=file_field)
        return secret
    if env_name:
        value = environ.get(env_name)
        if value is None:
            raise ConfigError(f"environment variable {env_name} is not set", field=env_field)
        if not value:
            raise ConfigError(f"environment variable {env_name} is empty", field=env_field)
        return value.encode("utf-8")
    return None
