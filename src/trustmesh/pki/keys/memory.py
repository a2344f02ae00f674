"""Key manager that keeps keys in process memory only: nothing ever touches disk.

A server using it gets a new CA on every start (as SPIRE's ``memory`` KeyManager).
"""

from __future__ import annotations

import threading

from trustmesh.pki.keys.base import KeyAlgorithm, SigningKey, generate_software_key
from trustmesh.pki.keys.disk import validate_key_id


class MemoryKeyManager:
    def __init__(self) -> None:
        self._keys: dict[str, SigningKey] = {}
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return "memory"

    def generate_key(self, key_id: str, algorithm: KeyAlgorithm) -> SigningKey:
        validate_key_id(key_id)
        key = generate_software_key(algorithm)
        with self._lock:
            self._keys[key_id] = key
        return key

    def get_key(self, key_id: str) -> SigningKey | None:
        validate_key_id(key_id)
        with self._lock:
            return self._keys.get(key_id)

    def delete_key(self, key_id: str) -> None:
        validate_key_id(key_id)
        with self._lock:
            self._keys.pop(key_id, None)

    def list_keys(self) -> list[str]:
        with self._lock:
            return sorted(self._keys)
