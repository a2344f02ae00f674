"""Problems in a set of RBAC objects that load fine but do not do what was meant.

Warnings are things that grant less (or other) than they seem to: a binding to
a role that does not exist, ``pods/*`` (no wildcard to Kubernetes), resourceNames
with ``create``, non-resource rules reached through a RoleBinding. Notes
(severity ``info``) are worth a look but often intended.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from trustmesh.policy.rbac import Authorizer, BindingId
from trustmesh.policy.rbac_model import BindingKind, RbacObjects, RoleKind

__all__ = ["KNOWN_VERBS", "Finding", "lint"]

Severity = Literal["warning", "info"]

KNOWN_VERBS = frozenset({
    "get", "list", "watch", "create", "update", "patch", "delete", "deletecollection",
    "use", "bind", "escalate", "impersonate", "approve", "sign", "proxy", "attest",
    # HTTP methods, for nonResourceURLs
    "post", "put", "head", "options",
})


@dataclass(frozen=True, slots=True)
class Finding:
    severity: Severity
    code: str
    object: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"severity": self.severity, "code": self.code, "object": self.object,
                "message": self.message}


def lint(objects: RbacObjects) -> list[Finding]:
    """Every finding, warnings first, in a stable order."""
    out: list[Finding] = []
    authz = Authorizer(objects)
    missing = set(authz.missing_role_bindings)
    roles = {(r.kind, r.namespace, r.name): r for r in objects.roles}
    referenced: set[tuple[RoleKind, str, str]] = set()
    for b in objects.bindings:
        ident = BindingId(b.kind, b.name, b.namespace)
        where = b.describe()
        ref_ns = b.role_namespace()
        referenced.add((b.role_ref.kind, ref_ns, b.role_ref.name))
        if ident in missing:
            target = f"{b.role_ref.kind.value} {ref_ns + '/' if ref_ns else ''}{b.role_ref.name}"
            out.append(Finding("warning", "missing-role", where,
                               f"roleRef names {target}, which does not exist; the binding "
                               "grants nothing"))
        if not b.subjects:
            out.append(Finding("warning", "no-subjects", where,
                               "the binding has no subjects and grants nothing"))
        for i in b.ignored_subject_namespaces:
            s = b.subjects[i]
            out.append(Finding("info", "subject-namespace-ignored", where,
                               f"subjects[{i}] ({s.describe()}): namespace plays no part for "
                               f"a {s.kind.value}"))
        role = roles.get((b.role_ref.kind, ref_ns, b.role_ref.name))
        if (b.kind is BindingKind.ROLE_BINDING and role is not None
                and any(r.non_resource_urls for r in role.rules)):
            out.append(Finding("warning", "nonresource-via-rolebinding", where,
                               f"{role.describe()} has nonResourceURLs rules; they only grant "
                               "through a ClusterRoleBinding"))
    aggregated_into: set[str] = set()
    rules_of = authz.role_rules
    for rid, rules in rules_of.items():
        for _, src in rules:
            if src != rid:
                aggregated_into.add(src.name)
    for r in objects.roles:
        where = r.describe()
        if r.aggregation is not None and r.rules:
            out.append(Finding("warning", "aggregated-rules-replaced", where,
                               "a ClusterRole with an aggregationRule gets its rules from the "
                               "roles it selects; the rules written here are replaced"))
        for i, rule in enumerate(r.rules):
            path = f"rules[{i}]"
            for res in rule.resources:
                if res.endswith("/*") and res != "*/*":
                    out.append(Finding("warning", "subresource-wildcard", where,
                                       f"{path}: {res!r} matches nothing: Kubernetes has no "
                                       f"'resource/*' wildcard; list the subresources "
                                       f"({res[:-1]}log, ...) or use '*/<subresource>'"))
            if rule.resource_names:
                bad = [v for v in rule.verbs if v in ("create", "deletecollection")]
                if bad:
                    out.append(Finding("warning", "resource-names-unnamed-verb", where,
                                       f"{path}: {', '.join(bad)} requests carry no name, so "
                                       "resourceNames make this verb match nothing"))
                if "" in rule.resource_names:
                    out.append(Finding("info", "empty-resource-name", where,
                                       f'{path}: resourceNames contains ""'))
            for url in rule.non_resource_urls:
                if url != "*" and (not url.startswith("/") or "*" in url[:-1]):
                    out.append(Finding("warning", "nonresource-url-pattern", where,
                                       f"{path}: {url!r}: a non-resource URL starts with '/' "
                                       "and may only end in '*'"))
            odd = [v for v in rule.verbs if v != "*" and v not in KNOWN_VERBS]
            if odd:
                out.append(Finding("info", "unusual-verb", where,
                                   f"{path}: verbs {', '.join(odd)} are not Kubernetes verbs "
                                   "(verbs are lower case: get, list, create, ...)"))
        key = (r.kind, r.namespace, r.name)
        if key not in referenced and r.name not in aggregated_into and (
                r.kind is not RoleKind.CLUSTER_ROLE or not r.labels):
            out.append(Finding("info", "unused-role", where, "no binding refers to this role"))
    out.sort(key=lambda f: (f.severity != "warning", f.object, f.code))
    return out
