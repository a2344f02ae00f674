"""The PKCS#11 key manager against a real SoftHSM2 token, checked with openssl.

The conformance suite in tests/unit/pki/test_key_managers.py already runs the
pkcs11 manager through every algorithm; this file covers what only a token
has: persistence on the token, non-extractable keys, PINs and labels, the
signature mechanisms, concurrent signing, and certificates that the openssl
command line (not our code, not cryptography) verifies.
"""

from __future__ import annotations

import copy
import subprocess
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pkcs11
import pkcs11.exceptions
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID

from softhsm import SoftHsmToken, softhsm_token_fixture
from trustmesh.config import KeyManagerConfig
from trustmesh.errors import (
    ConfigError,
    InternalError,
    InvalidInput,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from trustmesh.pki.keys import KeyAlgorithm, PKCS11KeyManager, open_key_manager

pytestmark = pytest.mark.softhsm

softhsm_token = softhsm_token_fixture()

NAME = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "trustmesh SoftHSM CA")])

# The hashes cryptography's X.509 builders accept for a signature.
SigningHash = hashes.SHA224 | hashes.SHA256 | hashes.SHA384 | hashes.SHA512


@pytest.fixture
def open_manager(softhsm_token: SoftHsmToken) -> Iterator[Callable[..., PKCS11KeyManager]]:
    """Open managers on the test token; all are closed at teardown."""
    opened: list[PKCS11KeyManager] = []

    def open_(pin: str | None = None, label: str | None = None) -> PKCS11KeyManager:
        module, token_label, token_pin = softhsm_token
        manager = PKCS11KeyManager(module, label or token_label, pin or token_pin)
        opened.append(manager)
        return manager

    yield open_
    for manager in opened:
        manager.close()


@pytest.fixture
def manager(open_manager: Callable[..., PKCS11KeyManager]) -> PKCS11KeyManager:
    return open_manager()


def spki(key: Any) -> bytes:
    return key.public_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def ca_certificate(key: Any, algorithm: SigningHash, rsa_padding: Any = None) -> x509.Certificate:
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(NAME)
        .issuer_name(NAME)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    if rsa_padding is not None:
        return builder.sign(key, algorithm, rsa_padding=rsa_padding)
    return builder.sign(key, algorithm)


def run_openssl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=60)


# -- persistence and listing ------------------------------------------------------------


def test_keys_persist_on_the_token_across_managers(
    open_manager: Callable[..., PKCS11KeyManager],
) -> None:
    first = open_manager()
    ec_key = first.generate_key("root", KeyAlgorithm.EC_P384)
    rsa_key = first.generate_key("intermediate", KeyAlgorithm.RSA_2048)
    first.close()

    second = open_manager()
    assert second.list_keys() == ["intermediate", "root"]
    root, intermediate = second.get_key("root"), second.get_key("intermediate")
    assert root is not None and intermediate is not None
    assert spki(root.public_key()) == spki(ec_key.public_key())
    assert spki(intermediate.public_key()) == spki(rsa_key.public_key())
    cert = ca_certificate(root, hashes.SHA384())
    cert.verify_directly_issued_by(cert)


def test_two_open_managers_share_the_login(open_manager: Callable[..., PKCS11KeyManager]) -> None:
    first, second = open_manager(), open_manager()
    first.generate_key("root", KeyAlgorithm.EC_P256)
    first.close()  # must not log the second manager out
    key = second.get_key("root")
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    signature = key.sign(b"still logged in", ec.ECDSA(hashes.SHA256()))
    key.public_key().verify(signature, b"still logged in", ec.ECDSA(hashes.SHA256()))


def test_foreign_objects_on_the_token_are_left_alone(
    softhsm_token: SoftHsmToken, manager: PKCS11KeyManager
) -> None:
    module, label, pin = softhsm_token
    token = pkcs11.lib(str(module)).get_token(token_label=label)
    with token.open(rw=True) as session:
        # Same label, different CKA_ID: not one of ours.
        session.generate_keypair(
            pkcs11.KeyType.EC,
            public_template={
                pkcs11.Attribute.EC_PARAMS: pkcs11.util.ec.encode_named_curve_parameters(
                    "secp256r1"
                )
            },
            store=True,
            label="root",
            id=b"\x01\x02",
        )
    assert manager.list_keys() == []
    assert manager.get_key("root") is None
    manager.generate_key("root", KeyAlgorithm.EC_P256)
    manager.delete_key("root")
    with token.open() as session:
        left = list(session.get_objects({pkcs11.Attribute.LABEL: "root"}))
    assert len(left) == 2  # the foreign public and private key


