"""The X.509 CA rotation schedule: a pure function of the CA slots and ``now``.

Each slot is one signing CA (an intermediate, with its own self-signed root, or
signed by the upstream CA). A slot lives through three states:

- ``prepared``: created at half of the active CA's life and published in the
  trust bundle at once; it signs nothing yet, so validators learn its root
  before any SVID chains to it;
- ``active``: the one slot that signs. The prepared slot takes over at five
  sixths of the active CA's life, and never before it has been in the bundle
  for the propagation time (unless the active CA has already expired, when
  there is nothing else left to sign with);
- ``old``: the previous active slot. It stays in the bundle, and keeps its CRL
  and OCSP answers, until nothing it signed can still be valid: the latest
  notAfter it issued, at most its own notAfter. Then it is dropped (retired).

The function never touches keys, certificates or the datastore: the caller
feeds it the slots and the latest notAfter each CA signed, and carries out
the plan (creating the new slot, persisting, then switching).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

__all__ = [
    "ACTIVATE_AT",
    "PREPARE_AT",
    "CaSlot",
    "RotationPlan",
    "SlotState",
    "Transition",
    "plan_ca_rotation",
    "retire_due",
]

PREPARE_AT = 1 / 2  # of the active CA's life: create and publish the successor
ACTIVATE_AT = 5 / 6  # of the active CA's life: the successor starts signing


class SlotState(enum.StrEnum):
    PREPARED = "prepared"
    ACTIVE = "active"
    OLD = "old"


@dataclass(frozen=True)
class CaSlot:
    """What the schedule needs to know of one signing CA."""

    ca_id: str
    created_at: datetime  # when the CA certificate was made (its notBefore may be backdated)
    not_after: datetime  # of the signing CA certificate (never after its issuer's)
    state: SlotState
    prepared_at: datetime  # when it was persisted, hence published in the bundle
    activated_at: datetime | None = None
    deactivated_at: datetime | None = None

    @property
    def lifetime(self) -> timedelta:
        return self.not_after - self.created_at

    @property
    def prepare_due(self) -> datetime:
        return self.created_at + self.lifetime * PREPARE_AT

    @property
    def activate_successor_due(self) -> datetime:
        return self.created_at + self.lifetime * ACTIVATE_AT


@dataclass(frozen=True)
class Transition:
    """One change the plan makes, for the log: ``ca_id`` went ``before`` -> ``after``."""

    ca_id: str
    before: SlotState | None  # None: a new slot
    after: SlotState | None  # None: retired (dropped from the bundle)
    reason: str


@dataclass(frozen=True)
class RotationPlan:
    slots: tuple[CaSlot, ...]  # the slots after the plan (without the one to create)
    create: SlotState | None  # a new slot the caller must create in this state, or None
    transitions: tuple[Transition, ...]
    next_check: datetime  # the earliest time the plan may change without new input

    @property
    def changed(self) -> bool:
        return bool(self.transitions)


def retire_due(slot: CaSlot, signed_until: datetime | None,
               propagation: timedelta) -> datetime:
    """When nothing ``slot`` signed can still be valid: the latest notAfter it issued,
    at most its own notAfter.

    It also stays one propagation time after it stopped signing, so that what it
    signed in its last moments (still on the way to the caller) and the
    consumers still using it have time to move on; its own expiry ends it anyway.
    """
    stopped = (slot.deactivated_at or slot.not_after) + propagation
    last = max(signed_until, stopped) if signed_until is not None else stopped
    return min(last, slot.not_after)


def plan_ca_rotation(slots: Sequence[CaSlot], now: datetime, propagation: timedelta,
                     signed_until: Mapping[str, datetime]) -> RotationPlan:
    """Apply the schedule at ``now``.

    ``signed_until`` maps a CA id to the latest notAfter among the certificates it
    signed (absent: it signed nothing the caller knows of).
    """
    out: list[CaSlot] = []
    moves: list[Transition] = []
    for slot in slots:
        if slot.state is SlotState.PREPARED and now >= slot.not_after:
            moves.append(Transition(slot.ca_id, SlotState.PREPARED, None,
                                    "expired before it was activated"))
            continue
        out.append(slot)

    active = next((s for s in out if s.state is SlotState.ACTIVE), None)
    prepared = next((s for s in out if s.state is SlotState.PREPARED), None)
    activate_reason: str | None = None
    if active is not None and now >= active.not_after:
        if prepared is None:
            # Nothing left to sign with: a new CA must sign at once.
            out = [_deactivate(s, now) if s is active else s for s in out]
            moves.append(Transition(active.ca_id, SlotState.ACTIVE, SlotState.OLD,
                                    "expired with no successor prepared"))
            return _finish(out, SlotState.ACTIVE, moves, now, propagation, signed_until)
        activate_reason = "the active CA expired"
    elif active is not None and prepared is not None:
        published_for = now - prepared.prepared_at
        if now >= active.activate_successor_due and published_for >= propagation:
            activate_reason = "the active CA reached 5/6 of its life"
    elif active is None and prepared is not None:
        activate_reason = "no active CA"
    if activate_reason is not None and prepared is not None:
        out = [_activate(s, now) if s is prepared
               else _deactivate(s, now) if s is active else s for s in out]
        if active is not None:
            moves.append(Transition(active.ca_id, SlotState.ACTIVE, SlotState.OLD,
                                    activate_reason))
        moves.append(Transition(prepared.ca_id, SlotState.PREPARED, SlotState.ACTIVE,
                                activate_reason))
        return _finish(out, None, moves, now, propagation, signed_until)

    create: SlotState | None = None
    if active is None and prepared is None:
        create = SlotState.ACTIVE
    elif active is not None and prepared is None and now >= active.prepare_due:
        create = SlotState.PREPARED
    return _finish(out, create, moves, now, propagation, signed_until)


def _activate(slot: CaSlot, now: datetime) -> CaSlot:
    return replace(slot, state=SlotState.ACTIVE, activated_at=now)


def _deactivate(slot: CaSlot, now: datetime) -> CaSlot:
    return replace(slot, state=SlotState.OLD, deactivated_at=now)


def _finish(slots: list[CaSlot], create: SlotState | None, moves: list[Transition],
            now: datetime, propagation: timedelta,
            signed_until: Mapping[str, datetime]) -> RotationPlan:
    kept: list[CaSlot] = []
    for slot in slots:
        if slot.state is SlotState.OLD and now >= retire_due(
                slot, signed_until.get(slot.ca_id), propagation):
            moves.append(Transition(slot.ca_id, SlotState.OLD, None,
                                    "nothing it signed is still valid"))
            continue
        kept.append(slot)
    if create is not None:
        moves.append(Transition("", None, create,
                                "first CA" if create is SlotState.ACTIVE and not kept
                                else "no CA can sign" if create is SlotState.ACTIVE
                                else "the active CA reached half of its life"))
    return RotationPlan(tuple(kept), create, tuple(moves),
                        _next_check(kept, now, propagation, signed_until))


def _next_check(slots: Sequence[CaSlot], now: datetime, propagation: timedelta,
                signed_until: Mapping[str, datetime]) -> datetime:
    times: list[datetime] = []
    active = next((s for s in slots if s.state is SlotState.ACTIVE), None)
    prepared = next((s for s in slots if s.state is SlotState.PREPARED), None)
    if active is not None:
        times.append(active.not_after)
        if prepared is None:
            times.append(active.prepare_due)
        else:
            times.append(max(active.activate_successor_due, prepared.prepared_at + propagation))
    for slot in slots:
        if slot.state is SlotState.OLD:
            times.append(retire_due(slot, signed_until.get(slot.ca_id), propagation))
        elif slot.state is SlotState.PREPARED:
            times.append(slot.not_after)
    future = [t for t in times if t > now]
    return min(future) if future else now + timedelta(hours=1)
