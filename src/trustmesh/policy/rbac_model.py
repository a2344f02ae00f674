"""The objects of Kubernetes RBAC (``rbac.authorization.k8s.io/v1``) and their strict decoding.

Input is what users already keep for Kubernetes: Role, ClusterRole, RoleBinding
and ClusterRoleBinding manifests, in several YAML texts or one multi-document
text, optionally wrapped in a ``v1 List``. Decoding is strict: a field the
Kubernetes schema does not have is refused, with the path of the field. The API
server's defaulting is applied (an omitted ``roleRef.apiGroup`` and User/Group
subject ``apiGroup`` become ``rbac.authorization.k8s.io``; a namespaced object
without ``metadata.namespace`` lands in ``default``, as ``kubectl apply`` would
put it, and a namespace on a cluster-scoped object is dropped, as kubectl drops
it) and then its validation.

Everything here is pure: callers hand in ``(source name, text)`` pairs or
already-decoded documents; reading files is the CLI's business.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import yaml

from trustmesh.errors import InvalidInput
from trustmesh.policy.labels import LabelSelector, parse_label_selector, parse_labels

__all__ = [
    "RBAC_API_VERSION",
    "RBAC_GROUP",
    "Binding",
    "BindingKind",
    "PolicyRule",
    "RbacObjects",
    "Role",
    "RoleKind",
    "RoleRef",
    "Subject",
    "SubjectKind",
    "decode_rbac_documents",
    "load_rbac",
]

RBAC_GROUP = "rbac.authorization.k8s.io"
RBAC_API_VERSION = f"{RBAC_GROUP}/v1"


class RoleKind(StrEnum):
    ROLE = "Role"
    CLUSTER_ROLE = "ClusterRole"


class BindingKind(StrEnum):
    ROLE_BINDING = "RoleBinding"
    CLUSTER_ROLE_BINDING = "ClusterRoleBinding"


class SubjectKind(StrEnum):
    USER = "User"
    GROUP = "Group"
    SERVICE_ACCOUNT = "ServiceAccount"


def _show(values: tuple[str, ...]) -> str:
    return "[" + ",".join(f'"{v}"' if v == "" else v for v in values) + "]"


@dataclass(frozen=True, slots=True)
class PolicyRule:
    """One entry of a role's ``rules``: resource rule or non-resource-URL rule, never both."""

    verbs: tuple[str, ...]
    api_groups: tuple[str, ...] = ()
    resources: tuple[str, ...] = ()
    resource_names: tuple[str, ...] = ()
    non_resource_urls: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, list[str]]:
        """The manifest form (camelCase keys, empty lists left out)."""
        out: dict[str, list[str]] = {}
        for key, values in (
            ("apiGroups", self.api_groups),
            ("resources", self.resources),
            ("resourceNames", self.resource_names),
            ("nonResourceURLs", self.non_resource_urls),
            ("verbs", self.verbs),
        ):
            if values:
                out[key] = list(values)
        return out

    def describe(self) -> str:
        """A one-line human form, e.g. ``apiGroups [""] resources [pods] verbs [get,list]``."""
        parts = []
        for key, values in (
            ("apiGroups", self.api_groups),
            ("resources", self.resources),
            ("resourceNames", self.resource_names),
            ("nonResourceURLs", self.non_resource_urls),
            ("verbs", self.verbs),
        ):
            if values:
                parts.append(f"{key} {_show(values)}")
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class Role:
    """A Role (namespaced) or ClusterRole (``namespace`` is ``""``).

    ``aggregation`` is ``None`` for an ordinary role; for a ClusterRole with an
    ``aggregationRule`` it holds the ``clusterRoleSelectors`` (possibly none), and
    its effective rules are computed from the ClusterRoles they select.
    """

    kind: RoleKind
    name: str
    namespace: str = ""
    rules: tuple[PolicyRule, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    aggregation: tuple[LabelSelector, ...] | None = None

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)

    def describe(self) -> str:
        return f"{self.kind.value} {self.namespace}/{self.name}" if self.namespace else (
            f"{self.kind.value} {self.name}"
        )

    def to_dict(self) -> dict[str, Any]:
        """The manifest form."""
        meta: dict[str, Any] = {"name": self.name}
        if self.namespace:
            meta["namespace"] = self.namespace
        if self.labels:
            meta["labels"] = dict(self.labels)
        out: dict[str, Any] = {"apiVersion": RBAC_API_VERSION, "kind": self.kind.value,
                               "metadata": meta, "rules": [r.to_dict() for r in self.rules]}
        if self.aggregation is not None:
            out["aggregationRule"] = {"clusterRoleSelectors": [
                _selector_dict(s) for s in self.aggregation
            ]}
        return out


