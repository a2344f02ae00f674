"""The agent's cache: the entries it serves, their SVIDs, and when to renew them.

Pure state and decisions; the agent loop feeds it sync results and signed
SVIDs, and asks it what to rotate. Workload lookups go through a selector
index, so the cost of a match does not grow with the number of entries.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

__all__ = ["CachedEntry", "CachedSvid", "SvidCache", "rotation_due"]


@dataclass(frozen=True)
class CachedEntry:
    id: str
    spiffe_id: str
    parent_id: str
    selectors: frozenset[str]
    x509_svid_ttl: int
    jwt_svid_ttl: int
    dns_names: tuple[str, ...]
    federates_with: tuple[str, ...]
    hint: str
    revision: int


@dataclass(frozen=True)
class CachedSvid:
    entry_id: str
    entry_revision: int
    spiffe_id: str
    key: ec.EllipticCurvePrivateKey
    chain: tuple[x509.Certificate, ...]  # leaf first, intermediates after, no root
    hint: str = ""
    received_at: float | None = None  # when the agent got it (notBefore is backdated)

    @property
    def not_before(self) -> float:
        return self.chain[0].not_valid_before_utc.timestamp()

    @property
    def not_after(self) -> float:
        return self.chain[0].not_valid_after_utc.timestamp()


def rotation_due(not_before: float, not_after: float, now: float) -> bool:
    """Renew once half of the lifetime is gone (as SPIRE agents do)."""
    return now >= not_before + (not_after - not_before) / 2


@dataclass
class SvidCache:
    revision: int = 0
    entries: dict[str, CachedEntry] = field(default_factory=dict)
    svids: dict[str, CachedSvid] = field(default_factory=dict)
    generation: int = 0  # bumps on every change workloads can see
    # (issuer name DER, serial) of every certificate this trust domain's CRLs list
    revoked: frozenset[tuple[bytes, int]] = frozenset()
    _by_selector: dict[str, set[str]] = field(default_factory=dict)

    # -- sync ------------------------------------------------------------------------
    def apply_changes(self, upserts: Iterable[CachedEntry], removed: Iterable[str],
                      revision: int) -> bool:
        changed = False
        for entry_id in removed:
            if self._drop(entry_id):
                changed = True
        for entry in upserts:
            old = self.entries.get(entry.id)
            if old == entry:
                continue
            self._drop(entry.id, keep_svid=old is not None and old.spiffe_id == entry.spiffe_id)
            self.entries[entry.id] = entry
            for sel in entry.selectors:
                self._by_selector.setdefault(sel, set()).add(entry.id)
            changed = True
        self.revision = max(self.revision, revision)
        if changed:
            self.generation += 1
        return changed

    def _drop(self, entry_id: str, keep_svid: bool = False) -> bool:
        entry = self.entries.pop(entry_id, None)
        if entry is None:
            return False
        for sel in entry.selectors:
            ids = self._by_selector.get(sel)
            if ids is not None:
                ids.discard(entry_id)
                if not ids:
                    del self._by_selector[sel]
        if not keep_svid:
            self.svids.pop(entry_id, None)
        return True

    # -- rotation ----------------------------------------------------------------------
    def due(self, now: float) -> list[str]:
        """Entries whose SVID is missing, half-way through its life, for an older entry,
        or revoked (a CRL of this trust domain lists it: a new key and SVID at once)."""
        out = []
        for entry_id, entry in self.entries.items():
            svid = self.svids.get(entry_id)
            start = svid.received_at if svid is not None and svid.received_at else (
                svid.not_before if svid is not None else 0.0)
            if (svid is None or svid.entry_revision != entry.revision
                    or rotation_due(start, svid.not_after, now) or self.is_revoked(svid)):
                out.append(entry_id)
        return sorted(out)

    def is_revoked(self, svid: CachedSvid) -> bool:
        leaf = svid.chain[0]
        return (leaf.issuer.public_bytes(), leaf.serial_number) in self.revoked

    def store(self, svids: Sequence[CachedSvid]) -> None:
        stored = False
        for svid in svids:
            if svid.entry_id in self.entries:
                self.svids[svid.entry_id] = svid
                stored = True
        if stored:
            self.generation += 1

    def expire(self, now: float) -> list[str]:
        """Forget SVIDs past their expiry (a long outage): never serve an expired one."""
        gone = [e for e, s in self.svids.items() if s.not_after <= now]
        for e in gone:
            del self.svids[e]
        if gone:
            self.generation += 1
        return gone

    # -- workload lookups ------------------------------------------------------------
    def match(self, selectors: Iterable[str]) -> list[CachedEntry]:
        """Entries all of whose selectors the workload shows, in a stable order."""
        have = set(selectors)
        candidates: set[str] = set()
        for sel in have:
            candidates |= self._by_selector.get(sel, set())
        out = [self.entries[e] for e in candidates if self.entries[e].selectors <= have]
        return sorted(out, key=lambda e: (e.spiffe_id, e.id))

    def svids_for(self, selectors: Iterable[str], now: float) -> list[CachedSvid]:
        return [s for e in self.match(selectors)
                if (s := self.svids.get(e.id)) is not None and s.not_after > now]
