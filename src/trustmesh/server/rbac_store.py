"""The RBAC policy that guards the remote admin API, kept in the datastore.

A fresh server stores trustmesh's default policy (admin, viewer and agent
roles; admins are the group ``trustmesh:admins``). Replacing the policy is
all or nothing: the new YAML is parsed and checked before it is stored.
"""

from __future__ import annotations

import threading
from typing import Any

from trustmesh.log import get_logger
from trustmesh.policy.rbac import DEFAULT_POLICY_YAML, Authorizer, load_rbac
from trustmesh.store.datastore import Datastore

__all__ = ["RbacPolicyStore"]

log = get_logger("trustmesh.server.rbac")

_SETTING = "rbac.policy"


class RbacPolicyStore:
    def __init__(self, store: Datastore) -> None:
        self.store = store
        self._lock = threading.Lock()
        text = store.get_setting(_SETTING)
        if text is None:
            store.put_settings({_SETTING: DEFAULT_POLICY_YAML})
            log.info("created the default RBAC policy")
            text = DEFAULT_POLICY_YAML
        self._text = text
        self._authorizer = Authorizer(load_rbac([("<stored RBAC policy>", text)]))

    def authorizer(self) -> Authorizer:
        """The authorizer for the stored policy (re-read if another replica changed it)."""
        text = self.store.get_setting(_SETTING)
        if text is not None and text != self._text:
            with self._lock:
                self._authorizer = Authorizer(load_rbac([("<stored RBAC policy>", text)]))
                self._text = text
        return self._authorizer

    def yaml(self) -> str:
        return self._text

    def replace(self, text: str, actor: str) -> dict[str, Any]:
        objects = load_rbac([("policy", text)])  # InvalidInput names the offending field
        authorizer = Authorizer(objects)
        missing = [str(b) for b in authorizer.missing_role_bindings]
        with self._lock:
            self.store.put_settings({_SETTING: text})
            self._text = text
            self._authorizer = authorizer
        log.info("replaced the RBAC policy", extra={"actor": actor})
        return {"applied": True, "bindings_to_missing_roles": missing}
