"""The X.509 CA rotation schedule as a table: ``now`` moves through a CA's life."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from trustmesh.server.ca_rotation import (
    CaSlot,
    SlotState,
    Transition,
    plan_ca_rotation,
    retire_due,
)

T0 = datetime(2030, 1, 1, tzinfo=UTC)
LIFE = timedelta(hours=60)  # 1/2 = 30h, 5/6 = 50h
PROP = timedelta(hours=1)
H = timedelta(hours=1)


def active(ca_id: str = "a", start: datetime = T0, life: timedelta = LIFE) -> CaSlot:
    return CaSlot(ca_id, start, start + life, SlotState.ACTIVE, prepared_at=start,
                  activated_at=start)


def prepared(ca_id: str = "b", at: datetime = T0 + 30 * H) -> CaSlot:
    return CaSlot(ca_id, at, at + LIFE, SlotState.PREPARED, prepared_at=at)


def states(slots: tuple[CaSlot, ...]) -> list[tuple[str, str]]:
    return [(s.ca_id, s.state.value) for s in slots]


def test_first_start_creates_an_active_ca() -> None:
    plan = plan_ca_rotation([], T0, PROP, {})
    assert plan.create is SlotState.ACTIVE and plan.slots == ()
    assert plan.transitions == (Transition("", None, SlotState.ACTIVE, "first CA"),)


@pytest.mark.parametrize("hours,create", [
    (0, None), (29, None), (29.99, None), (30, SlotState.PREPARED), (45, SlotState.PREPARED),
])
def test_the_successor_is_prepared_at_half_of_the_active_life(hours: float,
                                                              create: SlotState | None) -> None:
    plan = plan_ca_rotation([active()], T0 + hours * H, PROP, {})
    assert plan.create is create
    assert states(plan.slots) == [("a", "active")]
    if create is None:
        assert plan.next_check == T0 + 30 * H and not plan.changed


@pytest.mark.parametrize("hours,signing", [(30, "a"), (49.99, "a"), (50, "b"), (55, "b")])
def test_the_successor_signs_from_five_sixths(hours: float, signing: str) -> None:
    plan = plan_ca_rotation([active(), prepared()], T0 + hours * H, PROP, {})
    assert plan.create is None
    now_active = [s.ca_id for s in plan.slots if s.state is SlotState.ACTIVE]
    assert now_active == [signing]
    if signing == "b":
        assert states(plan.slots) == [("a", "old"), ("b", "active")]
        old = plan.slots[0]
        assert old.deactivated_at == T0 + hours * H
        assert plan.slots[1].activated_at == T0 + hours * H
    else:
        assert plan.next_check == T0 + 50 * H


def test_no_activation_before_the_propagation_time() -> None:
    # The server was down at half-life: the successor is prepared late, at 49.5h.
    late = prepared(at=T0 + 49.5 * H)
    plan = plan_ca_rotation([active(), late], T0 + 50 * H, PROP, {})
    assert states(plan.slots) == [("a", "active"), ("b", "prepared")]
    assert plan.next_check == T0 + 50.5 * H
    plan = plan_ca_rotation([active(), late], T0 + 50.5 * H, PROP, {})
    assert states(plan.slots) == [("a", "old"), ("b", "active")]


def test_an_expired_active_ca_hands_over_even_before_the_propagation_time() -> None:
    late = prepared(at=T0 + 59.9 * H)
    plan = plan_ca_rotation([active(), late], T0 + 60 * H, PROP, {})
    # a is past its notAfter: it is retired in the same step, b signs
    assert states(plan.slots) == [("b", "active")]
    assert [(t.ca_id, t.after) for t in plan.transitions] == [
        ("a", SlotState.OLD), ("b", SlotState.ACTIVE), ("a", None)]
    assert plan.transitions[0].reason == "the active CA expired"


def test_an_expired_active_ca_without_successor_gets_a_new_active_one() -> None:
    plan = plan_ca_rotation([active()], T0 + 61 * H, PROP, {})
    assert plan.create is SlotState.ACTIVE and plan.slots == ()


def test_the_old_ca_stays_until_what_it_signed_has_expired() -> None:
    swapped = plan_ca_rotation([active(), prepared()], T0 + 50 * H, PROP, {}).slots
    signed = {"a": T0 + 55 * H}  # the last SVID it signed ends at 55h
    for hours, kept in [(51, True), (54.99, True), (55, False)]:
        plan = plan_ca_rotation(swapped, T0 + hours * H, PROP, signed)
        assert ("a" in [s.ca_id for s in plan.slots]) is kept, hours
    assert plan_ca_rotation(swapped, T0 + 52 * H, PROP, signed).next_check == T0 + 55 * H
    retired = plan_ca_rotation(swapped, T0 + 55 * H, PROP, signed)
    assert retired.transitions == (Transition("a", SlotState.OLD, None,
                                              "nothing it signed is still valid"),)


def test_retirement_is_capped_at_the_ca_expiry_and_waits_one_propagation_time() -> None:
    old = replace(active(), state=SlotState.OLD, deactivated_at=T0 + 50 * H)
    assert retire_due(old, None, PROP) == T0 + 51 * H  # signed nothing: one propagation time
    assert retire_due(old, T0 + 50.2 * H, PROP) == T0 + 51 * H
    assert retire_due(old, T0 + 58 * H, PROP) == T0 + 58 * H
    assert retire_due(old, T0 + 99 * H, PROP) == T0 + 60 * H  # never after its own notAfter


def test_the_next_rotation_follows_the_new_active_ca() -> None:
    slots = plan_ca_rotation([active(), prepared()], T0 + 50 * H, PROP, {}).slots
    slots = plan_ca_rotation(slots, T0 + 52 * H, PROP, {}).slots
    assert states(slots) == [("b", "active")]
    # b was created at 30h: it prepares its successor at 60h and hands over at 80h
    assert plan_ca_rotation(slots, T0 + 59 * H, PROP, {}).create is None
    assert plan_ca_rotation(slots, T0 + 60 * H, PROP, {}).create is SlotState.PREPARED


def test_upstream_slots_follow_the_same_schedule_with_capped_lifetimes() -> None:
    # Upstream mode: each slot is an intermediate whose notAfter the upstream CA may cap.
    capped = active(life=timedelta(hours=12))  # upstream expires 12h after creation
    assert plan_ca_rotation([capped], T0 + 5 * H, PROP, {}).create is None
    assert plan_ca_rotation([capped], T0 + 6 * H, PROP, {}).create is SlotState.PREPARED
    nxt = prepared(at=T0 + 6 * H)
    plan = plan_ca_rotation([capped, nxt], T0 + 10 * H, PROP, {})
    assert states(plan.slots) == [("a", "old"), ("b", "active")]


def test_a_prepared_ca_that_expired_unused_is_dropped() -> None:
    stale = CaSlot("b", T0, T0 + H, SlotState.PREPARED, prepared_at=T0)
    plan = plan_ca_rotation([stale], T0 + 2 * H, PROP, {})
    assert plan.slots == () and plan.create is SlotState.ACTIVE


def test_restart_from_persisted_slots_gives_the_same_plan() -> None:
    # The plan depends only on the slots and now: reloading them changes nothing.
    slots = [replace(active(), state=SlotState.OLD, deactivated_at=T0 + 50 * H),
             replace(prepared(), state=SlotState.ACTIVE, activated_at=T0 + 50 * H)]
    first = plan_ca_rotation(slots, T0 + 50.5 * H, PROP, {"a": T0 + 52 * H})
    again = plan_ca_rotation(list(first.slots), T0 + 50.5 * H, PROP, {"a": T0 + 52 * H})
    assert first == again and not first.changed
    assert first.next_check == T0 + 52 * H


def test_no_active_but_a_prepared_ca_activates_it() -> None:
    plan = plan_ca_rotation([prepared()], T0 + 30 * H, PROP, {})
    assert states(plan.slots) == [("b", "active")]
