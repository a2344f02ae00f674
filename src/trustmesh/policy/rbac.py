"""Kubernetes RBAC evaluation: may this user do this verb on this resource, and who may.

The semantics are those of the Kubernetes RBAC authorizer:

- ClusterRoleBindings grant everywhere (every namespace, cluster-scoped
  resources, non-resource URLs); RoleBindings grant only for requests in their
  own namespace, whether they refer to a Role there or to a ClusterRole.
- A rule matches when its verbs, apiGroups, resources and (if any)
  resourceNames all match. ``*`` matches any verb, group or resource (including
  subresources); ``pods/log`` names a subresource; ``*/scale`` means the
  ``scale`` subresource of any resource. ``pods/*`` is no wildcard to Kubernetes
  (it matches nothing) and ``rbac lint`` says so. A rule with resourceNames
  never matches a request without a name, such as ``create`` or a plain ``list``.
- nonResourceURLs match exactly, or by prefix when they end in ``*``.
- Subjects match the request's user (User), one of its groups (Group) or the
  user ``system:serviceaccount:<ns>:<name>`` (ServiceAccount).
- Authenticated users are in ``system:authenticated``; service accounts also in
  ``system:serviceaccounts`` and ``system:serviceaccounts:<ns>``; the user
  ``system:anonymous`` is in ``system:unauthenticated``. The authorizer adds
  these groups itself, as the API server's authentication layer does.
- Members of ``system:masters`` are allowed everything, as in Kubernetes
  (where a privileged-group authorizer runs before RBAC).
- A ClusterRole with an ``aggregationRule`` has, as its rules, the rules of
  every other ClusterRole selected by its ``clusterRoleSelectors`` (sorted by
  name, duplicates dropped), as the aggregation controller writes them.
- A binding to a role that does not exist grants nothing and is reported.

Use: build an :class:`Authorizer` once from :class:`RbacObjects` (it is
immutable and safe to share between threads), then call
:meth:`Authorizer.authorize` per request. :func:`default_policy` returns the
roles a fresh trustmesh server starts with.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from trustmesh.errors import InvalidInput, PermissionDenied
from trustmesh.policy.rbac_model import (
    RBAC_API_VERSION,
    RBAC_GROUP,
    Binding,
    BindingKind,
    PolicyRule,
    RbacObjects,
    Role,
    RoleKind,
    RoleRef,
    Subject,
    SubjectKind,
    decode_rbac_documents,
    load_rbac,
)

__all__ = [
    "ANONYMOUS_USER",
    "DEFAULT_POLICY_YAML",
    "RBAC_API_VERSION",
    "RBAC_GROUP",
    "SERVICE_ACCOUNTS_GROUP",
    "SYSTEM_AUTHENTICATED",
    "SYSTEM_MASTERS",
    "SYSTEM_UNAUTHENTICATED",
    "TRUSTMESH_API_GROUP",
    "Authorizer",
    "Binding",
    "BindingId",
    "BindingKind",
    "Decision",
    "Grant",
    "NaiveAuthorizer",
    "PolicyRule",
    "RbacObjects",
    "Request",
    "Role",
    "RoleId",
    "RoleKind",
    "RoleRef",
    "Subject",
    "SubjectKind",
    "WhoCan",
    "decode_rbac_documents",
    "default_policy",
    "effective_groups",
    "load_rbac",
    "resolve_role_rules",
    "service_account_username",
]

SYSTEM_MASTERS = "system:masters"
SYSTEM_AUTHENTICATED = "system:authenticated"
SYSTEM_UNAUTHENTICATED = "system:unauthenticated"
ANONYMOUS_USER = "system:anonymous"
SERVICE_ACCOUNTS_GROUP = "system:serviceaccounts"
_SA_USER_PREFIX = "system:serviceaccount:"
TRUSTMESH_API_GROUP = "trustmesh.io"


def service_account_username(namespace: str, name: str) -> str:
    """The user name a service account authenticates as."""
    return f"{_SA_USER_PREFIX}{namespace}:{name}"


def _service_account_of(user: str) -> tuple[str, str] | None:
    if not user.startswith(_SA_USER_PREFIX):
        return None
    namespace, sep, name = user[len(_SA_USER_PREFIX):].partition(":")
    if not sep or not namespace or not name or ":" in name:
        return None
    return namespace, name


def effective_groups(user: str, groups: Iterable[str] = ()) -> tuple[str, ...]:
    """The groups a request counts as: the ones given plus those authentication implies."""
    out = list(dict.fromkeys(groups))
    implied: list[str] = []
    if user == ANONYMOUS_USER:
        implied.append(SYSTEM_UNAUTHENTICATED)
    else:
        sa = _service_account_of(user)
        if sa is not None:
            implied += [SERVICE_ACCOUNTS_GROUP, f"{SERVICE_ACCOUNTS_GROUP}:{sa[0]}"]
        implied.append(SYSTEM_AUTHENTICATED)
    out += [g for g in implied if g not in out]
    return tuple(out)


# --- requests and answers -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    """The attributes of one API request, as the Kubernetes authorizer sees them.

    A resource request has ``resource`` (``pods``), optionally ``subresource``
    (``log``), ``api_group`` (``""`` is the core group), ``name`` and
    ``namespace`` (``""`` for cluster-scoped resources and collections across
    all namespaces). A non-resource request has ``path`` (``/healthz``) instead.
    ``groups`` are the groups the caller's credential asserts; the implied ones
    are added by the authorizer (:func:`effective_groups`).
    """

    user: str
    verb: str
    resource: str = ""
    subresource: str = ""
    api_group: str = ""
    name: str = ""
    namespace: str = ""
    path: str | None = None
    groups: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.groups, tuple):
            object.__setattr__(self, "groups", tuple(self.groups))
        if not self.user:
            raise InvalidInput("a user is required", field="user")
        if not self.verb:
            raise InvalidInput("a verb is required", field="verb")
        if self.path is not None:
            if self.resource or self.subresource or self.api_group or self.name or (
                    self.namespace):
                raise InvalidInput("a non-resource request has a path and no resource, "
                                   "subresource, apiGroup, name or namespace", field="path")
            if not self.path.startswith("/"):
                raise InvalidInput(f"a non-resource URL starts with '/', got {self.path!r}",
                                   field="path")
        elif not self.resource:
            raise InvalidInput("a resource (or a non-resource URL path) is required",
                               field="resource")
        elif "/" in self.resource or "/" in self.subresource:
            raise InvalidInput("resource and subresource are given separately, without '/'",
                               field="resource")

    @property
    def is_resource_request(self) -> bool:
        return self.path is None

    def describe(self) -> str:
        """E.g. ``get pods/log "web" in namespace default`` or ``get /healthz``."""
        if self.path is not None:
            return f"{self.verb} {self.path}"
        res = self.resource + (f".{self.api_group}" if self.api_group else "")
        if self.subresource:
            res += f"/{self.subresource}"
        text = f"{self.verb} {res}"
        if self.name:
            text += f' "{self.name}"'
        text += f" in namespace {self.namespace}" if self.namespace else " (cluster-wide)"
        return text

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"user": self.user, "groups": list(self.groups), "verb": self.verb}
        if self.path is not None:
            out["nonResourceURL"] = self.path
        else:
            out.update(apiGroup=self.api_group, resource=self.resource,
                       subresource=self.subresource, name=self.name, namespace=self.namespace)
        return out


@dataclass(frozen=True, slots=True)
class BindingId:
    kind: BindingKind
    name: str
    namespace: str = ""

    def describe(self) -> str:
        return f"{self.kind.value} {self.namespace + '/' if self.namespace else ''}{self.name}"

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind.value, "name": self.name, "namespace": self.namespace}


@dataclass(frozen=True, slots=True)
class RoleId:
    kind: RoleKind
    name: str
    namespace: str = ""

    def describe(self) -> str:
        return f"{self.kind.value} {self.namespace + '/' if self.namespace else ''}{self.name}"

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind.value, "name": self.name, "namespace": self.namespace}


@dataclass(frozen=True, slots=True)
class Decision:
    """The verdict on a request and what decided it.

    When allowed by a binding: ``binding``, the ``subject`` of it that matched,
    ``role``, the index of the rule in the role's effective rules and the rule
    (``rule_source`` is the ClusterRole an aggregated rule came from). When
    allowed through ``system:masters`` these are ``None``. ``missing_roles``
    lists bindings that apply to the caller but refer to roles that do not
    exist (they grant nothing).
    """

    allowed: bool
    request: Request
    groups: tuple[str, ...]
    reason: str
    binding: BindingId | None = None
    subject: Subject | None = None
    role: RoleId | None = None
    rule_index: int | None = None
    rule: PolicyRule | None = None
    rule_source: RoleId | None = None
    missing_roles: tuple[BindingId, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "allowed": self.allowed,
            "answer": "yes" if self.allowed else "no",
            "reason": self.reason,
            "request": {**self.request.to_dict(), "effectiveGroups": list(self.groups)},
            "binding": self.binding.to_dict() if self.binding else None,
            "subject": self.subject.to_dict() if self.subject else None,
            "role": self.role.to_dict() if self.role else None,
            "ruleIndex": self.rule_index,
            "rule": self.rule.to_dict() if self.rule else None,
            "ruleSource": self.rule_source.to_dict() if self.rule_source else None,
            "missingRoles": [b.to_dict() for b in self.missing_roles],
        }

    def render_text(self) -> str:
        lines = ["yes" if self.allowed else "no", self.reason]
        if self.rule is not None and self.rule_index is not None and self.role is not None:
            src = ""
            if self.rule_source is not None and self.rule_source != self.role:
                src = f" (aggregated from {self.rule_source.describe()})"
            lines.append(f"rule {self.rule_index} of {self.role.describe()}{src}: "
                         f"{self.rule.describe()}")
        for b in self.missing_roles:
            lines.append(f"warning: {b.describe()} applies but its role does not exist")
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class Grant:
    """One way a subject gets a permission: through ``binding`` -> ``role`` rule ``rule_index``."""

    subject: Subject
    binding: BindingId
    role: RoleId
    rule_index: int

    def to_dict(self) -> dict[str, Any]:
        return {"subject": self.subject.to_dict(), "binding": self.binding.to_dict(),
                "role": self.role.to_dict(), "ruleIndex": self.rule_index}


@dataclass(frozen=True, slots=True)
class WhoCan:
    """Subjects allowed to make a request, with the bindings that grant it."""

    request: Request
    grants: tuple[Grant, ...]
    missing_roles: tuple[BindingId, ...] = ()

    @property
    def subjects(self) -> tuple[Subject, ...]:
        """Distinct subjects, ``system:masters`` first."""
        seen = dict.fromkeys([Subject(SubjectKind.GROUP, SYSTEM_MASTERS)]
                             + [g.subject for g in self.grants])
        return tuple(seen)

    def to_dict(self) -> dict[str, Any]:
        req = self.request.to_dict()
        del req["user"], req["groups"]
        return {
            "request": req,
            "subjects": [s.to_dict() for s in self.subjects],
            "grants": [{"subject": {"kind": "Group", "name": SYSTEM_MASTERS,
                                    "apiGroup": RBAC_GROUP},
                        "binding": None, "role": None, "ruleIndex": None,
                        "builtin": True}]
            + [{**g.to_dict(), "builtin": False} for g in self.grants],
            "missingRoles": [b.to_dict() for b in self.missing_roles],
        }

    def render_text(self) -> str:
        rows = [("SUBJECT", "BINDING", "ROLE"),
                (f"Group {SYSTEM_MASTERS}", "(built in: allowed everything)", "")]
        rows += [(g.subject.describe(), g.binding.describe(),
                  f"{g.role.describe()} rule {g.rule_index}") for g in self.grants]
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        lines = [f"{a:<{w0}}  {b:<{w1}}  {c}".rstrip() for a, b, c in rows]
        for b in self.missing_roles:
            lines.append(f"warning: {b.describe()} refers to a role that does not exist")
        return "\n".join(lines)


# --- role resolution (aggregation) -----------------------------------------------------------

RoleRules = tuple[tuple[PolicyRule, RoleId], ...]
"""A role's effective rules, each with the role it was declared in."""


