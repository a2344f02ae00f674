"""Key manager backed by a PKCS#11 token: an HSM, or SoftHSM for development.

Private keys are generated on the token as persistent objects that are
sensitive and not extractable; they never leave it. ``get_key`` returns
objects that subclass ``cryptography``'s abstract ``EllipticCurvePrivateKey``
or ``RSAPrivateKey``. cryptography's builders (certificates, CRLs, OCSP
responses, CSRs) accept such objects and call their Python ``sign`` method
with the complete to-be-signed bytes, so these classes hash the data here and
ask the token to sign the digest (``CKM_ECDSA`` / ``CKM_RSA_PKCS`` /
``CKM_RSA_PKCS_PSS``); only a few dozen bytes cross the PKCS#11 boundary,
however large the CRL. (PKCS#1 v1.5 is deterministic: ``CKM_RSA_PKCS`` over the
DigestInfo gives the same bytes as ``CKM_SHA256_RSA_PKCS`` over the data.)
cryptography embeds whatever ``sign`` returns without checking it, so every
signature from the token is verified with the public key before it is returned.

Objects on the token: a private and a public key with ``CKA_LABEL`` set to the
key id and ``CKA_ID`` set to its ASCII bytes. Only pairs marked this way are
listed, replaced or deleted, so other objects on a shared token are left alone.

The ``pkcs11`` package (python-pkcs11) is imported only when a manager is
created, so importing trustmesh never needs a PKCS#11 library.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    NoDigestInfo,
    Prehashed,
    encode_dss_signature,
)
from cryptography.utils import Buffer

from trustmesh.errors import (
    ConfigError,
    InternalError,
    InvalidInput,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from trustmesh.pki.keys.base import KeyAlgorithm, SigningKey
from trustmesh.pki.keys.disk import validate_key_id

if TYPE_CHECKING:
    from cryptography.hazmat.primitives import _serialization
    from pkcs11 import Object, Session

__all__ = ["PKCS11ECPrivateKey", "PKCS11KeyManager", "PKCS11RSAPrivateKey"]

_T = TypeVar("_T")

# DER encodings of the namedCurve OIDs a token reports in CKA_EC_PARAMS.
_CURVE_PARAMS: dict[bytes, ec.EllipticCurve] = {
    bytes.fromhex("06082a8648ce3d030107"): ec.SECP256R1(),
    bytes.fromhex("06052b81040022"): ec.SECP384R1(),
    bytes.fromhex("06052b81040023"): ec.SECP521R1(),
}
_PARAMS_FOR_CURVE = {type(curve): der for der, curve in _CURVE_PARAMS.items()}

# DER prefix of the DigestInfo (RFC 8017, section 9.2) that CKM_RSA_PKCS signs.
_DIGEST_INFO_PREFIX = {
    "sha224": bytes.fromhex("302d300d06096086480165030402040500041c"),
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}


# PKCS#11 login state belongs to the application, not to a session: after one
# C_Login every session on the token is logged in, a second C_Login answers
# "already logged in" whatever the PIN, and logging out (python-pkcs11 does so
# when it closes a session that logged in) logs every session out. So managers
# on the same token share one login session, counted, and a later manager's PIN
# is checked against a keyed hash of the PIN that logged in.
_LOGIN_SALT = secrets.token_bytes(32)


class _Login:
    def __init__(self, session: Session, pin_tag: bytes) -> None:
        self.session = session
        self.pin_tag = pin_tag
        self.users = 0


_LoginKey = tuple[str, str, bytes]  # module path, token label, token serial
_LOGINS: dict[_LoginKey, _Login] = {}
_LOGINS_LOCK = threading.Lock()


def _pin_tag(pin: str) -> bytes:
    return hmac.new(_LOGIN_SALT, pin.encode("utf-8"), hashlib.sha256).digest()


def _release_login(key: _LoginKey) -> None:
    import pkcs11.exceptions as p11

    with _LOGINS_LOCK:
        login = _LOGINS.get(key)
        if login is None:
            return
        login.users -= 1
        if login.users > 0:
            return
        del _LOGINS[key]
        try:
            login.session.close()
        except p11.PKCS11Error:
            # The library was finalized under us (or the token is gone): nothing to log out.
            pass


def _describe(exc: BaseException) -> str:
    """python-pkcs11 exceptions often have no message; their class names the CKR_ code."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _Token:
    """One logged-in read/write session on a token, used under a lock.

    PKCS#11 sessions must not be used by two threads at once; every call that
    touches the session goes through :meth:`run`.
    """

    def __init__(self, session: Session, label: str, login_key: _LoginKey) -> None:
        self.session = session
        self.label = label
        self.login_key = login_key
        self.lock = threading.RLock()
        self.closed = False

    def run(self, what: str, call: Callable[[Session], _T]) -> _T:
        """Run ``call(session)`` under the lock, turning token errors into ours."""
        import pkcs11.exceptions as p11

        with self.lock:
            if self.closed:
                raise Unavailable(f"the session on PKCS#11 token {self.label!r} is closed")
            try:
                return call(self.session)
            except (
                p11.ArgumentsBad,
                p11.DataLenRange,
                p11.KeySizeRange,
                p11.MechanismInvalid,
                p11.MechanismParamInvalid,
                p11.DomainParamsInvalid,
            ) as exc:
                # The token refused what we asked for, not a failure of the token itself.
                raise InvalidInput(
                    f"PKCS#11 token {self.label!r} cannot {what}: {_describe(exc)}"
                ) from None
            except p11.PKCS11Error as exc:
                raise Unavailable(
                    f"PKCS#11 token {self.label!r} failed to {what}: {_describe(exc)}"
                ) from None

    def close(self) -> None:
        import pkcs11.exceptions as p11

        with self.lock:
            if self.closed:
                return
            self.closed = True
            try:
                self.session.close()
            except p11.PKCS11Error:
                # The library was finalized under us (or the token is gone): nothing to close.
                pass
        _release_login(self.login_key)


