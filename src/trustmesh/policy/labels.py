"""Kubernetes label selectors (``metav1.LabelSelector``): parsing, validation and matching.

A selector is ``matchLabels`` (a map; every pair must be present) AND'ed with
``matchExpressions`` (``In``, ``NotIn``, ``Exists``, ``DoesNotExist``). An empty
selector matches everything. Pure code: parsing takes already-decoded YAML
values and raises :class:`trustmesh.errors.InvalidInput` with the field path.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from trustmesh.errors import InvalidInput

__all__ = [
    "LabelSelector",
    "Operator",
    "Requirement",
    "parse_label_selector",
    "parse_labels",
    "validate_label_key",
    "validate_label_value",
]

_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class Operator(StrEnum):
    """The four operators of a ``matchExpressions`` requirement."""

    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


def validate_label_key(key: object, field: str) -> str:
    """Check a label key (``[prefix/]name``) the way the API server does; return it."""
    if not isinstance(key, str) or not key:
        raise InvalidInput(f"label key must be a non-empty string, got {key!r}", field=field)
    prefix, sep, name = key.rpartition("/")
    if sep:
        if not prefix or len(prefix) > 253 or not all(
            _DNS_LABEL.match(part) for part in prefix.split(".")
        ):
            raise InvalidInput(
                f"invalid label key {key!r}: prefix must be a DNS subdomain", field=field
            )
    if len(name) > 63 or not _NAME.match(name):
        raise InvalidInput(
            f"invalid label key {key!r}: name must be at most 63 characters, alphanumerics, "
            "'-', '_' or '.', starting and ending with an alphanumeric",
            field=field,
        )
    return key


def validate_label_value(value: object, field: str) -> str:
    """Check a label value (empty, or at most 63 characters of the name alphabet); return it."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise InvalidInput(f"label value must be a string, got {value!r}", field=field)
    if not isinstance(value, str):
        # YAML turns `version: 2` into an int; the API server would refuse it.
        raise InvalidInput(
            f"label value must be a string, got {value!r} (quote it in YAML)", field=field
        )
    if value and (len(value) > 63 or not _NAME.match(value)):
        raise InvalidInput(
            f"invalid label value {value!r}: at most 63 characters, alphanumerics, "
            "'-', '_' or '.', starting and ending with an alphanumeric",
            field=field,
        )
    return value


def parse_labels(data: object, field: str) -> dict[str, str]:
    """Validate a ``labels`` map (``None`` means no labels)."""
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise InvalidInput(f"expected a map of labels, got {type(data).__name__}", field=field)
    out: dict[str, str] = {}
    for key, value in data.items():
        validate_label_key(key, f"{field}.{key}")
        out[key] = validate_label_value(value, f"{field}.{key}")
    return out


@dataclass(frozen=True, slots=True)
class Requirement:
    """One ``matchExpressions`` entry."""

    key: str
    operator: Operator
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether a label set satisfies this requirement."""
        if self.operator is Operator.EXISTS:
            return self.key in labels
        if self.operator is Operator.DOES_NOT_EXIST:
            return self.key not in labels
        present = self.key in labels and labels[self.key] in self.values
        return present if self.operator is Operator.IN else not present

    def describe(self) -> str:
        """Kubernetes' own selector string form, e.g. ``app in (a,b)``."""
        vals = ",".join(sorted(self.values))
        return {
            Operator.IN: f"{self.key} in ({vals})",
            Operator.NOT_IN: f"{self.key} notin ({vals})",
            Operator.EXISTS: self.key,
            Operator.DOES_NOT_EXIST: f"!{self.key}",
        }[self.operator]


@dataclass(frozen=True, slots=True)
class LabelSelector:
    """A parsed ``metav1.LabelSelector``; the empty selector matches every label set."""

    match_labels: tuple[tuple[str, str], ...] = ()
    expressions: tuple[Requirement, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not self.match_labels and not self.expressions

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether a label set is selected."""
        for key, value in self.match_labels:
            if labels.get(key) != value:
                return False
        return all(req.matches(labels) for req in self.expressions)

    def describe(self) -> str:
        """A short human form (``<all>`` for the empty selector)."""
        if self.is_empty:
            return "<all>"
        parts = [f"{k}={v}" for k, v in self.match_labels]
        parts += [req.describe() for req in self.expressions]
        return ",".join(parts)


def _check_fields(data: Mapping[Any, Any], allowed: frozenset[str], field: str) -> None:
    for key in data:
        if key not in allowed:
            sub = f"{field}.{key}" if field else str(key)
            raise InvalidInput(f"unknown field {key!r}", field=sub)


_SELECTOR_FIELDS = frozenset({"matchLabels", "matchExpressions"})
_REQUIREMENT_FIELDS = frozenset({"key", "operator", "values"})


def parse_label_selector(data: object, field: str) -> LabelSelector:
    """Parse and validate a label selector; ``None`` and ``{}`` give the empty selector."""
    if data is None:
        return LabelSelector()
    if not isinstance(data, Mapping):
        raise InvalidInput(
            f"expected a label selector map, got {type(data).__name__}", field=field
        )
    _check_fields(data, _SELECTOR_FIELDS, field)
    match_labels = parse_labels(data.get("matchLabels"), f"{field}.matchLabels")
    raw_exprs = data.get("matchExpressions")
    if raw_exprs is None:
        raw_exprs = []
    if not isinstance(raw_exprs, list):
        raise InvalidInput("expected a list", field=f"{field}.matchExpressions")
    reqs: list[Requirement] = []
    for i, raw in enumerate(raw_exprs):
        reqs.append(_parse_requirement(raw, f"{field}.matchExpressions[{i}]"))
    return LabelSelector(tuple(sorted(match_labels.items())), tuple(reqs))


def _parse_requirement(raw: object, field: str) -> Requirement:
    if not isinstance(raw, Mapping):
        raise InvalidInput("expected a map with key, operator, values", field=field)
    _check_fields(raw, _REQUIREMENT_FIELDS, field)
    key = validate_label_key(raw.get("key"), f"{field}.key")
    op_raw = raw.get("operator")
    try:
        op = Operator(str(op_raw))
    except ValueError:
        raise InvalidInput(
            f"unknown operator {op_raw!r} (expected In, NotIn, Exists or DoesNotExist)",
            field=f"{field}.operator",
        ) from None
    values_raw = raw.get("values")
    if values_raw is None:
        values_raw = []
    if not isinstance(values_raw, list):
        raise InvalidInput("expected a list of strings", field=f"{field}.values")
    values = [validate_label_value(v, f"{field}.values[{j}]") for j, v in enumerate(values_raw)]
    if op in (Operator.IN, Operator.NOT_IN) and not values:
        raise InvalidInput(
            f"operator {op.value} needs a non-empty values list", field=f"{field}.values"
        )
    if op in (Operator.EXISTS, Operator.DOES_NOT_EXIST) and values:
        raise InvalidInput(
            f"operator {op.value} must not have values", field=f"{field}.values"
        )
    return Requirement(key, op, frozenset(values))