def _selector_dict(sel: LabelSelector) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if sel.match_labels:
        out["matchLabels"] = dict(sel.match_labels)
    if sel.expressions:
        out["matchExpressions"] = [
            {"key": r.key, "operator": r.operator.value, **(
                {"values": sorted(r.values)} if r.values else {})}
            for r in sel.expressions
        ]
    return out


@dataclass(frozen=True, slots=True)
class Subject:
    """A binding subject. ``namespace`` is only meaningful for ServiceAccounts."""

    kind: SubjectKind
    name: str
    namespace: str = ""

    def describe(self) -> str:
        if self.kind is SubjectKind.SERVICE_ACCOUNT:
            return f"ServiceAccount {self.namespace}/{self.name}"
        return f"{self.kind.value} {self.name}"

    def to_dict(self) -> dict[str, str]:
        out = {"kind": self.kind.value, "name": self.name}
        if self.kind is SubjectKind.SERVICE_ACCOUNT:
            if self.namespace:
                out["namespace"] = self.namespace
        else:
            out["apiGroup"] = RBAC_GROUP
        return out


@dataclass(frozen=True, slots=True)
class RoleRef:
    """A binding's ``roleRef``; a Role is looked up in the binding's own namespace."""

    kind: RoleKind
    name: str


@dataclass(frozen=True, slots=True)
class Binding:
    """A RoleBinding (``namespace`` set) or ClusterRoleBinding (``namespace`` is ``""``).

    ServiceAccount subjects of a RoleBinding that leave out the namespace are
    stored with the binding's namespace filled in, as the authorizer reads them.
    """

    kind: BindingKind
    name: str
    role_ref: RoleRef
    subjects: tuple[Subject, ...] = ()
    namespace: str = ""
    # Subjects with a namespace that plays no part (User/Group); kept for lint.
    ignored_subject_namespaces: tuple[int, ...] = ()

    def describe(self) -> str:
        return f"{self.kind.value} {self.namespace}/{self.name}" if self.namespace else (
            f"{self.kind.value} {self.name}"
        )

    def role_namespace(self) -> str:
        """Namespace the referenced role lives in (``""`` for a ClusterRole)."""
        return self.namespace if self.role_ref.kind is RoleKind.ROLE else ""

    def to_dict(self) -> dict[str, Any]:
        """The manifest form."""
        meta: dict[str, Any] = {"name": self.name}
        if self.namespace:
            meta["namespace"] = self.namespace
        return {
            "apiVersion": RBAC_API_VERSION,
            "kind": self.kind.value,
            "metadata": meta,
            "roleRef": {"apiGroup": RBAC_GROUP, "kind": self.role_ref.kind.value,
                        "name": self.role_ref.name},
            "subjects": [s.to_dict() for s in self.subjects],
        }


@dataclass(frozen=True, slots=True)
class RbacObjects:
    """A set of roles and bindings, as loaded; no duplicates (kind, namespace, name)."""

    roles: tuple[Role, ...] = ()
    bindings: tuple[Binding, ...] = ()

    def merged(self, other: RbacObjects) -> RbacObjects:
        """Both sets together; a duplicate object is refused."""
        return _build(list(self.roles) + list(other.roles),
                      list(self.bindings) + list(other.bindings))

    def to_dicts(self) -> list[dict[str, Any]]:
        """All objects in manifest form (roles first)."""
        return [r.to_dict() for r in self.roles] + [b.to_dict() for b in self.bindings]


def _build(roles: list[Role], bindings: list[Binding]) -> RbacObjects:
    seen: set[tuple[str, str, str]] = set()
    objs: list[Role | Binding] = [*roles, *bindings]
    for obj in objs:
        ident = (obj.kind.value, obj.namespace, obj.name)
        if ident in seen:
            raise InvalidInput(f"duplicate {obj.describe()}")
        seen.add(ident)
    return RbacObjects(tuple(roles), tuple(bindings))


# --- decoding ---------------------------------------------------------------------------

_META_FIELDS = frozenset({
    "name", "namespace", "labels", "annotations", "uid", "resourceVersion", "generation",
    "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "finalizers",
    "generateName", "managedFields", "ownerReferences", "selfLink",
})
_ROLE_FIELDS = frozenset({"apiVersion", "kind", "metadata", "rules"})
_CLUSTER_ROLE_FIELDS = _ROLE_FIELDS | {"aggregationRule"}
_BINDING_FIELDS = frozenset({"apiVersion", "kind", "metadata", "subjects", "roleRef"})
_RULE_FIELDS = frozenset({"verbs", "apiGroups", "resources", "resourceNames",
                          "nonResourceURLs"})
