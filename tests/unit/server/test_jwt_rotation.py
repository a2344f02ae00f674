"""JWT signing key rotation: published before use, retired after the tokens it signed."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from trustmesh.clock import FixedClock
from trustmesh.pki.keys.memory import MemoryKeyManager
from trustmesh.server.jwt_authority import JwtAuthority, JwtKey, KeyState, plan_rotation
from trustmesh.store.datastore import Datastore

DAY = 86400.0
HOUR = 3600.0


def test_first_key_is_active_at_once() -> None:
    keys, need = plan_rotation([], 0, DAY, HOUR)
    assert keys == [] and need


def test_schedule_prepare_activate_retire_drop() -> None:
    a = JwtKey("a", "ka", 0, KeyState.ACTIVE, activated_at=0)
    keys, need = plan_rotation([a], DAY / 2 - 1, DAY, HOUR)
    assert keys == [a] and not need
    keys, need = plan_rotation([a], DAY / 2, DAY, HOUR)
    assert need  # prepare the successor at half-life
    b = JwtKey("b", "kb", DAY / 2, KeyState.PREPARED)
    keys, need = plan_rotation([a, b], DAY * 5 / 6 - 1, DAY, HOUR)
    assert [k.state for k in keys] == [KeyState.ACTIVE, KeyState.PREPARED] and not need
    keys, need = plan_rotation([a, b], DAY * 5 / 6, DAY, HOUR)
    assert [(k.kid, k.state) for k in keys] == [("a", KeyState.RETIRED), ("b", KeyState.ACTIVE)]
    retired_at = keys[0].retired_at
    assert retired_at == DAY * 5 / 6
    still, _ = plan_rotation(keys, retired_at + HOUR - 1, DAY, HOUR)
    assert [k.kid for k in still] == ["a", "b"]  # tokens signed by a may still be valid
    dropped, _ = plan_rotation(keys, retired_at + HOUR, DAY, HOUR)
    assert [k.kid for k in dropped] == ["b"]


def test_authority_publishes_the_successor_before_it_signs(tmp_path: Path) -> None:
    store = Datastore(f"sqlite:///{tmp_path / 's.sqlite3'}")
    store.migrate()
    clock = FixedClock()
    keys = MemoryKeyManager()
    ja = JwtAuthority(store, keys, clock, ttl=timedelta(hours=6),
                      max_token_ttl=timedelta(minutes=5))
    kid1, _ = ja.signing_key()
    assert set(ja.published()) == {kid1}
    clock.advance(timedelta(hours=3))
    assert ja.rotate() is True
    published = set(ja.published())
    assert len(published) == 2 and ja.signing_key()[0] == kid1  # prepared, not yet signing
    (kid2,) = published - {kid1}
    clock.advance(timedelta(hours=2))
    ja.rotate()
    assert ja.signing_key()[0] == kid2 and set(ja.published()) == {kid1, kid2}
    clock.advance(timedelta(minutes=5))
    ja.rotate()
    assert set(ja.published()) == {kid2}
    assert len(keys.list_keys()) == 1  # the retired key is destroyed
    # state survives a restart
    again = JwtAuthority(store, keys, clock, ttl=timedelta(hours=6),
                         max_token_ttl=timedelta(minutes=5))
    assert again.signing_key()[0] == kid2