class _TokenKey:
    """What the EC and RSA key classes share: where the private key lives and its public half."""

    def __init__(self, token: _Token, key_id: str, private: Any) -> None:
        self._token = token
        self._key_id = key_id
        # A pkcs11.PrivateKey with the sign capability (typed Any: its SignMixin is dynamic).
        self._private = private

    @property
    def key_id(self) -> str:
        """The key's id (its CKA_LABEL) on the token."""
        return self._key_id

    @property
    def token_label(self) -> str:
        """The label of the token that holds the key."""
        return self._token.label

    def _sign_on_token(self, data: bytes, mechanism: Any, param: Any = None) -> bytes:
        import pkcs11.exceptions as p11

        def sign(_session: Session) -> bytes:
            try:
                signature: bytes = self._private.sign(
                    data, mechanism=mechanism, mechanism_param=param
                )
                return signature
            except (p11.ObjectHandleInvalid, p11.KeyHandleInvalid):
                raise NotFound(
                    f"key {self._key_id} is no longer on PKCS#11 token {self._token.label!r} "
                    "(deleted or replaced); fetch it again"
                ) from None

        return self._token.run(f"sign with key {self._key_id}", sign)

    def _check(self, verify: Callable[[], None]) -> None:
        """Verify a signature the token made before anyone sees it.

        cryptography's builders embed whatever ``sign`` returns without checking
        it; a faulty RSA signature can even leak the private key. Verifying with
        the public key costs far less than the token's signature did.
        """
        try:
            verify()
        except InvalidSignature:
            raise InternalError(
                f"PKCS#11 token {self._token.label!r} returned a signature that does not "
                f"verify with the public key of {self._key_id}; refusing to use it"
            ) from None

    def _refuse(self, what: str) -> NoReturn:
        raise PermissionDenied(
            f"key {self._key_id} lives on PKCS#11 token {self._token.label!r} and cannot be "
            f"{what}: the private key never leaves the token"
        )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._key_id!r} on token {self._token.label!r}>"


def _digest(
    data: bytes, algorithm: Prehashed | hashes.HashAlgorithm
) -> tuple[hashes.HashAlgorithm, bytes]:
    """The hash and the digest of ``data`` (``data`` itself when prehashed)."""
    if isinstance(algorithm, Prehashed):
        inner: hashes.HashAlgorithm = algorithm._algorithm
        if len(data) != algorithm.digest_size:
            raise InvalidInput(
                f"a prehashed {inner.name} digest is {algorithm.digest_size} bytes, got {len(data)}"
            )
        return inner, bytes(data)
    h = hashes.Hash(algorithm)
    h.update(data)
    return algorithm, h.finalize()