def _role_id(role: Role) -> RoleId:
    return RoleId(role.kind, role.name, role.namespace)


def resolve_role_rules(objects: RbacObjects) -> dict[RoleId, RoleRules]:
    """Effective rules of every role, with ClusterRole aggregation applied.

    Aggregation runs to a fixed point, so a ClusterRole that aggregates another
    aggregated ClusterRole sees its aggregated rules, as it would once the
    controller has settled.
    """
    out: dict[RoleId, RoleRules] = {
        _role_id(r): tuple((rule, _role_id(r)) for rule in r.rules) for r in objects.roles
    }
    aggregated = sorted((r for r in objects.roles if r.aggregation is not None),
                        key=lambda r: r.name)
    if not aggregated:
        return out
    cluster_roles = sorted((r for r in objects.roles if r.kind is RoleKind.CLUSTER_ROLE),
                           key=lambda r: r.name)
    selected: dict[str, list[list[RoleId]]] = {}
    for agg in aggregated:
        selected[agg.name] = [
            [_role_id(c) for c in cluster_roles
             if c.name != agg.name and sel.matches(c.label_map)]
            for sel in agg.aggregation or ()
        ]
    for _ in range(len(aggregated) + 1):
        changed = False
        for agg in aggregated:
            rules: list[tuple[PolicyRule, RoleId]] = []
            seen: set[PolicyRule] = set()
            for group in selected[agg.name]:
                for rid in group:
                    for rule, src in out[rid]:
                        if rule not in seen:
                            seen.add(rule)
                            rules.append((rule, src))
            new = tuple(rules)
            if out[_role_id(agg)] != new:
                out[_role_id(agg)] = new
                changed = True
        if not changed:
            break
    return out


