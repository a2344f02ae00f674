"""The registry service: registration entries, join tokens and agents.

A thin shell over the datastore: it validates input with the pure entry
model, stamps who and when, and converts between stored JSON and Entry values.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from trustmesh.clock import Clock
from trustmesh.errors import InvalidInput, NotFound, PermissionDenied
from trustmesh.log import get_logger
from trustmesh.server.entries import Entry, entry_from_input
from trustmesh.server.federation import FederationStore
from trustmesh.spiffe.ids import SpiffeId, TrustDomain
from trustmesh.store.datastore import Datastore

__all__ = ["JoinToken", "Registry", "hash_token"]

log = get_logger("trustmesh.server.registry")

MAX_TOKEN_TTL = timedelta(days=30)
DEFAULT_TOKEN_TTL = timedelta(minutes=10)


def hash_token(token: str) -> str:
    """Tokens are stored and looked up by their SHA-256 digest, never in clear."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class JoinToken:
    token: str
    spiffe_id: SpiffeId
    expires_at: int

    def to_json(self) -> dict[str, Any]:
        return {"token": self.token, "spiffe_id": str(self.spiffe_id),
                "expires_at": self.expires_at}


class Registry:
    def __init__(self, store: Datastore, trust_domain: TrustDomain, clock: Clock) -> None:
        self.store = store
        self.trust_domain = trust_domain
        self.clock = clock
        self.federation = FederationStore(store, trust_domain, clock)

    def _now(self) -> int:
        return int(self.clock.now().timestamp())

    # -- entries ---------------------------------------------------------------
    def create_entries(self, inputs: Sequence[Mapping[str, Any]], actor: str) -> list[Entry]:
        if not inputs:
            raise InvalidInput("no entries given")
        now = self._now()
        many = len(inputs) > 1
        entries = [
            entry_from_input(data, self.trust_domain, where=f"entries[{i}]" if many else "",
                             created_at=now, created_by=actor)
            for i, data in enumerate(inputs)
        ]
        ids = [e.id for e in entries]
        if len(set(ids)) != len(ids):
            raise InvalidInput("two entries in the request have the same id")
        stored = self.store.create_entries([e.to_json() for e in entries])
        log.info("created entries", extra={"actor": actor, "ids": ids[:64], "count": len(ids)})
        return [Entry.from_json(b) for b in stored]

    def get_entry(self, entry_id: str) -> Entry:
        return Entry.from_json(self.store.get_entry(entry_id))

    def list_entries(self, *, spiffe_id: str | None = None, parent_id: str | None = None
                     ) -> list[Entry]:
        for name, value in (("spiffe_id", spiffe_id), ("parent_id", parent_id)):
            if value:
                try:
                    SpiffeId.parse(value)
                except InvalidInput as exc:
                    raise InvalidInput(exc.message, field=name) from None
        return [Entry.from_json(b) for b in self.store.list_entries(spiffe_id=spiffe_id,
                                                                    parent_id=parent_id)]

    def update_entry(self, entry_id: str, changes: Mapping[str, Any], actor: str) -> Entry:
        if "id" in changes and changes["id"] != entry_id:
            raise InvalidInput("an entry's id cannot change", field="id")
        current = self.get_entry(entry_id).to_json()
        merged = {k: v for k, v in current.items()
                  if k not in ("revision", "created_at", "created_by")}
        merged.update(changes)
        entry = entry_from_input(merged, self.trust_domain, entry_id=entry_id,
                                 created_at=current["created_at"],
                                 created_by=current["created_by"])
        stored = self.store.update_entry(entry.to_json())
        log.info("updated entry", extra={"actor": actor, "id": entry_id})
        return Entry.from_json(stored)

    def delete_entry(self, entry_id: str, actor: str) -> int:
        revision = self.store.delete_entry(entry_id)
        log.info("deleted entry", extra={"actor": actor, "id": entry_id})
        return revision

    # -- join tokens -----------------------------------------------------------
    def create_join_token(self, ttl: timedelta | None, spiffe_id: str | None,
                          actor: str) -> JoinToken:
        ttl = ttl or DEFAULT_TOKEN_TTL
        if ttl <= timedelta(0) or ttl > MAX_TOKEN_TTL:
            raise InvalidInput("a token lives between 1 second and 30 days", field="ttl")
        token = secrets.token_urlsafe(32)
        digest = hash_token(token)
        if spiffe_id:
            try:
                agent_id = SpiffeId.parse(spiffe_id)
            except InvalidInput as exc:
                raise InvalidInput(exc.message, field="spiffe_id") from None
            if agent_id.trust_domain != self.trust_domain:
                raise InvalidInput(f"{spiffe_id} is not in trust domain {self.trust_domain}",
                                   field="spiffe_id")
        else:
            agent_id = SpiffeId.parse(
                f"spiffe://{self.trust_domain}/trustmesh/agent/join_token/{digest[:16]}")
        now = self._now()
        expires = now + int(ttl.total_seconds())
        self.store.create_join_token(digest, spiffe_id=str(agent_id), created_at=now,
                                     expires_at=expires, created_by=actor)
        log.info("created join token", extra={"actor": actor, "spiffe_id": str(agent_id),
                                              "expires_at": expires})
        return JoinToken(token, agent_id, expires)

    def consume_join_token(self, token: str) -> SpiffeId:
        """Spend a token (exactly once, even under concurrent attempts)."""
        if not token or len(token) > 512:
            raise PermissionDenied("unknown join token")
        # Only the SHA-256 digest is stored and looked up: how long a lookup takes can
        # tell an attacker about digests, which says nothing useful about tokens.
        return SpiffeId.parse(self.store.consume_join_token(hash_token(token), self._now()))

    # -- agents ----------------------------------------------------------------
    def list_agents(self) -> list[dict[str, Any]]:
        return self.store.list_agents()

    def evict_agent(self, spiffe_id: str, actor: str) -> None:
        try:
            SpiffeId.parse(spiffe_id)
        except InvalidInput as exc:
            raise InvalidInput(exc.message, field="spiffe_id") from None
        if self.store.get_agent(spiffe_id) is None:
            raise NotFound(f"no agent {spiffe_id}", field="spiffe_id")
        self.store.ban_agent(spiffe_id)
        log.warning("evicted agent", extra={"actor": actor, "spiffe_id": spiffe_id})
