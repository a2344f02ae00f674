"""Registration entries: who gets which SPIFFE ID, on which node, under which selectors.

The pure part of the registry: the entry value type, selector parsing and the
validation of user input (from the CLI, the admin API or a YAML file). The
datastore and the server compose these; nothing here does IO.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from trustmesh.errors import InvalidInput
from trustmesh.pki.csr import validate_dns_name
from trustmesh.spiffe.ids import SpiffeId, TrustDomain

__all__ = [
    "DEFAULT_JWT_TTL",
    "DEFAULT_X509_TTL",
    "Entry",
    "Selector",
    "entry_from_input",
    "parse_selector",
]

DEFAULT_X509_TTL = 3600
DEFAULT_JWT_TTL = 300
MAX_TTL = 365 * 86400

_SELECTOR_TYPE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_LABEL_KEY = re.compile(r"^([a-z0-9A-Z]([-a-z0-9A-Z_.]{0,61}[a-z0-9A-Z])?/)?"
                        r"[a-z0-9A-Z]([-a-z0-9A-Z_.]{0,61}[a-z0-9A-Z])?$")


@dataclass(frozen=True, order=True)
class Selector:
    """``type:value``, e.g. ``unix:uid:1000`` is type ``unix`` and value ``uid:1000``."""

    type: str
    value: str

    def __str__(self) -> str:
        return f"{self.type}:{self.value}"


def parse_selector(text: str, *, field_name: str = "selectors") -> Selector:
    """Parse ``type:value``; both parts are required."""
    if not isinstance(text, str):
        raise InvalidInput(f"selector {text!r} must be a string", field=field_name)
    kind, sep, value = text.partition(":")
    if not sep or not kind:
        raise InvalidInput(
            f"selector {text!r} has no type: write it as type:value (e.g. unix:uid:1000)",
            field=field_name)
    if not _SELECTOR_TYPE.match(kind):
        raise InvalidInput(
            f"selector type {kind!r} must be lower-case letters, digits, '_', '.' or '-'",
            field=field_name)
    if not value:
        raise InvalidInput(f"selector {text!r} has an empty value", field=field_name)
    if any(c in value for c in "\n\r\x00"):
        raise InvalidInput(f"selector {text!r} contains a control character", field=field_name)
    return Selector(kind, value)


@dataclass(frozen=True)
class Entry:
    """A registration entry, as stored and as served to agents."""

    id: str
    spiffe_id: SpiffeId
    parent_id: SpiffeId
    selectors: tuple[Selector, ...]
    x509_svid_ttl: int = DEFAULT_X509_TTL
    jwt_svid_ttl: int = DEFAULT_JWT_TTL
    dns_names: tuple[str, ...] = ()
    federates_with: tuple[TrustDomain, ...] = ()
    admin: bool = False
    downstream: bool = False
    hint: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    revision: int = 0
    created_at: int = 0
    created_by: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "spiffe_id": str(self.spiffe_id),
            "parent_id": str(self.parent_id),
            "selectors": [str(s) for s in self.selectors],
            "x509_svid_ttl": self.x509_svid_ttl,
            "jwt_svid_ttl": self.jwt_svid_ttl,
            "dns_names": list(self.dns_names),
            "federates_with": [str(td) for td in self.federates_with],
            "admin": self.admin,
            "downstream": self.downstream,
            "hint": self.hint,
            "labels": dict(self.labels),
            "revision": self.revision,
            "created_at": self.created_at,
            "created_by": self.created_by,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Entry:
        """Rebuild an entry written by ``to_json`` (trusted input: the datastore)."""
        return cls(
            id=data["id"],
            spiffe_id=SpiffeId.parse(data["spiffe_id"]),
            parent_id=SpiffeId.parse(data["parent_id"]),
            selectors=tuple(parse_selector(s) for s in data["selectors"]),
            x509_svid_ttl=int(data["x509_svid_ttl"]),
            jwt_svid_ttl=int(data["jwt_svid_ttl"]),
            dns_names=tuple(data.get("dns_names", ())),
            federates_with=tuple(TrustDomain.parse(t) for t in data.get("federates_with", ())),
            admin=bool(data.get("admin", False)),
            downstream=bool(data.get("downstream", False)),
            hint=str(data.get("hint", "")),
            labels=tuple(sorted((data.get("labels") or {}).items())),
            revision=int(data.get("revision", 0)),
            created_at=int(data.get("created_at", 0)),
            created_by=str(data.get("created_by", "")),
        )

    def with_revision(self, revision: int) -> Entry:
        return replace(self, revision=revision)


_FIELDS = {"id", "spiffe_id", "parent_id", "selectors", "x509_svid_ttl", "jwt_svid_ttl",
           "dns_names", "federates_with", "admin", "downstream", "hint", "labels"}


def _ttl(value: Any, name: str, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, str):
        from trustmesh.config import parse_duration

        try:
            value = int(parse_duration(value).total_seconds())
        except ValueError as exc:
            raise InvalidInput(str(exc), field=name) from None
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidInput("must be a number of seconds or a duration like 1h", field=name)
    if not 1 <= value <= MAX_TTL:
        raise InvalidInput(f"must be between 1 second and {MAX_TTL // 86400} days",
                           field=name)
    return value


def _str_list(value: Any, name: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidInput("must be a list of strings", field=name)
    return value


def _spiffe_id(value: Any, name: str, trust_domain: TrustDomain) -> SpiffeId:
    if not isinstance(value, str) or not value:
        raise InvalidInput("a SPIFFE ID (spiffe://trust-domain/path) is required", field=name)
    try:
        sid = SpiffeId.parse(value)
    except InvalidInput as exc:
        raise InvalidInput(exc.message, field=name) from None
    if sid.trust_domain != trust_domain:
        raise InvalidInput(
            f"{value} is not in this server's trust domain {trust_domain}", field=name)
    if not sid.path:
        raise InvalidInput(f"{value} names the trust domain itself, not a workload",
                           field=name)
    return sid


def entry_from_input(
    data: Mapping[str, Any],
    trust_domain: TrustDomain,
    *,
    where: str = "",
    entry_id: str | None = None,
    created_at: int = 0,
    created_by: str = "",
) -> Entry:
    """Validate user input into an Entry; errors name the offending field."""
    prefix = f"{where}." if where else ""

    def fail(exc: InvalidInput) -> InvalidInput:
        return InvalidInput(exc.message, field=prefix + (exc.field or "entry"))

    try:
        if not isinstance(data, Mapping):
            raise InvalidInput("an entry must be a mapping of fields")
        unknown = sorted(set(data) - _FIELDS)
        if unknown:
            raise InvalidInput(
                f"unknown field {unknown[0]!r}; known fields: {', '.join(sorted(_FIELDS))}",
                field=unknown[0])
        spiffe_id = _spiffe_id(data.get("spiffe_id"), "spiffe_id", trust_domain)
        parent_id = _spiffe_id(data.get("parent_id"), "parent_id", trust_domain)
        if parent_id == spiffe_id:
            raise InvalidInput("an entry cannot be its own parent", field="parent_id")
        raw_selectors = _str_list(data.get("selectors"), "selectors")
        if not raw_selectors:
            raise InvalidInput("at least one selector is required (e.g. unix:uid:1000)",
                               field="selectors")
        selectors = tuple(sorted({
            parse_selector(s, field_name=f"selectors[{i}]") for i, s in enumerate(raw_selectors)
        }))
        dns = tuple(dict.fromkeys(
            validate_dns_name(d, field=f"dns_names[{i}]")
            for i, d in enumerate(_str_list(data.get("dns_names"), "dns_names"))))
        federates: list[TrustDomain] = []
        for i, td in enumerate(_str_list(data.get("federates_with"), "federates_with")):
            try:
                parsed = TrustDomain.parse(td)
            except InvalidInput as exc:
                raise InvalidInput(exc.message, field=f"federates_with[{i}]") from None
            if parsed == trust_domain:
                raise InvalidInput("an entry does not federate with its own trust domain",
                                   field=f"federates_with[{i}]")
            federates.append(parsed)
        labels_raw = data.get("labels") or {}
        if not isinstance(labels_raw, Mapping):
            raise InvalidInput("must be a mapping of label keys to values", field="labels")
        labels: list[tuple[str, str]] = []
        for key, value in labels_raw.items():
            if not isinstance(key, str) or not _LABEL_KEY.match(key):
                raise InvalidInput(f"label key {key!r} is not valid", field=f"labels.{key}")
            if not isinstance(value, str) or len(value) > 63:
                raise InvalidInput("label values are strings of at most 63 characters",
                                   field=f"labels.{key}")
            labels.append((key, value))
        for flag in ("admin", "downstream"):
            if flag in data and not isinstance(data[flag], bool):
                raise InvalidInput("must be true or false", field=flag)
        hint = data.get("hint", "")
        if not isinstance(hint, str) or len(hint) > 1024:
            raise InvalidInput("must be a string of at most 1024 characters", field="hint")
        return Entry(
            id=entry_id or str(data.get("id") or uuid.uuid4()),
            spiffe_id=spiffe_id,
            parent_id=parent_id,
            selectors=selectors,
            x509_svid_ttl=_ttl(data.get("x509_svid_ttl"), "x509_svid_ttl", DEFAULT_X509_TTL),
            jwt_svid_ttl=_ttl(data.get("jwt_svid_ttl"), "jwt_svid_ttl", DEFAULT_JWT_TTL),
            dns_names=dns,
            federates_with=tuple(sorted(set(federates), key=str)),
            admin=bool(data.get("admin", False)),
            downstream=bool(data.get("downstream", False)),
            hint=hint,
            labels=tuple(sorted(labels)),
            created_at=created_at,
            created_by=created_by,
        )
    except InvalidInput as exc:
        raise fail(exc) from None


def entries_for_agent(agent_id: SpiffeId, entries: Sequence[Entry]) -> list[Entry]:
    """Entries an agent may serve: parented by the agent, or by such an entry (transitively)."""
    by_parent: dict[SpiffeId, list[Entry]] = {}
    for e in entries:
        by_parent.setdefault(e.parent_id, []).append(e)
    out: list[Entry] = []
    seen: set[str] = set()
    frontier = [agent_id]
    while frontier:
        parent = frontier.pop()
        for e in by_parent.get(parent, ()):
            if e.id in seen:
                continue
            seen.add(e.id)
            out.append(e)
            frontier.append(e.spiffe_id)
    return out