# --- compiled rules -------------------------------------------------------------------------


class _Rule:
    """A PolicyRule turned into sets and flags for quick matching."""

    __slots__ = ("all_groups", "all_resources", "all_verbs", "groups", "index", "names",
                 "prefixes", "resources", "role", "rule", "source", "urls", "verbs")

    def __init__(self, rule: PolicyRule, index: int, role: RoleId, source: RoleId) -> None:
        self.rule, self.index, self.role, self.source = rule, index, role, source
        self.verbs = frozenset(rule.verbs)
        self.all_verbs = "*" in self.verbs
        self.groups = frozenset(rule.api_groups)
        self.all_groups = "*" in self.groups
        self.resources = frozenset(rule.resources)
        self.all_resources = "*" in self.resources
        self.names = frozenset(rule.resource_names)
        self.urls = frozenset(rule.non_resource_urls)
        self.prefixes = tuple(u[:-1] for u in rule.non_resource_urls if u.endswith("*"))

    def allows(self, req: Request) -> bool:
        if not (self.all_verbs or req.verb in self.verbs):
            return False
        if req.path is not None:
            return "*" in self.urls or req.path in self.urls or any(
                req.path.startswith(p) for p in self.prefixes)
        if not (self.all_groups or req.api_group in self.groups):
            return False
        if not self.all_resources:
            sub = req.subresource
            if sub:
                if f"{req.resource}/{sub}" not in self.resources and (
                        f"*/{sub}" not in self.resources):
                    return False
            elif req.resource not in self.resources:
                return False
        return not self.names or req.name in self.names


