"""Typed configuration: one place for defaults, read from a file, env and flags.

Precedence (lowest first): built-in defaults, the config file (TOML or YAML,
same keys as the flags with ``_`` for ``-``), then flags and their
``TRUSTMESH_*`` environment variables. No other module reads ``os.environ``
for settings.
"""

from __future__ import annotations

import enum
import os
import tomllib
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from trustmesh.errors import ConfigError

__all__ = [
    "AgentConfig",
    "CaMode",
    "KeyManagerConfig",
    "ServerConfig",
    "default_home",
    "load_config_file",
    "parse_duration",
]


def default_home(environ: dict[str, str] | None = None) -> Path:
    """``$TRUSTMESH_HOME``, or ``~/.trustmesh``."""
    env = os.environ if environ is None else environ
    home = env.get("TRUSTMESH_HOME")
    return Path(home).expanduser() if home else Path("~/.trustmesh").expanduser()


_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}


def parse_duration(value: str | int | float | timedelta) -> timedelta:
    """Parse ``90s``, ``10m``, ``24h``, ``7d``, ``1h30m`` (or seconds as a number)."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return timedelta(seconds=value)
    text = value.strip().lower()
    if not text:
        raise ValueError("empty duration")
    if text.isdigit():
        return timedelta(seconds=int(text))
    total = 0.0
    number = ""
    i = 0
    while i < len(text):
        ch = text[i]
        if ch.isdigit() or ch == ".":
            number += ch
            i += 1
            continue
        unit = "ms" if text.startswith("ms", i) else ch
        if unit not in _UNITS or not number:
            raise ValueError(f"invalid duration {value!r}: use forms like 30s, 10m, 24h, 7d")
        total += float(number) * _UNITS[unit]
        number = ""
        i += len(unit)
    if number:
        raise ValueError(f"invalid duration {value!r}: missing unit after {number}")
    return timedelta(seconds=total)


class CaMode(enum.StrEnum):
    """``general``: leaf validity up to the template's maximum. ``short-lived``: at most 7 days."""

    GENERAL = "general"
    SHORT_LIVED = "short-lived"


class KeyManagerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["memory", "disk", "pkcs11"] = "disk"
    # disk: keys as PEM files (0600) under <data-dir>/keys, optionally encrypted.
    passphrase_file: Path | None = None
    passphrase_env: str | None = None
    # pkcs11: a PKCS#11 module (e.g. SoftHSM's libsofthsm2.so), token and PIN.
    pkcs11_module: Path | None = None
    pkcs11_token_label: str | None = None
    pkcs11_pin_file: Path | None = None
    pkcs11_pin_env: str | None = None


_MIN_CA_TTL = timedelta(minutes=1)


def _show(d: timedelta) -> str:
    secs = d.total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size and secs % size == 0:
            return f"{int(secs // size)}{unit}"
    return f"{secs:g}s"


