"""JWT-SVID signing keys: prepared ahead, published before use, retired after their tokens.

The schedule is a pure function of ``now`` (as SPIRE's CA slots are):

- a key signs for ``ttl``; at half of that a successor is *prepared* and
  published in the bundle at once, so validators learn it before any token
  signed with it exists;
- at five sixths the successor becomes *active* and the old key is *retired*;
- a retired key stays in the bundle until every token it signed has expired
  (its retirement time plus the longest JWT-SVID lifetime), then it is dropped.
"""

from __future__ import annotations

import enum
import json
import secrets
import threading
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from trustmesh.clock import Clock
from trustmesh.errors import ConfigError
from trustmesh.log import get_logger
from trustmesh.pki.keys.base import KeyAlgorithm, KeyManager, SigningKey
from trustmesh.store.datastore import Datastore

__all__ = ["JwtAuthority", "JwtKey", "KeyState", "plan_rotation"]

log = get_logger("trustmesh.server.jwt")

_SETTING = "jwt.keys"


class KeyState(enum.StrEnum):
    PREPARED = "prepared"
    ACTIVE = "active"
    RETIRED = "retired"


@dataclass(frozen=True)
class JwtKey:
    kid: str
    key_id: str  # name in the key manager
    created_at: float
    state: KeyState
    activated_at: float | None = None
    retired_at: float | None = None


def plan_rotation(keys: list[JwtKey], now: float, ttl: float, max_token_ttl: float
                  ) -> tuple[list[JwtKey], bool]:
    """The key set after applying the schedule at ``now``; True when a new key is needed
    (returned as a PREPARED placeholder with an empty kid for the caller to create)."""
    out = [k for k in keys
           if not (k.state is KeyState.RETIRED and k.retired_at is not None
                   and now >= k.retired_at + max_token_ttl)]
    active = next((k for k in out if k.state is KeyState.ACTIVE), None)
    prepared = next((k for k in out if k.state is KeyState.PREPARED), None)
    need_new = False
    if active is None:
        if prepared is not None:
            out = [replace(k, state=KeyState.ACTIVE, activated_at=now) if k is prepared else k
                   for k in out]
        else:
            need_new = True
        return out, need_new
    age = now - (active.activated_at or active.created_at)
    if prepared is None and age >= ttl / 2:
        need_new = True
    if prepared is not None and age >= ttl * 5 / 6:
        out = [
            replace(k, state=KeyState.ACTIVE, activated_at=now) if k is prepared
            else replace(k, state=KeyState.RETIRED, retired_at=now) if k is active
            else k
            for k in out
        ]
    return out, need_new


class JwtAuthority:
    """Keeps the key set in the datastore and the keys in the key manager."""

    def __init__(self, store: Datastore, keys: KeyManager, clock: Clock, *,
                 ttl: timedelta = timedelta(days=1),
                 max_token_ttl: timedelta = timedelta(hours=24)) -> None:
        self.store = store
        self.keys = keys
        self.clock = clock
        self.ttl = ttl.total_seconds()
        self.max_token_ttl = max_token_ttl.total_seconds()
        self._lock = threading.Lock()
        raw = store.get_setting(_SETTING)
        self._set: list[JwtKey] = [
            JwtKey(**{**d, "state": KeyState(d["state"])}) for d in json.loads(raw or "[]")]
        self.rotate()

    def _now(self) -> float:
        return self.clock.now().timestamp()

    def rotate(self) -> bool:
        """Apply the schedule; returns True when the published set changed."""
        with self._lock:
            now = self._now()
            planned, need_new = plan_rotation(self._set, now, self.ttl, self.max_token_ttl)
            if need_new:
                kid = secrets.token_urlsafe(24)
                key_id = f"jwt-{kid[:16].replace('_', 'x').replace('-', 'y')}"
                self.keys.generate_key(key_id, KeyAlgorithm.EC_P256)
                has_active = any(k.state is KeyState.ACTIVE for k in planned)
                state = KeyState.PREPARED if has_active else KeyState.ACTIVE
                planned.append(JwtKey(kid, key_id, now, state,
                                      activated_at=None if has_active else now))
                log.info("new JWT signing key", extra={"kid": kid, "state": state.value})
            changed = planned != self._set
            if changed:
                for old in self._set:
                    if old.kid not in {k.kid for k in planned}:
                        self.keys.delete_key(old.key_id)
                self.store.put_settings({_SETTING: json.dumps(
                    [{**asdict(k), "state": k.state.value} for k in planned])})
                self._set = planned
            return changed

    def signing_key(self) -> tuple[str, SigningKey]:
        """(kid, key) of the active key."""
        active = next(k for k in self._set if k.state is KeyState.ACTIVE)
        key = self.keys.get_key(active.key_id)
        if key is None:
            raise ConfigError(f"the JWT signing key {active.key_id} is missing from the "
                              f"{self.keys.name} key manager")
        return active.kid, key

    def published(self) -> dict[str, Any]:
        """kid -> public key of every key validators must know (prepared, active, retired)."""
        out: dict[str, Any] = {}
        for k in self._set:
            key = self.keys.get_key(k.key_id)
            if key is not None:
                out[k.kid] = key.public_key()
        return out

    def states(self) -> dict[str, str]:
        return {k.kid: k.state.value for k in self._set}

    def next_check(self) -> datetime:
        return self.clock.now() + timedelta(seconds=min(60.0, self.ttl / 12))