@dataclass(frozen=True, slots=True)
class _Bound:
    """A binding with its role's compiled rules; ``rules`` is None when the role is missing."""

    order: int
    binding: Binding
    ident: BindingId
    role: RoleId
    rules: tuple[_Rule, ...] | None


def _compile(objects: RbacObjects) -> tuple[list[_Bound], dict[RoleId, RoleRules]]:
    resolved = resolve_role_rules(objects)
    compiled: dict[RoleId, tuple[_Rule, ...]] = {
        rid: tuple(_Rule(rule, i, rid, src) for i, (rule, src) in enumerate(rules))
        for rid, rules in resolved.items()
    }
    ordered = sorted(objects.bindings, key=lambda b: (
        b.kind is BindingKind.ROLE_BINDING, b.namespace, b.name))
    bound = []
    for order, b in enumerate(ordered):
        rid = RoleId(b.role_ref.kind, b.role_ref.name, b.role_namespace())
        bound.append(_Bound(order, b, BindingId(b.kind, b.name, b.namespace), rid,
                            compiled.get(rid)))
    return bound, resolved


def _subject_applies(subject: Subject, user: str, groups: frozenset[str]) -> bool:
    if subject.kind is SubjectKind.USER:
        return subject.name == user
    if subject.kind is SubjectKind.GROUP:
        return subject.name in groups
    return service_account_username(subject.namespace, subject.name) == user


