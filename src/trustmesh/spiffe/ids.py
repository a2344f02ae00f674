"""SPIFFE IDs and trust domains, exactly as the SPIFFE-ID specification defines them.

    spiffe://<trust domain>[/<segment>]*

- the scheme is ``spiffe``, in lower case, followed by ``://``;
- the trust domain is 1-255 characters of ``a-z 0-9 . - _`` (no upper case,
  no port, no user info, no percent-encoding);
- each path segment is 1 or more characters of ``a-z A-Z 0-9 . - _``, and is
  neither ``.`` nor ``..``; there are no empty segments and no trailing ``/``;
- there is no query and no fragment; the whole ID is at most 2048 bytes.

Errors say which rule was broken and where.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import total_ordering

from trustmesh.errors import InvalidInput

__all__ = ["MAX_ID_LENGTH", "MAX_TRUST_DOMAIN_LENGTH", "SpiffeId", "TrustDomain"]

SCHEME = "spiffe://"
MAX_ID_LENGTH = 2048
MAX_TRUST_DOMAIN_LENGTH = 255
_TD_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-_")
_PATH_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_")
# Fast paths for values built directly (not through ``parse``); on a miss the
# detailed checkers run to say which rule was broken.
_TD_RE = re.compile(r"[a-z0-9._-]{1,255}")
_PATH_RE = re.compile(r"(?:/[A-Za-z0-9._-]+)*")


def _check_trust_domain(name: str, text: str, offset: int) -> None:
    if not name:
        raise InvalidInput(f"{text!r}: the trust domain is missing")
    if len(name) > MAX_TRUST_DOMAIN_LENGTH:
        raise InvalidInput(
            f"{text!r}: the trust domain is longer than {MAX_TRUST_DOMAIN_LENGTH} characters")
    if "@" in name:  # report user info first: 'user:pass@host' is not a port problem
        raise InvalidInput(f"{text!r}: a trust domain has no user info "
                           f"(at position {offset + name.index('@')})")
    for i, ch in enumerate(name):
        if ch in _TD_CHARS:
            continue
        where = f"at position {offset + i}"
        if ch.isupper():
            raise InvalidInput(f"{text!r}: trust domain contains an upper-case character "
                               f"{ch!r} {where}; trust domains are lower-case")
        if ch == ":":
            raise InvalidInput(f"{text!r}: a trust domain has no port {where}")
        if ch == "@":
            raise InvalidInput(f"{text!r}: a trust domain has no user info {where}")
        if ch == "%":
            raise InvalidInput(f"{text!r}: percent-encoding is not allowed {where}")
        raise InvalidInput(f"{text!r}: trust domain contains the character {ch!r} {where}; "
                           "allowed are a-z, 0-9, '.', '-' and '_'")


@total_ordering
@dataclass(frozen=True)
class TrustDomain:
    """A trust domain name, such as ``example.org``."""

    name: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or _TD_RE.fullmatch(self.name) is None:
            if not isinstance(self.name, str):
                raise InvalidInput(
                    f"a trust domain must be a string, not {type(self.name).__name__}")
            _check_trust_domain(self.name, self.name, 0)

    @classmethod
    def parse(cls, text: str) -> TrustDomain:
        """Accepts ``example.org`` or ``spiffe://example.org``."""
        if not isinstance(text, str):
            raise InvalidInput(f"a trust domain must be a string, not {type(text).__name__}")
        if "://" in text:
            sid = SpiffeId.parse(text)
            if sid.path:
                raise InvalidInput(f"{text!r} is a SPIFFE ID with a path, not a trust domain")
            return sid.trust_domain
        _check_trust_domain(text, text, 0)
        return cls(text)

    @property
    def id(self) -> SpiffeId:
        """The trust domain's own SPIFFE ID, ``spiffe://<name>``."""
        return SpiffeId(self, "")

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"TrustDomain({self.name!r})"

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, TrustDomain):
            return NotImplemented
        return self.name < other.name