class PKCS11ECPrivateKey(_TokenKey, ec.EllipticCurvePrivateKey):
    """An EC private key on a PKCS#11 token, usable wherever cryptography wants one."""

    def __init__(
        self, token: _Token, key_id: str, private: Any, public: ec.EllipticCurvePublicKey
    ) -> None:
        super().__init__(token, key_id, private)
        self._public = public

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public.curve

    @property
    def key_size(self) -> int:
        return self._public.curve.key_size

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    def sign(self, data: Buffer, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        """ECDSA over ``data``: hashed here, signed on the token, returned DER-encoded."""
        from pkcs11 import Mechanism

        if not isinstance(signature_algorithm, ec.ECDSA):
            raise InvalidInput(
                f"key {self._key_id} on a PKCS#11 token signs with ECDSA only, "
                f"not {type(signature_algorithm).__name__}"
            )
        if getattr(signature_algorithm, "deterministic_signing", False):
            raise InvalidInput("deterministic ECDSA (RFC 6979) is not available from PKCS#11")
        hash_algorithm, digest = _digest(bytes(data), signature_algorithm.algorithm)
        # ECDSA uses the leftmost bits of a digest longer than the group order. Some
        # tokens refuse the longer input, so cut it here (whole bytes are exact for
        # P-256 and P-384; SHA-512 is not longer than P-521's order).
        to_sign = digest
        if len(digest) * 8 > self.key_size:
            to_sign = digest[: self.key_size // 8]
        # CKM_ECDSA returns r || s, each as long as the group order.
        raw = self._sign_on_token(to_sign, Mechanism.ECDSA)
        half = len(raw) // 2
        signature = encode_dss_signature(
            int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big")
        )
        self._check(
            lambda: self._public.verify(signature, digest, ec.ECDSA(Prehashed(hash_algorithm)))
        )
        return signature

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        self._refuse("used for key exchange")

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        self._refuse("exported")

    def private_bytes(
        self,
        encoding: _serialization.Encoding,
        format: _serialization.PrivateFormat,
        encryption_algorithm: _serialization.KeySerializationEncryption,
    ) -> bytes:
        self._refuse("exported")

    def __copy__(self) -> PKCS11ECPrivateKey:
        return self

    def __deepcopy__(self, memo: dict[Any, Any]) -> PKCS11ECPrivateKey:
        return self


class PKCS11RSAPrivateKey(_TokenKey, rsa.RSAPrivateKey):
    """An RSA private key on a PKCS#11 token, usable wherever cryptography wants one."""

    def __init__(self, token: _Token, key_id: str, private: Any, public: rsa.RSAPublicKey) -> None:
        super().__init__(token, key_id, private)
        self._public = public

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def public_key(self) -> rsa.RSAPublicKey:
        return self._public

    def sign(
        self,
        data: bytes,
        padding: padding.AsymmetricPadding,
        algorithm: Prehashed | hashes.HashAlgorithm | NoDigestInfo,
    ) -> bytes:
        """RSA PKCS#1 v1.5 or PSS over ``data``: hashed here, signed on the token."""
        from pkcs11 import Mechanism

        if isinstance(algorithm, NoDigestInfo):
            # The caller built the exact message to pad; used by some TLS code paths.
            if not isinstance(padding, _PKCS1v15):
                raise InvalidInput("NoDigestInfo is only meaningful with PKCS#1 v1.5 padding")
            return self._sign_on_token(bytes(data), Mechanism.RSA_PKCS)
        hash_algorithm, digest = _digest(bytes(data), algorithm)
        name = hash_algorithm.name
        verify_padding: _AsymmetricPadding
        if isinstance(padding, _PKCS1v15):
            prefix = _DIGEST_INFO_PREFIX.get(name)
            if prefix is None:
                raise InvalidInput(f"RSA PKCS#1 v1.5 on a PKCS#11 token does not support {name}")
            signature = self._sign_on_token(prefix + digest, Mechanism.RSA_PKCS)
            verify_padding = padding
        elif isinstance(padding, _PSS):
            params = self._pss_params(padding, name, len(digest))
            signature = self._sign_on_token(digest, Mechanism.RSA_PKCS_PSS, params)
            verify_padding = _PSS(mgf=_MGF1(hash_algorithm), salt_length=_PSS.AUTO)
        else:
            raise InvalidInput(
                f"key {self._key_id} on a PKCS#11 token cannot sign with {type(padding).__name__}"
            )
        self._check(
            lambda: self._public.verify(
                signature, digest, verify_padding, Prehashed(hash_algorithm)
            )
        )
        return signature

    def _pss_params(self, pss: _PSS, hash_name: str, digest_size: int) -> tuple[Any, Any, int]:
        from pkcs11 import MGF, Mechanism

        mechanisms = {
            "sha224": (Mechanism.SHA224, MGF.SHA224),
            "sha256": (Mechanism.SHA256, MGF.SHA256),
            "sha384": (Mechanism.SHA384, MGF.SHA384),
            "sha512": (Mechanism.SHA512, MGF.SHA512),
        }
        mgf = pss.mgf
        mgf_hash: hashes.HashAlgorithm | None = getattr(mgf, "_algorithm", None)
        if hash_name not in mechanisms:
            raise InvalidInput(f"RSA-PSS on a PKCS#11 token does not support {hash_name}")
        # Tokens (SoftHSM among them) reject an MGF1 hash that differs from the message hash.
        if not isinstance(mgf, _MGF1) or mgf_hash is None or mgf_hash.name != hash_name:
            raise InvalidInput(
                f"RSA-PSS on a PKCS#11 token needs MGF1 with the message hash ({hash_name})"
            )
        # cryptography keeps the requested salt length in a private attribute.
        salt = getattr(pss, "_salt_length", None)
        max_salt = (self.key_size + 6) // 8 - digest_size - 2
        if salt is _PSS.DIGEST_LENGTH:
            salt = digest_size
        elif salt is _PSS.MAX_LENGTH:
            salt = max_salt
        if not isinstance(salt, int) or not 0 <= salt <= max_salt:
            raise InvalidInput("RSA-PSS signing needs a salt length from 0 to the maximum")
        return mechanisms[hash_name][0], mechanisms[mgf_hash.name][1], salt

    def decrypt(self, ciphertext: bytes, padding: padding.AsymmetricPadding) -> bytes:
        self._refuse("used for decryption")

    def private_numbers(self) -> rsa.RSAPrivateNumbers:
        self._refuse("exported")

    def private_bytes(
        self,
        encoding: _serialization.Encoding,
        format: _serialization.PrivateFormat,
        encryption_algorithm: _serialization.KeySerializationEncryption,
    ) -> bytes:
        self._refuse("exported")

    def __copy__(self) -> PKCS11RSAPrivateKey:
        return self

    def __deepcopy__(self, memo: dict[Any, Any]) -> PKCS11RSAPrivateKey:
        return self


# Module-level aliases: inside the RSA class ``padding`` is also a parameter name.
_AsymmetricPadding = padding.AsymmetricPadding
_PKCS1v15 = padding.PKCS1v15
_PSS = padding.PSS
_MGF1 = padding.MGF1


def _unwrap_ec_point(value: bytes, curve: ec.EllipticCurve) -> bytes:
    """CKA_EC_POINT is a DER OCTET STRING around the point (some tokens omit the wrapper)."""
    raw_length = 1 + 2 * ((curve.key_size + 7) // 8)
    if len(value) == raw_length and value[0] == 0x04:
        return value
    if len(value) < 2 or value[0] != 0x04:
        raise ConfigError("the token returned a malformed EC_POINT")
    length, offset = value[1], 2
    if length & 0x80:
        count = length & 0x7F
        length, offset = int.from_bytes(value[2 : 2 + count], "big"), 2 + count
    point = value[offset : offset + length]
    if len(point) != length or offset + length != len(value):
        raise ConfigError("the token returned a malformed EC_POINT")
    return point


class PKCS11KeyManager:
    """CA keys generated and kept on a PKCS#11 token, found by their label."""

    def __init__(self, module_path: Path | str, token_label: str, pin: str) -> None:
        try:
            import pkcs11
            import pkcs11.exceptions as p11
        except ImportError:  # pragma: no cover - python-pkcs11 is a dependency
            raise ConfigError("the python-pkcs11 package is not installed") from None

        module = Path(module_path)
        if not module.is_file():
            raise ConfigError(
                f"PKCS#11 module {module} does not exist: install it (for SoftHSM: "
                "apt-get install softhsm2) or fix key_manager.pkcs11_module",
                field="key_manager.pkcs11_module",
            )
        try:
            lib = pkcs11.lib(str(module))
        except p11.PKCS11Error as exc:
            raise ConfigError(
                f"cannot load PKCS#11 module {module}: {_describe(exc)}",
                field="key_manager.pkcs11_module",
            ) from None
        try:
            token = lib.get_token(token_label=token_label)
        except p11.NoSuchToken:
            try:
                labels = sorted(t.label for t in lib.get_tokens())
            except p11.PKCS11Error:
                labels = []
            found = ", ".join(repr(label) for label in labels) or "none"
            raise ConfigError(
                f"no PKCS#11 token labelled {token_label!r} in {module} (tokens found: {found})",
                field="key_manager.pkcs11_token_label",
            ) from None
        except p11.MultipleTokensReturned:
            raise ConfigError(
                f"several PKCS#11 tokens in {module} are labelled {token_label!r}",
                field="key_manager.pkcs11_token_label",
            ) from None
        except p11.PKCS11Error as exc:
            raise ConfigError(
                f"cannot list the tokens of PKCS#11 module {module}: {_describe(exc)}"
            ) from None
        self._token = self._open_session(token, module, token_label, pin)

    @staticmethod
    def _open_session(token: Any, module: Path, label: str, pin: str) -> _Token:
        """A plain session of our own, on a token logged in (once per process) with ``pin``."""
        import pkcs11.exceptions as p11

        pin_field = "key_manager.pkcs11_pin_file"
        login_key: _LoginKey = (str(module), label, bytes(token.serial))
        tag = _pin_tag(pin)
        with _LOGINS_LOCK:
            login = _LOGINS.get(login_key)
            if login is not None and not hmac.compare_digest(login.pin_tag, tag):
                raise ConfigError(f"wrong PIN for PKCS#11 token {label!r}", field=pin_field)
            if login is None:
                try:
                    login = _Login(token.open(rw=True, user_pin=pin), tag)
                except p11.PinIncorrect:
                    raise ConfigError(
                        f"wrong PIN for PKCS#11 token {label!r}", field=pin_field
                    ) from None
                except (p11.PinLenRange, p11.PinInvalid):
                    raise ConfigError(
                        f"the PIN for PKCS#11 token {label!r} has an invalid length or characters",
                        field=pin_field,
                    ) from None
                except p11.PinLocked:
                    raise ConfigError(
                        f"the user PIN of PKCS#11 token {label!r} is locked; the security "
                        "officer must reset it",
                        field=pin_field,
                    ) from None
                except p11.UserAlreadyLoggedIn:
                    raise ConfigError(
                        f"PKCS#11 token {label!r} is already logged in by other code in this "
                        "process, so the PIN cannot be checked",
                        field=pin_field,
                    ) from None
                except p11.PKCS11Error as exc:
                    raise ConfigError(
                        f"cannot log in to PKCS#11 token {label!r}: {_describe(exc)}"
                    ) from None
                _LOGINS[login_key] = login
            login.users += 1
        try:
            session = token.open(rw=True)
        except p11.PKCS11Error as exc:
            _release_login(login_key)
            raise ConfigError(
                f"cannot open a session on PKCS#11 token {label!r}: {_describe(exc)}"
            ) from None
        return _Token(session, label, login_key)

    @property
    def name(self) -> str:
        return "pkcs11"

    @property
    def token_label(self) -> str:
        """The label of the token the keys live on."""
        return self._token.label

    def close(self) -> None:
        """Close the session; keys obtained from this manager stop working."""
        self._token.close()

    def __enter__(self) -> PKCS11KeyManager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- KeyManager -----------------------------------------------------------------

    def generate_key(self, key_id: str, algorithm: KeyAlgorithm) -> SigningKey:
        """Generate a persistent, non-extractable key pair on the token, replacing ``key_id``."""
        from pkcs11 import Attribute, KeyType, MechanismFlag

        validate_key_id(key_id)
        object_id = key_id.encode("ascii")
        private_template = {
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.SIGN: True,
            Attribute.DECRYPT: False,
            Attribute.UNWRAP: False,
            Attribute.DERIVE: False,
        }
        public_template: dict[Any, Any] = {
            Attribute.TOKEN: True,
            Attribute.VERIFY: True,
            Attribute.ENCRYPT: False,
            Attribute.WRAP: False,
        }
        if algorithm.is_rsa:
            key_type, bits = KeyType.RSA, algorithm.rsa_bits
        else:
            key_type, bits = KeyType.EC, None
            public_template[Attribute.EC_PARAMS] = _PARAMS_FOR_CURVE[type(algorithm.curve)]

        def generate(session: Session) -> SigningKey:
            # The old pair goes first so that the label stays unique on the token.
            self._destroy(session, key_id)
            public, private = session.generate_keypair(
                key_type,
                bits,
                id=object_id,
                label=key_id,
                store=True,
                capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
                public_template=public_template,
                private_template=private_template,
            )
            return self._wrap(key_id, private, public)

        return self._token.run(f"generate {algorithm.value} key {key_id}", generate)

    def get_key(self, key_id: str) -> SigningKey | None:
        """The key labelled ``key_id`` on the token, or None."""
        from pkcs11 import ObjectClass

        validate_key_id(key_id)

        def find(session: Session) -> SigningKey | None:
            privates = self._find(session, ObjectClass.PRIVATE_KEY, key_id)
            if not privates:
                return None
            if len(privates) > 1:
                raise ConfigError(
                    f"PKCS#11 token {self._token.label!r} holds {len(privates)} private keys "
                    f"labelled {key_id}; remove the duplicates"
                )
            publics = self._find(session, ObjectClass.PUBLIC_KEY, key_id)
            return self._wrap(key_id, privates[0], publics[0] if publics else None)

        return self._token.run(f"find key {key_id}", find)

    def delete_key(self, key_id: str) -> None:
        """Destroy the key pair labelled ``key_id``; a missing key is not an error."""
        validate_key_id(key_id)
        self._token.run(f"delete key {key_id}", lambda session: self._destroy(session, key_id))

    def list_keys(self) -> list[str]:
        """Ids of the key pairs this manager created on the token, sorted."""
        from pkcs11 import Attribute, ObjectClass

        def scan(session: Session) -> list[str]:
            ids = set()
            for obj in list(session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY})):
                attrs = obj.get_attributes([Attribute.LABEL, Attribute.ID])
                label, object_id = attrs.get(Attribute.LABEL), attrs.get(Attribute.ID)
                if isinstance(label, str) and object_id == label.encode("utf-8"):
                    ids.add(label)
            return sorted(ids)

        return self._token.run("list keys", scan)

    # -- internals ------------------------------------------------------------------

    @staticmethod
    def _find(session: Session, object_class: Any, key_id: str) -> list[Object]:
        from pkcs11 import Attribute

        query = {
            Attribute.CLASS: object_class,
            Attribute.LABEL: key_id,
            Attribute.ID: key_id.encode("ascii"),
        }
        # Drain the search so the session's find operation is finished before we go on.
        return list(session.get_objects(query))

    def _destroy(self, session: Session, key_id: str) -> None:
        from pkcs11 import ObjectClass

        for object_class in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
            for obj in self._find(session, object_class, key_id):
                obj.destroy()

    def _wrap(self, key_id: str, private: Any, public: Any) -> SigningKey:
        """Build the cryptography-compatible key object from the token's objects."""
        from pkcs11 import Attribute, KeyType

        key_type = private[Attribute.KEY_TYPE]
        if key_type == KeyType.EC:
            params = private[Attribute.EC_PARAMS]
            curve = _CURVE_PARAMS.get(bytes(params))
            if curve is None:
                raise ConfigError(f"key {key_id} on the token uses an unsupported curve")
            if public is None:
                raise ConfigError(f"the public half of EC key {key_id} is missing from the token")
            point = _unwrap_ec_point(bytes(public[Attribute.EC_POINT]), curve)
            ec_public = ec.EllipticCurvePublicKey.from_encoded_point(curve, point)
            return PKCS11ECPrivateKey(self._token, key_id, private, ec_public)
        if key_type == KeyType.RSA:
            # RSA private key objects carry the modulus and public exponent too.
            source = public if public is not None else private
            modulus = int.from_bytes(source[Attribute.MODULUS], "big")
            exponent = int.from_bytes(source[Attribute.PUBLIC_EXPONENT], "big")
            rsa_public = rsa.RSAPublicNumbers(exponent, modulus).public_key()
            return PKCS11RSAPrivateKey(self._token, key_id, private, rsa_public)
        raise ConfigError(f"key {key_id} on the token is neither EC nor RSA")