def _masters_decision(req: Request, groups: tuple[str, ...]) -> Decision:
    return Decision(True, req, groups,
                    f"allowed: {req.user} is in group {SYSTEM_MASTERS}, which may do everything")


def _allow(req: Request, groups: tuple[str, ...], b: _Bound, rule: _Rule,
           gset: frozenset[str], missing: list[BindingId]) -> Decision:
    subject = next(s for s in b.binding.subjects if _subject_applies(s, req.user, gset))
    return Decision(True, req, groups,
                    f"allowed by {b.ident.describe()} (subject {subject.describe()}) "
                    f"-> {b.role.describe()}",
                    b.ident, subject, b.role, rule.index, rule.rule, rule.source,
                    tuple(missing))


def _deny(req: Request, groups: tuple[str, ...], missing: list[BindingId]) -> Decision:
    who = f"user {req.user} (groups: {', '.join(groups) or '-'})"
    return Decision(False, req, groups, f"denied: no RBAC binding grants {req.describe()} "
                    f"to {who}", missing_roles=tuple(missing))


class Authorizer:
    """RBAC evaluator over a fixed set of objects, indexed by subject.

    Built once; never changes afterwards (build a new one when the policy
    changes). A request only looks at the bindings that name its user, one of
    its groups or its service account, so its cost does not grow with the
    number of bindings for other subjects.
    """

    __slots__ = ("_bound", "_cluster", "_namespaced", "_objects", "_resolved")

    def __init__(self, objects: RbacObjects) -> None:
        self._objects = objects
        self._bound, self._resolved = _compile(objects)
        # ("u"|"g", name) -> bindings, and (namespace, "u"|"g", name) -> bindings, each list
        # in evaluation order (bindings were numbered in that order).
        cluster: dict[tuple[str, str], list[_Bound]] = {}
        namespaced: dict[tuple[str, str, str], list[_Bound]] = {}
        for b in self._bound:
            keys: dict[tuple[str, str], None] = {}
            for s in b.binding.subjects:
                if s.kind is SubjectKind.GROUP:
                    keys[("g", s.name)] = None
                elif s.kind is SubjectKind.USER:
                    keys[("u", s.name)] = None
                else:
                    keys[("u", service_account_username(s.namespace, s.name))] = None
            for key in keys:
                if b.binding.kind is BindingKind.CLUSTER_ROLE_BINDING:
                    cluster.setdefault(key, []).append(b)
                else:
                    namespaced.setdefault((b.binding.namespace, *key), []).append(b)
        self._cluster = {k: tuple(v) for k, v in cluster.items()}
        self._namespaced = {k: tuple(v) for k, v in namespaced.items()}

    @property
    def objects(self) -> RbacObjects:
        return self._objects

    @property
    def role_rules(self) -> Mapping[RoleId, RoleRules]:
        """Effective rules per role (after aggregation)."""
        return dict(self._resolved)

    @property
    def missing_role_bindings(self) -> tuple[BindingId, ...]:
        """Bindings whose role does not exist (they grant nothing)."""
        return tuple(b.ident for b in self._bound if b.rules is None)

    def _candidates(self, req: Request, groups: tuple[str, ...]) -> list[_Bound]:
        lists = []
        hit = self._cluster.get(("u", req.user))
        if hit:
            lists.append(hit)
        for g in groups:
            hit = self._cluster.get(("g", g))
            if hit:
                lists.append(hit)
        if req.namespace:
            ns = req.namespace
            hit = self._namespaced.get((ns, "u", req.user))
            if hit:
                lists.append(hit)
            for g in groups:
                hit = self._namespaced.get((ns, "g", g))
                if hit:
                    lists.append(hit)
        if len(lists) == 1:
            return list(lists[0])
        merged = {b.order: b for lst in lists for b in lst}
        return [merged[k] for k in sorted(merged)]

    def authorize(self, request: Request) -> Decision:
        """Decide a request and say why."""
        groups = effective_groups(request.user, request.groups)
        if SYSTEM_MASTERS in groups:
            return _masters_decision(request, groups)
        gset = frozenset(groups)
        missing: list[BindingId] = []
        # RoleBindings only grant in their namespace: the index only offers those of the
        # request's namespace (and none for cluster-scoped or non-resource requests).
        for b in self._candidates(request, groups):
            if b.rules is None:
                missing.append(b.ident)
                continue
            for rule in b.rules:
                if rule.allows(request):
                    return _allow(request, groups, b, rule, gset, missing)
        return _deny(request, groups, missing)

    def allowed(self, request: Request) -> bool:
        """Just the verdict."""
        return self.authorize(request).allowed

    def require(self, request: Request) -> Decision:
        """The decision if allowed; raise PermissionDenied (naming the request) if not."""
        decision = self.authorize(request)
        if not decision.allowed:
            raise PermissionDenied(f"{request.user} may not {request.describe()}")
        return decision

    def who_can(self, verb: str, resource: str = "", *, subresource: str = "",
                api_group: str = "", name: str = "", namespace: str = "",
                path: str | None = None) -> WhoCan:
        """Every subject a binding lets make this request (plus ``system:masters``)."""
        req = Request("<anyone>", verb, resource, subresource, api_group, name, namespace, path)
        verdict: dict[RoleId, _Rule | None] = {}
        grants: list[Grant] = []
        missing: list[BindingId] = []
        for b in self._bound:
            if b.binding.kind is BindingKind.ROLE_BINDING and (
                    not namespace or b.binding.namespace != namespace):
                continue
            if b.rules is None:
                missing.append(b.ident)
                continue
            if b.role not in verdict:
                verdict[b.role] = next((r for r in b.rules if r.allows(req)), None)
            rule = verdict[b.role]
            if rule is None:
                continue
            for s in b.binding.subjects:
                grants.append(Grant(s, b.ident, b.role, rule.index))
        return WhoCan(req, tuple(grants), tuple(missing))