# -- the private key never leaves the token ---------------------------------------------


@pytest.mark.parametrize(
    ("algorithm", "secret"),
    [
        (KeyAlgorithm.EC_P256, pkcs11.Attribute.VALUE),
        (KeyAlgorithm.RSA_2048, pkcs11.Attribute.PRIVATE_EXPONENT),
    ],
    ids=["ec", "rsa"],
)
def test_private_key_is_sensitive_and_not_extractable(
    softhsm_token: SoftHsmToken,
    manager: PKCS11KeyManager,
    algorithm: KeyAlgorithm,
    secret: pkcs11.Attribute,
) -> None:
    key = manager.generate_key("root", algorithm)

    module, label, _ = softhsm_token
    token = pkcs11.lib(str(module)).get_token(token_label=label)
    with token.open() as session:  # shares the manager's login
        (private,) = session.get_objects(
            {pkcs11.Attribute.CLASS: pkcs11.ObjectClass.PRIVATE_KEY, pkcs11.Attribute.LABEL: "root"}
        )
        assert private[pkcs11.Attribute.TOKEN] is True
        assert private[pkcs11.Attribute.SENSITIVE] is True
        assert private[pkcs11.Attribute.EXTRACTABLE] is False
        assert private[pkcs11.Attribute.ALWAYS_SENSITIVE] is True
        assert private[pkcs11.Attribute.NEVER_EXTRACTABLE] is True
        assert private[pkcs11.Attribute.ID] == b"root"
        with pytest.raises(pkcs11.exceptions.AttributeSensitive):
            private[secret]

    with pytest.raises(PermissionDenied, match="never leaves the token"):
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    with pytest.raises(PermissionDenied):
        key.private_numbers()
    if isinstance(key, ec.EllipticCurvePrivateKey):
        with pytest.raises(PermissionDenied):
            key.exchange(ec.ECDH(), ec.generate_private_key(ec.SECP256R1()).public_key())
    else:
        with pytest.raises(PermissionDenied):
            key.decrypt(b"\x00" * 256, padding.PKCS1v15())