_SUBJECT_FIELDS = frozenset({"kind", "apiGroup", "name", "namespace"})
_ROLE_REF_FIELDS = frozenset({"apiGroup", "kind", "name"})
_AGGREGATION_FIELDS = frozenset({"clusterRoleSelectors"})
_LIST_FIELDS = frozenset({"apiVersion", "kind", "items", "metadata"})
_KINDS = ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def _fields(data: object, allowed: frozenset[str], path: str) -> Mapping[str, Any]:
    """``data`` as a map whose keys are all in ``allowed`` (``None`` is the empty map)."""
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise InvalidInput(f"expected a map, got {type(data).__name__}", field=path or None)
    for key in data:
        if key not in allowed:
            raise InvalidInput(f"unknown field {key!r}", field=f"{path}.{key}" if path else key)
    return data


def _string(data: object, path: str, *, required: bool = True) -> str:
    if data is None and not required:
        return ""
    if not isinstance(data, str):
        hint = " (quote it in YAML)" if isinstance(data, bool | int | float) else ""
        raise InvalidInput(f"expected a string, got {data!r}{hint}", field=path)
    if required and not data:
        raise InvalidInput("must not be empty", field=path)
    return data


def _strings(data: object, path: str) -> tuple[str, ...]:
    if data is None:
        return ()
    if not isinstance(data, list):
        raise InvalidInput(f"expected a list of strings, got {type(data).__name__}", field=path)
    return tuple(_string(v, f"{path}[{i}]", required=False) for i, v in enumerate(data))


def _rbac_name(data: object, path: str) -> str:
    """Names of RBAC objects are path segments: no '/', no '%', not '.' or '..'."""
    name = _string(data, path)
    if name in (".", "..") or "/" in name or "%" in name:
        raise InvalidInput(f"invalid name {name!r}: may not be '.' or '..' or contain '/' or "
                           "'%'", field=path)
    return name


def _namespace(data: object, path: str) -> str:
    ns = _string(data, path)
    if len(ns) > 63 or not _DNS_LABEL.match(ns):
        raise InvalidInput(f"invalid namespace {ns!r}: must be a DNS label", field=path)
    return ns


def _decode_rule(data: object, path: str, namespaced: bool) -> PolicyRule:
    raw = _fields(data, _RULE_FIELDS, path)
    verbs = _strings(raw.get("verbs"), f"{path}.verbs")
    groups = _strings(raw.get("apiGroups"), f"{path}.apiGroups")
    resources = _strings(raw.get("resources"), f"{path}.resources")
    names = _strings(raw.get("resourceNames"), f"{path}.resourceNames")
    urls = _strings(raw.get("nonResourceURLs"), f"{path}.nonResourceURLs")
    if not verbs:
        raise InvalidInput("verbs must contain at least one value", field=f"{path}.verbs")
    if urls:
        if namespaced:
            raise InvalidInput("namespaced rules cannot apply to non-resource URLs (use a "
                               "ClusterRole)", field=f"{path}.nonResourceURLs")
        if groups or resources or names:
            raise InvalidInput("a rule cannot apply to both regular resources and non-resource "
                               "URLs; split it in two", field=f"{path}.nonResourceURLs")
    else:
        if not groups:
            raise InvalidInput('resource rules must supply at least one api group ("" is the '
                               "core group)", field=f"{path}.apiGroups")
        if not resources:
            raise InvalidInput("resource rules must supply at least one resource",
                               field=f"{path}.resources")
        for i, res in enumerate(resources):
            if not res:
                raise InvalidInput("must not be empty", field=f"{path}.resources[{i}]")
    for i, verb in enumerate(verbs):
        if not verb:
            raise InvalidInput("must not be empty", field=f"{path}.verbs[{i}]")
    return PolicyRule(verbs, groups, resources, names, urls)