@total_ordering
@dataclass(frozen=True)
class SpiffeId:
    """A parsed SPIFFE ID; ``path`` is ``""`` or starts with ``/``."""

    trust_domain: TrustDomain
    path: str

    def __post_init__(self) -> None:
        if not isinstance(self.trust_domain, TrustDomain):
            raise InvalidInput("a SPIFFE ID's trust domain must be a TrustDomain, not "
                               f"{type(self.trust_domain).__name__}")
        if not isinstance(self.path, str):
            raise InvalidInput(f"a SPIFFE ID path must be a string, not {type(self.path).__name__}")
        text = f"{SCHEME}{self.trust_domain.name}{self.path}"
        if _PATH_RE.fullmatch(self.path) is None or "/./" in self.path + "/" \
                or "/../" in self.path + "/":
            if self.path and not self.path.startswith("/"):
                raise InvalidInput(f"{self.path!r}: a SPIFFE ID path starts with '/'")
            self._check_path(self.path, text)
        if len(text.encode()) > MAX_ID_LENGTH:
            raise InvalidInput(f"SPIFFE IDs are at most {MAX_ID_LENGTH} bytes")

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        """Parse ``text`` by the SPIFFE-ID rules; InvalidInput names the rule it breaks."""
        if not isinstance(text, str):
            raise InvalidInput(f"a SPIFFE ID must be a string, not {type(text).__name__}")
        if not text:
            raise InvalidInput("the SPIFFE ID is empty")
        if len(text.encode()) > MAX_ID_LENGTH:
            raise InvalidInput(f"SPIFFE IDs are at most {MAX_ID_LENGTH} bytes")
        if not text.startswith(SCHEME):
            lowered = text[: len(SCHEME)].lower()
            if lowered == SCHEME:
                raise InvalidInput(f"{text!r}: the scheme must be 'spiffe' in lower case")
            if "://" not in text:
                raise InvalidInput(f"{text!r}: a SPIFFE ID starts with 'spiffe://'")
            raise InvalidInput(f"{text!r}: the scheme must be 'spiffe', not "
                               f"{text.split('://', 1)[0]!r}")
        rest = text[len(SCHEME):]
        for ch, rule in (("?", "must not have a query"), ("#", "must not have a fragment")):
            if ch in rest:
                raise InvalidInput(f"{text!r}: SPIFFE IDs {rule}")
        slash = rest.find("/")
        td_text, path = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])
        _check_trust_domain(td_text, text, len(SCHEME))
        if path:
            cls._check_path(path, text)
        return cls(TrustDomain(td_text), path)

    @staticmethod
    def _check_path(path: str, text: str) -> None:
        segments = path.split("/")[1:]
        for index, seg in enumerate(segments):
            if seg == "":
                if index == len(segments) - 1:
                    raise InvalidInput(f"{text!r}: the path must not end with '/'")
                raise InvalidInput(f"{text!r}: the path has an empty segment ('//')")
            if seg in (".", ".."):
                raise InvalidInput(f"{text!r}: path segment {seg!r} is not allowed")
            for ch in seg:
                if ch not in _PATH_CHARS:
                    if ch == "%":
                        raise InvalidInput(f"{text!r}: percent-encoding is not allowed in "
                                           "the path")
                    raise InvalidInput(
                        f"{text!r}: path segment {seg!r} contains the character {ch!r}; "
                        "allowed are letters, digits, '.', '-' and '_'")

    @property
    def segments(self) -> tuple[str, ...]:
        """The path segments, ``()`` for the trust domain's own ID."""
        return tuple(self.path.split("/")[1:]) if self.path else ()

    @property
    def is_trust_domain_id(self) -> bool:
        """True for ``spiffe://<trust domain>`` with no path (not allowed on leaf SVIDs)."""
        return not self.path

    @classmethod
    def from_segments(cls, trust_domain: TrustDomain | str, *segments: str) -> SpiffeId:
        """``spiffe://<trust domain>/<segment>/...``; each segment is checked (no ``/`` inside)."""
        td = trust_domain if isinstance(trust_domain, TrustDomain) else TrustDomain.parse(
            trust_domain)
        for seg in segments:
            if not isinstance(seg, str):
                raise InvalidInput(f"path segments are strings, not {type(seg).__name__}")
            if "/" in seg:
                raise InvalidInput(f"path segment {seg!r} contains '/'; pass each segment "
                                   "separately")
        return cls.parse(f"{SCHEME}{td}" + "".join(f"/{s}" for s in segments))

    def member_of(self, trust_domain: TrustDomain) -> bool:
        """True when this ID lives in ``trust_domain``."""
        return self.trust_domain == trust_domain

    def __str__(self) -> str:
        return f"{SCHEME}{self.trust_domain}{self.path}"

    def __repr__(self) -> str:
        return f"SpiffeId({str(self)!r})"

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, SpiffeId):
            return NotImplemented
        return str(self) < str(other)