def test_key_objects_are_cryptography_keys(manager: PKCS11KeyManager) -> None:
    ec_key = manager.generate_key("ec", KeyAlgorithm.EC_P384)
    rsa_key = manager.generate_key("rsa", KeyAlgorithm.RSA_3072)
    assert isinstance(ec_key, ec.EllipticCurvePrivateKey)
    assert isinstance(ec_key.curve, ec.SECP384R1) and ec_key.key_size == 384
    assert isinstance(ec_key.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(rsa_key, rsa.RSAPrivateKey)
    assert rsa_key.key_size == 3072 and rsa_key.public_key().public_numbers().e == 65537
    assert copy.copy(ec_key) is ec_key and copy.deepcopy(rsa_key) is rsa_key
    assert "ec" in repr(ec_key) and "BEGIN" not in repr(ec_key)


# -- PINs, labels, modules --------------------------------------------------------------


def test_wrong_pin_is_a_config_error(softhsm_token: SoftHsmToken) -> None:
    module, label, _ = softhsm_token
    with pytest.raises(ConfigError, match=f"wrong PIN for PKCS#11 token '{label}'") as info:
        PKCS11KeyManager(module, label, "0000")
    assert info.value.field == "key_manager.pkcs11_pin_file"


def test_wrong_pin_is_refused_while_another_manager_is_logged_in(
    softhsm_token: SoftHsmToken, manager: PKCS11KeyManager
) -> None:
    module, label, _ = softhsm_token
    with pytest.raises(ConfigError, match="wrong PIN"):
        PKCS11KeyManager(module, label, "0000")


def test_missing_token_is_a_config_error(softhsm_token: SoftHsmToken) -> None:
    module, label, pin = softhsm_token
    with pytest.raises(ConfigError, match=r"no PKCS#11 token labelled 'nope'.*'trustmesh-test'"):
        PKCS11KeyManager(module, "nope", pin)


def test_missing_module_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        PKCS11KeyManager(tmp_path / "libnothing.so", "t", "1234")
    not_a_library = tmp_path / "libfake.so"
    not_a_library.write_bytes(b"not an ELF file")
    with pytest.raises(ConfigError, match="cannot load PKCS#11 module"):
        PKCS11KeyManager(not_a_library, "t", "1234")


def test_factory_opens_the_token_with_a_pin_from_file_or_env(
    softhsm_token: SoftHsmToken, tmp_path: Path
) -> None:
    module, label, pin = softhsm_token
    pin_file = tmp_path / "pin"
    pin_file.write_text(pin + "\n")
    opened = []
    by_file = open_key_manager(
        KeyManagerConfig(
            kind="pkcs11", pkcs11_module=module, pkcs11_token_label=label, pkcs11_pin_file=pin_file
        ),
        tmp_path,
        {},
    )
    opened.append(by_file)
    by_env = open_key_manager(
        KeyManagerConfig(
            kind="pkcs11", pkcs11_module=module, pkcs11_token_label=label, pkcs11_pin_env="HSM_PIN"
        ),
        tmp_path,
        {"HSM_PIN": pin},
    )
    opened.append(by_env)
    try:
        by_file.generate_key("root", KeyAlgorithm.EC_P256)
        assert by_env.list_keys() == ["root"]
    finally:
        for manager in opened:
            assert isinstance(manager, PKCS11KeyManager)
            manager.close()


# -- signing ----------------------------------------------------------------------------


@pytest.mark.parametrize("hash_cls", [hashes.SHA224, hashes.SHA256, hashes.SHA384, hashes.SHA512])
@pytest.mark.parametrize("algorithm", [KeyAlgorithm.EC_P256, KeyAlgorithm.EC_P384])
def test_ecdsa_signatures(
    manager: PKCS11KeyManager, algorithm: KeyAlgorithm, hash_cls: Callable[[], SigningHash]
) -> None:
    key = manager.generate_key("k", algorithm)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    data = b"to be signed" * 100
    signature = key.sign(data, ec.ECDSA(hash_cls()))
    key.public_key().verify(signature, data, ec.ECDSA(hash_cls()))
    utils.decode_dss_signature(signature)  # DER, not the token's raw r || s

    digest = hashes.Hash(hash_cls())
    digest.update(data)
    prehashed = key.sign(digest.finalize(), ec.ECDSA(utils.Prehashed(hash_cls())))
    key.public_key().verify(prehashed, data, ec.ECDSA(hash_cls()))


@pytest.fixture
def rsa_key(manager: PKCS11KeyManager) -> rsa.RSAPrivateKey:
    key = manager.generate_key("rsa", KeyAlgorithm.RSA_2048)
    assert isinstance(key, rsa.RSAPrivateKey)
    return key


@pytest.mark.parametrize("hash_cls", [hashes.SHA224, hashes.SHA256, hashes.SHA384, hashes.SHA512])
def test_rsa_pkcs1v15_and_pss_signatures(
    rsa_key: rsa.RSAPrivateKey, hash_cls: Callable[[], SigningHash]
) -> None:
    data = b"to be signed" * 100
    public = rsa_key.public_key()
    signature = rsa_key.sign(data, padding.PKCS1v15(), hash_cls())
    public.verify(signature, data, padding.PKCS1v15(), hash_cls())
    for salt in (padding.PSS.DIGEST_LENGTH, padding.PSS.MAX_LENGTH, 0, 17):
        pss = padding.PSS(mgf=padding.MGF1(hash_cls()), salt_length=salt)
        public.verify(rsa_key.sign(data, pss, hash_cls()), data, pss, hash_cls())

    digest = hashes.Hash(hash_cls())
    digest.update(data)
    prehashed = utils.Prehashed(hash_cls())
    value = digest.finalize()
    public.verify(
        rsa_key.sign(value, padding.PKCS1v15(), prehashed), data, padding.PKCS1v15(), hash_cls()
    )


def test_unsupported_signature_requests_are_invalid_input(
    manager: PKCS11KeyManager, rsa_key: rsa.RSAPrivateKey
) -> None:
    mixed = padding.PSS(mgf=padding.MGF1(hashes.SHA1()), salt_length=32)
    with pytest.raises(InvalidInput, match="MGF1 with the message hash"):
        rsa_key.sign(b"x", mixed, hashes.SHA256())
    with pytest.raises(InvalidInput):
        rsa_key.sign(b"x", padding.PSS(padding.MGF1(hashes.SHA256()), 10_000), hashes.SHA256())
    with pytest.raises(InvalidInput, match="does not support sha3-256"):
        rsa_key.sign(b"x", padding.PKCS1v15(), hashes.SHA3_256())
    ec_key = manager.generate_key("ec", KeyAlgorithm.EC_P256)
    assert isinstance(ec_key, ec.EllipticCurvePrivateKey)
    with pytest.raises(InvalidInput, match="deterministic"):
        ec_key.sign(b"x", ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
    with pytest.raises(InvalidInput, match="prehashed"):
        ec_key.sign(b"short", ec.ECDSA(utils.Prehashed(hashes.SHA256())))


def test_stale_keys_fail_clearly(manager: PKCS11KeyManager) -> None:
    old = manager.generate_key("root", KeyAlgorithm.EC_P256)
    assert isinstance(old, ec.EllipticCurvePrivateKey)
    manager.generate_key("root", KeyAlgorithm.EC_P256)
    with pytest.raises(NotFound, match="no longer on PKCS#11 token"):
        old.sign(b"x", ec.ECDSA(hashes.SHA256()))
    current = manager.get_key("root")
    assert isinstance(current, ec.EllipticCurvePrivateKey)
    manager.close()
    with pytest.raises(Unavailable, match="closed"):
        current.sign(b"x", ec.ECDSA(hashes.SHA256()))


def test_signing_from_many_threads(manager: PKCS11KeyManager) -> None:
    ec_key = manager.generate_key("ec", KeyAlgorithm.EC_P256)
    rsa_key = manager.generate_key("rsa", KeyAlgorithm.RSA_2048)
    assert isinstance(ec_key, ec.EllipticCurvePrivateKey)
    assert isinstance(rsa_key, rsa.RSAPrivateKey)
    ec_signer: ec.EllipticCurvePrivateKey = ec_key
    rsa_signer: rsa.RSAPrivateKey = rsa_key
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def work(n: int) -> None:
        try:
            start.wait()
            for i in range(20):
                data = f"thread {n} message {i}".encode()
                if n % 2:
                    sig = ec_signer.sign(data, ec.ECDSA(hashes.SHA256()))
                    ec_signer.public_key().verify(sig, data, ec.ECDSA(hashes.SHA256()))
                else:
                    sig = rsa_signer.sign(data, padding.PKCS1v15(), hashes.SHA256())
                    rsa_signer.public_key().verify(sig, data, padding.PKCS1v15(), hashes.SHA256())
                if i % 5 == 0:
                    assert manager.list_keys() == ["ec", "rsa"]
                    assert manager.get_key("ec") is not None
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors


# -- openssl, the independent judge -----------------------------------------------------


@pytest.mark.parametrize(
    ("algorithm", "hash_cls", "use_pss"),
    [
        (KeyAlgorithm.EC_P256, hashes.SHA256, False),
        (KeyAlgorithm.EC_P384, hashes.SHA384, False),
        (KeyAlgorithm.RSA_2048, hashes.SHA256, False),
        (KeyAlgorithm.RSA_3072, hashes.SHA384, True),
    ],
    ids=["ec-p256", "ec-p384", "rsa-2048", "rsa-3072-pss"],
)
def test_openssl_verifies_what_the_token_signed(
    manager: PKCS11KeyManager,
    tmp_path: Path,
    algorithm: KeyAlgorithm,
    hash_cls: Callable[[], SigningHash],
    use_pss: bool,
) -> None:
    key = manager.generate_key("root", algorithm)
    h = hash_cls()
    pss = padding.PSS(mgf=padding.MGF1(h), salt_length=padding.PSS.DIGEST_LENGTH)
    cert = ca_certificate(key, h, rsa_padding=pss if use_pss else None)
    ca_pem = tmp_path / "ca.pem"
    ca_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    result = run_openssl("verify", "-x509_strict", "-CAfile", str(ca_pem), str(ca_pem))
    assert result.returncode == 0, result.stderr
    assert f"{ca_pem}: OK" in result.stdout

    now = datetime.now(UTC)
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(NAME)
        .last_update(now - timedelta(minutes=1))
        .next_update(now + timedelta(hours=1))
        .add_extension(x509.CRLNumber(7), critical=False)
        .sign(key, h)
    )
    crl_pem = tmp_path / "crl.pem"
    crl_pem.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    result = run_openssl("crl", "-in", str(crl_pem), "-CAfile", str(ca_pem), "-noout")
    assert result.returncode == 0 and "verify OK" in result.stdout + result.stderr, result.stderr
    result = run_openssl(
        "verify", "-crl_check", "-CAfile", str(ca_pem), "-CRLfile", str(crl_pem), str(ca_pem)
    )
    assert result.returncode == 0, result.stderr

    response = (
        ocsp.OCSPResponseBuilder()
        .add_response(
            cert=cert,
            issuer=cert,
            algorithm=hashes.SHA256(),
            cert_status=ocsp.OCSPCertStatus.GOOD,
            this_update=now - timedelta(minutes=1),
            next_update=now + timedelta(hours=1),
            revocation_time=None,
            revocation_reason=None,
        )
        .responder_id(ocsp.OCSPResponderEncoding.HASH, cert)
        .sign(key, h)
    )
    response_der = tmp_path / "response.der"
    response_der.write_bytes(response.public_bytes(serialization.Encoding.DER))
    result = run_openssl(
        "ocsp",
        "-respin",
        str(response_der),
        "-CAfile",
        str(ca_pem),
        "-VAfile",
        str(ca_pem),
        "-sha256",  # the CertID hash of our response; must come before -cert
        "-issuer",
        str(ca_pem),
        "-cert",
        str(ca_pem),
        "-no_nonce",
    )
    assert result.returncode == 0, result.stderr
    assert "Response verify OK" in result.stdout + result.stderr
    assert ": good" in result.stdout


@pytest.mark.parametrize(
    "algorithm", [KeyAlgorithm.EC_P256, KeyAlgorithm.RSA_2048], ids=lambda a: a.value
)
def test_a_faulty_token_signature_is_never_returned(
    manager: PKCS11KeyManager, monkeypatch: pytest.MonkeyPatch, algorithm: KeyAlgorithm
) -> None:
    key = manager.generate_key("root", algorithm)
    on_token = key._private  # type: ignore[union-attr]

    class FlipsABit:
        def sign(self, data: bytes, **kwargs: Any) -> bytes:
            good: bytes = on_token.sign(data, **kwargs)
            return good[:-1] + bytes([good[-1] ^ 1])

    monkeypatch.setattr(key, "_private", FlipsABit())
    with pytest.raises(InternalError, match="does not verify"):
        if isinstance(key, ec.EllipticCurvePrivateKey):
            key.sign(b"data", ec.ECDSA(hashes.SHA256()))
        else:
            key.sign(b"data", padding.PKCS1v15(), hashes.SHA256())


@pytest.mark.parametrize(
    ("hash_cls", "mechanism"),
    [
        (hashes.SHA256, pkcs11.Mechanism.SHA256_RSA_PKCS),
        (hashes.SHA384, pkcs11.Mechanism.SHA384_RSA_PKCS),
        (hashes.SHA512, pkcs11.Mechanism.SHA512_RSA_PKCS),
    ],
    ids=["sha256", "sha384", "sha512"],
)
def test_rsa_pkcs1v15_matches_the_tokens_hash_and_sign_mechanism(
    softhsm_token: SoftHsmToken,
    rsa_key: rsa.RSAPrivateKey,
    hash_cls: Callable[[], SigningHash],
    mechanism: pkcs11.Mechanism,
) -> None:
    data = b"a CRL can be large; " * 1000
    ours = rsa_key.sign(data, padding.PKCS1v15(), hash_cls())
    module, label, _ = softhsm_token
    token = pkcs11.lib(str(module)).get_token(token_label=label)
    with token.open() as session:
        private = session.get_key(pkcs11.ObjectClass.PRIVATE_KEY, label="rsa", id=b"rsa")
        theirs = private.sign(data, mechanism=mechanism)  # type: ignore[attr-defined]
    assert ours == theirs
