"""The seam between the CA and wherever its private keys live.

A key manager hands out objects that ``cryptography``'s builders accept as
signing keys (``CertificateBuilder.sign``, ``CertificateRevocationListBuilder.sign``,
``OCSPResponseBuilder.sign``). For keys held in memory or on disk these are the
library's own key objects; for an HSM they are subclasses of the same abstract
classes whose ``sign`` asks the token, so the private key never leaves it.
"""

from __future__ import annotations

import enum
from typing import Protocol, runtime_checkable

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from trustmesh.errors import InvalidInput

__all__ = ["KeyAlgorithm", "KeyManager", "SigningKey", "generate_software_key"]

SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class KeyAlgorithm(enum.StrEnum):
    """Key types a CA (or an OCSP responder) may use."""

    EC_P256 = "ec-p256"
    EC_P384 = "ec-p384"
    RSA_2048 = "rsa-2048"
    RSA_3072 = "rsa-3072"
    RSA_4096 = "rsa-4096"

    @classmethod
    def parse(cls, value: str) -> KeyAlgorithm:
        try:
            return cls(value.lower())
        except ValueError:
            allowed = ", ".join(a.value for a in cls)
            raise InvalidInput(f"unknown key algorithm {value!r}; use one of {allowed}") from None

    @property
    def is_rsa(self) -> bool:
        return self.value.startswith("rsa-")

    @property
    def rsa_bits(self) -> int:
        return int(self.value.split("-")[1])

    @property
    def curve(self) -> ec.EllipticCurve:
        if self is KeyAlgorithm.EC_P256:
            return ec.SECP256R1()
        if self is KeyAlgorithm.EC_P384:
            return ec.SECP384R1()
        raise ValueError(f"{self.value} is not an elliptic-curve algorithm")


def generate_software_key(algorithm: KeyAlgorithm) -> SigningKey:
    """A fresh key from the library's CSPRNG (memory and disk managers use this)."""
    if algorithm.is_rsa:
        return rsa.generate_private_key(public_exponent=65537, key_size=algorithm.rsa_bits)
    return ec.generate_private_key(algorithm.curve)


@runtime_checkable
class KeyManager(Protocol):
    """Where CA keys are generated, kept and used. Key ids are short ASCII names."""

    @property
    def name(self) -> str:
        """The kind of manager: ``memory``, ``disk`` or ``pkcs11``."""
        ...

    def generate_key(self, key_id: str, algorithm: KeyAlgorithm) -> SigningKey:
        """Create a key under ``key_id``, replacing any key of that id, and return it."""
        ...

    def get_key(self, key_id: str) -> SigningKey | None:
        """The key stored under ``key_id``, or None when there is none."""
        ...

    def delete_key(self, key_id: str) -> None:
        """Destroy the key; a missing key is not an error."""
        ...

    def list_keys(self) -> list[str]:
        """Ids of all keys this manager holds, sorted."""
        ...