def _decode_role(doc: Mapping[str, Any], kind: RoleKind, name: str, namespace: str,
                 labels: dict[str, str]) -> Role:
    namespaced = kind is RoleKind.ROLE
    raw_rules = doc.get("rules")
    if raw_rules is not None and not isinstance(raw_rules, list):
        raise InvalidInput(f"expected a list, got {type(raw_rules).__name__}", field="rules")
    rules = tuple(_decode_rule(r, f"rules[{i}]", namespaced)
                  for i, r in enumerate(raw_rules or []))
    aggregation: tuple[LabelSelector, ...] | None = None
    if doc.get("aggregationRule") is not None:
        agg = _fields(doc["aggregationRule"], _AGGREGATION_FIELDS, "aggregationRule")
        sels = agg.get("clusterRoleSelectors")
        if sels is not None and not isinstance(sels, list):
            raise InvalidInput("expected a list of label selectors",
                               field="aggregationRule.clusterRoleSelectors")
        aggregation = tuple(
            parse_label_selector(s if s is not None else {},
                                 f"aggregationRule.clusterRoleSelectors[{i}]")
            for i, s in enumerate(sels or [])
        )
    return Role(kind, name, namespace, rules, tuple(sorted(labels.items())), aggregation)


def _decode_subject(data: object, path: str, binding_namespace: str) -> tuple[Subject, bool]:
    raw = _fields(data, _SUBJECT_FIELDS, path)
    kind_raw = raw.get("kind")
    try:
        kind = SubjectKind(str(kind_raw))
    except ValueError:
        raise InvalidInput(f"unsupported subject kind {kind_raw!r} (expected User, Group or "
                           "ServiceAccount)", field=f"{path}.kind") from None
    name = _string(raw.get("name"), f"{path}.name")
    api_group = _string(raw.get("apiGroup"), f"{path}.apiGroup", required=False)
    namespace = _string(raw.get("namespace"), f"{path}.namespace", required=False)
    if kind is SubjectKind.SERVICE_ACCOUNT:
        if api_group:
            raise InvalidInput(f'apiGroup must be "" for a ServiceAccount, got {api_group!r}',
                               field=f"{path}.apiGroup")
        if len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
            raise InvalidInput(f"invalid service account name {name!r}: must be a DNS "
                               "subdomain", field=f"{path}.name")
        if not namespace:
            if not binding_namespace:
                raise InvalidInput("a ServiceAccount subject of a ClusterRoleBinding needs a "
                                   "namespace", field=f"{path}.namespace")
            namespace = binding_namespace  # as the authorizer defaults it
        else:
            _namespace(namespace, f"{path}.namespace")
        return Subject(kind, name, namespace), False
    if api_group and api_group != RBAC_GROUP:
        raise InvalidInput(f"apiGroup must be {RBAC_GROUP!r} for a {kind.value}, got "
                           f"{api_group!r}", field=f"{path}.apiGroup")
    return Subject(kind, name), bool(namespace)


def _decode_binding(doc: Mapping[str, Any], kind: BindingKind, name: str,
                    namespace: str) -> Binding:
    ref = _fields(doc.get("roleRef"), _ROLE_REF_FIELDS, "roleRef")
    if not ref:
        raise InvalidInput("roleRef is required", field="roleRef")
    group = _string(ref.get("apiGroup"), "roleRef.apiGroup", required=False) or RBAC_GROUP
    if group != RBAC_GROUP:
        raise InvalidInput(f"apiGroup must be {RBAC_GROUP!r}, got {group!r}",
                           field="roleRef.apiGroup")
    ref_kind_raw = ref.get("kind")
    allowed = ("Role", "ClusterRole") if kind is BindingKind.ROLE_BINDING else ("ClusterRole",)
    if ref_kind_raw not in allowed:
        raise InvalidInput(f"unsupported roleRef kind {ref_kind_raw!r} for a {kind.value} "
                           f"(expected {' or '.join(allowed)})", field="roleRef.kind")
    role_ref = RoleRef(RoleKind(str(ref_kind_raw)), _rbac_name(ref.get("name"), "roleRef.name"))
    raw_subjects = doc.get("subjects")
    if raw_subjects is not None and not isinstance(raw_subjects, list):
        raise InvalidInput(f"expected a list, got {type(raw_subjects).__name__}",
                           field="subjects")
    subjects: list[Subject] = []
    ignored: list[int] = []
    for i, raw in enumerate(raw_subjects or []):
        subject, ns_ignored = _decode_subject(raw, f"subjects[{i}]", namespace)
        subjects.append(subject)
        if ns_ignored:
            ignored.append(i)
    return Binding(kind, name, role_ref, tuple(subjects), namespace, tuple(ignored))


class _Where:
    """Prefix for messages: ``file: document N items[i] (Kind ns/name)``."""

    def __init__(self, source: str, doc: int, item: int | None) -> None:
        self.text = f"{source}: document {doc}" + (f" items[{item}]" if item is not None else "")

    def named(self, kind: str, namespace: str, name: str) -> None:
        self.text += f" ({kind} {namespace + '/' if namespace else ''}{name})"

    def error(self, err: InvalidInput) -> InvalidInput:
        return InvalidInput(err.message, field=f"{self.text}: {err.field}" if err.field
                            else self.text)