class NaiveAuthorizer:
    """Reference evaluator: scans every binding for every request, matching rules literally.

    Written as a direct reading of the Kubernetes authorizer with no index and
    no precompiled sets, for property tests and the benchmark. Same answers as
    :class:`Authorizer`, including which binding and rule decide.
    """

    def __init__(self, objects: RbacObjects) -> None:
        self._resolved = resolve_role_rules(objects)
        self._bindings = sorted(objects.bindings, key=lambda b: (
            b.kind is BindingKind.ROLE_BINDING, b.namespace, b.name))

    @staticmethod
    def rule_allows(rule: PolicyRule, req: Request) -> bool:
        """Literal form of the upstream rule match."""
        if not any(v in ("*", req.verb) for v in rule.verbs):
            return False
        if req.path is not None:
            for url in rule.non_resource_urls:
                if url in ("*", req.path):
                    return True
                if url.endswith("*") and req.path.startswith(url[:-1]):
                    return True
            return False
        if not any(g in ("*", req.api_group) for g in rule.api_groups):
            return False
        combined = req.resource + (f"/{req.subresource}" if req.subresource else "")
        resource_ok = False
        for res in rule.resources:
            if res in ("*", combined):
                resource_ok = True
                break
            if req.subresource and res == "*/" + req.subresource:
                resource_ok = True
                break
        if not resource_ok:
            return False
        return not rule.resource_names or req.name in rule.resource_names

    def authorize(self, request: Request) -> Decision:
        groups = effective_groups(request.user, request.groups)
        if SYSTEM_MASTERS in groups:
            return _masters_decision(request, groups)
        gset = frozenset(groups)
        missing: list[BindingId] = []
        for b in self._bindings:
            if b.kind is BindingKind.ROLE_BINDING and (
                    not request.namespace or b.namespace != request.namespace):
                continue
            subject = next((s for s in b.subjects
                            if _subject_applies(s, request.user, gset)), None)
            if subject is None:
                continue
            rid = RoleId(b.role_ref.kind, b.role_ref.name, b.role_namespace())
            ident = BindingId(b.kind, b.name, b.namespace)
            rules = self._resolved.get(rid)
            if rules is None:
                missing.append(ident)
                continue
            for i, (rule, src) in enumerate(rules):
                if self.rule_allows(rule, request):
                    return Decision(True, request, groups,
                                    f"allowed by {ident.describe()} (subject "
                                    f"{subject.describe()}) -> {rid.describe()}",
                                    ident, subject, rid, i, rule, src, tuple(missing))
        return _deny(request, groups, missing)