class ServerConfig(BaseModel):
    """Settings of ``trustmesh server run``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data_dir: Path = Field(default_factory=lambda: default_home() / "server")
    trust_domain: str = "example.org"
    http_address: str = "127.0.0.1:8080"
    # Agent API (gRPC over TLS): node attestation, entry sync, SVID signing.
    bind_address: str = "127.0.0.1:8081"  # mutual TLS: agents present their node SVID
    attest_address: str = "127.0.0.1:8082"  # TLS: nodes without an SVID yet (Attest only)
    # Remote admin API: HTTPS, client certificate required, every call checked by RBAC.
    admin_address: str | None = "127.0.0.1:8443"
    agent_svid_ttl: timedelta = timedelta(hours=1)
    server_svid_ttl: timedelta = timedelta(hours=24)
    x509pop_ca: Path | None = None  # CA bundle whose node certificates may attest
    # Base URL written into certificates for CRL and OCSP; default http://<http_address>.
    public_url: str | None = None
    datastore: str | None = None  # default: sqlite:///<data-dir>/datastore.sqlite3
    key_manager: KeyManagerConfig = KeyManagerConfig()
    ca_key_algorithm: str = "ec-p256"
    ca_mode: CaMode = CaMode.GENERAL
    ca_subject: str = "O=trustmesh"
    # Each CA rotation makes a new root (or, with an upstream CA, a new intermediate
    # under it); the signing intermediate's lifetime sets the rotation pace.
    root_ttl: timedelta = timedelta(days=3650)
    intermediate_ttl: timedelta = timedelta(days=365)
    # How long a new CA is in the published bundle before it may sign (at least the
    # bundle refresh hint, so every agent and validator has fetched it).
    ca_propagation: timedelta = timedelta(minutes=5)
    ocsp_responder_ttl: timedelta = timedelta(days=7)
    crl_validity: timedelta = timedelta(hours=24)
    backdate: timedelta = timedelta(seconds=60)
    default_validity: timedelta = timedelta(hours=24)
    permitted_dns_domains: tuple[str, ...] = ()
    upstream_ca_cert: Path | None = None
    upstream_ca_key: Path | None = None
    upstream_ca_key_passphrase_file: Path | None = None
    # Signing processes for issuance; None = one per core (none on a single core).
    signing_workers: int | None = Field(default=None, ge=0, le=64)
    # OCSP responder processes sharing http_address (SO_REUSEPORT); other routes are
    # forwarded to the server. None = one per core (none on a single core); 0 = OCSP is
    # answered in the server process.
    ocsp_workers: int | None = Field(default=None, ge=0, le=64)
    # Namespace whose mesh policies (AuthorizationPolicy, PeerAuthentication) are mesh-wide.
    mesh_root_namespace: str = "istio-system"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "text"] = "json"

    @field_validator(
        "root_ttl",
        "intermediate_ttl",
        "ca_propagation",
        "ocsp_responder_ttl",
        "crl_validity",
        "backdate",
        "default_validity",
        "agent_svid_ttl",
        "server_svid_ttl",
        mode="before",
    )
    @classmethod
    def _duration(cls, v: Any) -> timedelta:
        return parse_duration(v)

    @model_validator(mode="after")
    def _rotation_fits(self) -> ServerConfig:
        # The successor CA is published at 1/2 of the active CA's life and signs at 5/6;
        # the active CA then has 1/6 of its life left for the leaves it still signs.
        ttl = self.intermediate_ttl
        if ttl < _MIN_CA_TTL:
            raise ValueError(f"intermediate_ttl {_show(ttl)} is too short to rotate; use at "
                             f"least {_show(_MIN_CA_TTL)}")
        if ttl < 3 * self.ca_propagation:
            raise ValueError(
                f"intermediate_ttl {_show(ttl)} is too short to rotate with ca_propagation "
                f"{_show(self.ca_propagation)}: the next CA is published at 1/2 of the "
                "current one's life and must be in the bundle for ca_propagation before it "
                f"signs at 5/6, so intermediate_ttl must be at least "
                f"{_show(3 * self.ca_propagation)}")
        leaf = max(self.default_validity, self.agent_svid_ttl)
        if ttl < 6 * leaf:
            raise ValueError(
                f"intermediate_ttl {_show(ttl)} is too short to rotate: the CA signs during "
                f"the last 1/6 of its life before handing over, which must fit the longest "
                f"default leaf lifetime ({_show(leaf)}, from default_validity and "
                f"agent_svid_ttl), so intermediate_ttl must be at least {_show(6 * leaf)}")
        if self.upstream_ca_cert is None and self.root_ttl < ttl:
            raise ValueError(
                f"root_ttl {_show(self.root_ttl)} is shorter than intermediate_ttl "
                f"{_show(ttl)}: each rotation makes a new root, which must outlive its "
                "intermediate")
        return self

    @field_validator("ca_key_algorithm")
    @classmethod
    def _algorithm(cls, v: str) -> str:
        allowed = ("ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "rsa-4096")
        if v.lower() not in allowed:
            raise ValueError(f"unknown key algorithm {v!r}; use one of {', '.join(allowed)}")
        return v.lower()

    @field_validator("trust_domain")
    @classmethod
    def _trust_domain(cls, v: str) -> str:
        allowed = set("abcdefghijklmnopqrstuvwxyz0123456789.-_")
        if not v or any(c not in allowed for c in v):
            raise ValueError(
                "a trust domain is lower-case letters, digits, '.', '-' and '_' only"
            )
        return v

    @field_validator("admin_address")
    @classmethod
    def _optional_address(cls, v: str | None) -> str | None:
        return None if not v else cls._address(v)

    @field_validator("http_address", "bind_address", "attest_address")
    @classmethod
    def _address(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"expected HOST:PORT, got {v!r}")
        return v

    @property
    def datastore_url(self) -> str:
        return self.datastore or f"sqlite:///{self.data_dir / 'datastore.sqlite3'}"

    @property
    def admin_socket(self) -> Path:
        return self.data_dir / "admin.sock"

    @property
    def base_url(self) -> str:
        return (self.public_url or f"http://{self.http_address}").rstrip("/")

    @classmethod
    def build(cls, file_values: dict[str, Any], overrides: dict[str, Any]) -> ServerConfig:
        """Merge file values and non-None overrides, with errors naming the key."""
        merged = dict(file_values)
        for key, value in overrides.items():
            if value is None or value == ():
                continue
            if key.startswith("key_manager."):
                km = dict(merged.get("key_manager") or {})
                km[key.split(".", 1)[1]] = value
                merged["key_manager"] = km
            else:
                merged[key] = value
        try:
            return cls.model_validate(merged)
        except ValidationError as exc:
            problems = []
            for err in exc.errors():
                loc = ".".join(str(p) for p in err["loc"]) or "config"
                msg = ("unknown setting" if err["type"] == "extra_forbidden"
                       else err["msg"].removeprefix("Value error, "))
                problems.append(f"{loc}: {msg}")
            first_loc = ".".join(str(p) for p in exc.errors()[0]["loc"]) or None
            if len(problems) == 1:
                raise ConfigError(problems[0].split(": ", 1)[1], field=first_loc) from None
            raise ConfigError("invalid configuration: " + "; ".join(problems)) from None


class AgentConfig(BaseModel):
    """Settings of ``trustmesh agent run``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data_dir: Path = Field(default_factory=lambda: default_home() / "agent")
    server_address: str = "127.0.0.1:8081"
    attest_address: str | None = None  # default: the server host, port + 1
    trust_bundle: Path
    join_token: str | None = None
    x509pop_cert: Path | None = None
    x509pop_key: Path | None = None
    # Outside the private data dir: every local process must be able to reach it.
    socket: Path = Path("/tmp/trustmesh-agent/public/api.sock")  # noqa: S108
    sync_interval: timedelta = timedelta(seconds=5)
    # /healthz and /metrics of the agent; empty disables
    health_address: str | None = "127.0.0.1:8088"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "text"] = "json"

    @field_validator("sync_interval", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> timedelta:
        return parse_duration(v)

    @field_validator("server_address", "attest_address", "health_address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if not v:
            return None
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"expected HOST:PORT, got {v!r}")
        return v

    @property
    def effective_attest_address(self) -> str:
        if self.attest_address:
            return self.attest_address
        host, _, port = self.server_address.rpartition(":")
        return f"{host}:{int(port) + 1}"

    @classmethod
    def build(cls, file_values: dict[str, Any], overrides: dict[str, Any]) -> AgentConfig:
        merged = dict(file_values)
        merged.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.model_validate(merged)
        except ValidationError as exc:
            problems = []
            for err in exc.errors():
                loc = ".".join(str(p) for p in err["loc"]) or "config"
                msg = "unknown setting" if err["type"] == "extra_forbidden" else err["msg"]
                problems.append(f"{loc}: {msg}")
            raise ConfigError("invalid agent configuration: " + "; ".join(problems)) from None


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a TOML (``.toml``) or YAML file into a dict of settings."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        if path.suffix == ".toml":
            data: Any = tomllib.loads(raw.decode())
        else:
            data = yaml.safe_load(raw)
    except (tomllib.TOMLDecodeError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot parse config file {path}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings")
    # Accept both "data-dir" and "data_dir", and a [server] table.
    if "server" in data and isinstance(data["server"], dict) and len(data) == 1:
        data = data["server"]
    return _normalize_keys(data)


def _normalize_keys(data: dict[Any, Any]) -> dict[str, Any]:
    """``data-dir`` and ``data_dir`` are the same key, at every level."""
    return {
        str(k).replace("-", "_"): _normalize_keys(v) if isinstance(v, dict) else v
        for k, v in data.items()
    }