def _decode_object(doc: object, where: _Where, roles: list[Role],
                   bindings: list[Binding], seen: set[tuple[str, str, str]]) -> None:
    if not isinstance(doc, Mapping):
        raise where.error(InvalidInput(f"expected a Kubernetes object, got {doc!r:.40}"))
    kind, api = doc.get("kind"), doc.get("apiVersion")
    if kind not in _KINDS:
        raise where.error(InvalidInput(
            f"unsupported kind {kind!r} (expected Role, ClusterRole, RoleBinding, "
            "ClusterRoleBinding or a v1 List of them)", field="kind"))
    if api != RBAC_API_VERSION:
        raise where.error(InvalidInput(
            f"unsupported apiVersion {api!r} for {kind} (expected {RBAC_API_VERSION})",
            field="apiVersion"))
    namespaced = kind in ("Role", "RoleBinding")
    try:
        allowed = {"Role": _ROLE_FIELDS, "ClusterRole": _CLUSTER_ROLE_FIELDS}.get(
            str(kind), _BINDING_FIELDS)
        _fields(doc, allowed, "")
        meta = _fields(doc.get("metadata"), _META_FIELDS, "metadata")
        name = _rbac_name(meta.get("name"), "metadata.name")
        namespace = ""
        if namespaced:
            namespace = _namespace(meta.get("namespace", "default"), "metadata.namespace")
        elif meta.get("namespace") is not None:
            # Cluster-scoped: kubectl drops a namespace here (Helm charts often carry one).
            _string(meta["namespace"], "metadata.namespace", required=False)
        labels = parse_labels(meta.get("labels"), "metadata.labels")
        where.named(str(kind), namespace, name)
        if (str(kind), namespace, name) in seen:
            raise InvalidInput(f"duplicate {kind} {namespace + '/' if namespace else ''}{name}")
        seen.add((str(kind), namespace, name))
        if kind in ("Role", "ClusterRole"):
            roles.append(_decode_role(doc, RoleKind(kind), name, namespace, labels))
        else:
            bindings.append(_decode_binding(doc, BindingKind(kind), name, namespace))
    except InvalidInput as err:
        raise where.error(err) from None


def decode_rbac_documents(docs: Iterable[object], source: str = "<input>") -> RbacObjects:
    """Decode already-parsed YAML/JSON documents (``None`` documents are skipped)."""
    roles: list[Role] = []
    bindings: list[Binding] = []
    _decode_into(docs, source, roles, bindings, set())
    return _build(roles, bindings)


def _decode_into(docs: Iterable[object], source: str, roles: list[Role],
                 bindings: list[Binding], seen: set[tuple[str, str, str]]) -> None:
    number = 0
    for doc in docs:
        if doc is None:
            continue
        number += 1
        if isinstance(doc, Mapping) and doc.get("kind") == "List":
            where = _Where(source, number, None)
            try:
                lst = _fields(doc, _LIST_FIELDS, "")
                if lst.get("apiVersion") != "v1":
                    raise InvalidInput(f"unsupported apiVersion {lst.get('apiVersion')!r} for "
                                       "List (expected v1)", field="apiVersion")
                items = lst.get("items") or []
                if not isinstance(items, list):
                    raise InvalidInput("expected a list", field="items")
            except InvalidInput as err:
                raise where.error(err) from None
            for i, item in enumerate(items):
                _decode_object(item, _Where(source, number, i), roles, bindings, seen)
        else:
            _decode_object(doc, _Where(source, number, None), roles, bindings, seen)


def load_rbac(sources: Sequence[tuple[str, str]]) -> RbacObjects:
    """Decode YAML texts (``(name, text)`` pairs; the name is used in messages).

    Raises InvalidInput whose ``field`` names the source, the document and the
    path of the offending field, e.g. ``rbac.yaml: document 2 (Role default/x): rules[0]``.
    """
    roles: list[Role] = []
    bindings: list[Binding] = []
    seen: set[tuple[str, str, str]] = set()
    for source, text in sources:
        try:
            docs = list(yaml.safe_load_all(text))
        except yaml.YAMLError as err:
            raise InvalidInput(f"not valid YAML: {err}", field=source) from None
        _decode_into(docs, source, roles, bindings, seen)
    return _build(roles, bindings)