# --- trustmesh's own defaults -----------------------------------------------------------------

DEFAULT_POLICY_YAML = """\
# Roles a new trustmesh server creates on first start. The admin API checks
# every call against them: apiGroup trustmesh.io, resources named after the
# API's nouns (entries, agents, tokens, certificates, ca, bundles, audit, svids).
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: trustmesh:admin
  labels: {trustmesh.io/bootstrapping: rbac-defaults}
rules:
- apiGroups: [trustmesh.io]
  resources: ["*"]
  verbs: ["*"]
---
# Read-only, and without join tokens (they are secrets).
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: trustmesh:viewer
  labels: {trustmesh.io/bootstrapping: rbac-defaults}
rules:
- apiGroups: [trustmesh.io]
  resources: [entries, agents, certificates, ca, bundles, audit]
  verbs: [get, list, watch]
---
# What a node agent needs: the entries it may serve, the bundle, and SVID signing.
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: trustmesh:agent
  labels: {trustmesh.io/bootstrapping: rbac-defaults}
rules:
- apiGroups: [trustmesh.io]
  resources: [entries, bundles, ca]
  verbs: [get, list, watch]
- apiGroups: [trustmesh.io]
  resources: [svids]
  verbs: [create]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: trustmesh:admins
  labels: {trustmesh.io/bootstrapping: rbac-defaults}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: trustmesh:admin}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: Group, name: trustmesh:admins}
"""


def default_policy() -> RbacObjects:
    """The roles and binding a fresh trustmesh server creates (see DEFAULT_POLICY_YAML)."""
    return load_rbac([("<default policy>", DEFAULT_POLICY_YAML)])
