"""One conformance suite for every key manager, plus what only disk keys must do.

Each manager (memory, disk, disk with a passphrase, PKCS#11 on a fresh SoftHSM
token) runs the same tests for every ``KeyAlgorithm``: the key it returns signs
a certificate, a CRL and an OCSP response that cryptography verifies with the
public key. RSA-4096 keys are generated once per manager.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID

from softhsm import softhsm_token_fixture
from trustmesh.config import KeyManagerConfig
from trustmesh.errors import ConfigError, InvalidInput
from trustmesh.pki.keys import (
    DiskKeyManager,
    KeyAlgorithm,
    KeyManager,
    MemoryKeyManager,
    SigningKey,
    open_key_manager,
)

softhsm_token = softhsm_token_fixture()

PASSPHRASE = b"correct horse battery staple"


# -- the managers under test ------------------------------------------------------------


@dataclass
class Subject:
    """A manager under test and how to open a second one on the same storage."""

    kind: str
    manager: KeyManager
    reopen: Callable[[], KeyManager]
    persistent: bool
    opened: list[Any] = field(default_factory=list)


MANAGER_KINDS = [
    "memory",
    "disk",
    "disk-encrypted",
    pytest.param("pkcs11", marks=pytest.mark.softhsm),
]


def _open(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Subject:
    if kind == "memory":
        memory = MemoryKeyManager()
        return Subject(kind, memory, lambda: memory, persistent=False)
    if kind in ("disk", "disk-encrypted"):
        passphrase = PASSPHRASE if kind == "disk-encrypted" else None
        directory = tmp_path / "keys"

        def disk() -> KeyManager:
            return DiskKeyManager(directory, passphrase)

        return Subject(kind, disk(), disk, persistent=True)
    if kind == "pkcs11":
        from trustmesh.pki.keys import PKCS11KeyManager

        module, label, pin = request.getfixturevalue("softhsm_token")
        opened: list[Any] = []

        def hsm() -> KeyManager:
            manager = PKCS11KeyManager(module, label, pin)
            opened.append(manager)
            return manager

        return Subject(kind, hsm(), hsm, persistent=True, opened=opened)
    raise AssertionError(kind)


def _subject(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Subject]:
    subj = _open(request.param, tmp_path, request)
    try:
        yield subj
    finally:
        for manager in subj.opened:
            manager.close()


@pytest.fixture(params=MANAGER_KINDS)
def subject(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Subject]:
    """Every manager."""
    yield from _subject(request, tmp_path)


@pytest.fixture(params=MANAGER_KINDS)
def named_subject(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Subject]:
    """Every manager: all of them refuse unsafe key ids, in memory as on disk or token."""
    yield from _subject(request, tmp_path)


# -- signing and verifying with cryptography ----------------------------------------------

NAME = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "trustmesh conformance CA")])

# The hashes cryptography's X.509 builders accept for a signature.
SigningHash = hashes.SHA224 | hashes.SHA256 | hashes.SHA384 | hashes.SHA512


def hash_for(algorithm: KeyAlgorithm) -> SigningHash:
    return hashes.SHA384() if algorithm is KeyAlgorithm.EC_P384 else hashes.SHA256()


def spki(key: Any) -> bytes:
    return key.public_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def self_signed(
    key: SigningKey, algorithm: SigningHash, rsa_padding: Any = None
) -> x509.Certificate:
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(NAME)
        .issuer_name(NAME)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
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


def signed_crl(key: SigningKey, algorithm: SigningHash) -> x509.CertificateRevocationList:
    now = datetime.now(UTC)
    revoked = (
        x509.RevokedCertificateBuilder()
        .serial_number(12345)
        .revocation_date(now - timedelta(minutes=5))
        .build()
    )
    return (
        x509.CertificateRevocationListBuilder()
        .issuer_name(NAME)
        .last_update(now)
        .next_update(now + timedelta(hours=1))
        .add_revoked_certificate(revoked)
        .add_extension(x509.CRLNumber(1), critical=False)
        .sign(key, algorithm)
    )


def signed_ocsp_response(
    key: SigningKey, cert: x509.Certificate, algorithm: SigningHash
) -> ocsp.OCSPResponse:
    now = datetime.now(UTC)
    return (
        ocsp.OCSPResponseBuilder()
        .add_response(
            cert=cert,
            issuer=cert,
            algorithm=hashes.SHA256(),
            cert_status=ocsp.OCSPCertStatus.GOOD,
            this_update=now,
            next_update=now + timedelta(hours=1),
            revocation_time=None,
            revocation_reason=None,
        )
        .responder_id(ocsp.OCSPResponderEncoding.HASH, cert)
        .sign(key, algorithm)
    )


def verify_signature(
    public_key: Any, signature: bytes, data: bytes, algorithm: hashes.HashAlgorithm
) -> None:
    """Raise InvalidSignature unless ``signature`` is a valid one over ``data``."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        public_key.verify(signature, data, ec.ECDSA(algorithm))
    else:
        assert isinstance(public_key, rsa.RSAPublicKey)
        public_key.verify(signature, data, padding.PKCS1v15(), algorithm)


def assert_signs_verifiably(key: SigningKey, algorithm: KeyAlgorithm) -> None:
    """A certificate, a CRL and an OCSP response signed with ``key`` verify."""
    h = hash_for(algorithm)
    public = key.public_key()

    cert = self_signed(key, h)
    assert spki(cert.public_key()) == spki(public)
    cert.verify_directly_issued_by(cert)
    assert cert.signature_hash_algorithm is not None
    assert cert.signature_hash_algorithm.name == h.name

    crl = signed_crl(key, h)
    assert crl.is_signature_valid(public)
    verify_signature(public, crl.signature, crl.tbs_certlist_bytes, h)

    response = signed_ocsp_response(key, cert, h)
    assert response.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL
    verify_signature(public, response.signature, response.tbs_response_bytes, h)

    if algorithm.is_rsa:
        pss = padding.PSS(mgf=padding.MGF1(h), salt_length=padding.PSS.DIGEST_LENGTH)
        pss_cert = self_signed(key, h, rsa_padding=pss)
        pss_cert.verify_directly_issued_by(pss_cert)


def assert_key_shape(key: SigningKey, algorithm: KeyAlgorithm) -> None:
    if algorithm.is_rsa:
        assert isinstance(key, rsa.RSAPrivateKey)
        assert key.key_size == algorithm.rsa_bits
        assert key.public_key().key_size == algorithm.rsa_bits
    else:
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert key.curve.name == algorithm.curve.name
        assert key.key_size == algorithm.curve.key_size


# -- the conformance tests --------------------------------------------------------------


def test_manager_names_its_kind(subject: Subject) -> None:
    assert isinstance(subject.manager, KeyManager)
    assert subject.manager.name == subject.kind.split("-")[0]


def test_empty_manager(subject: Subject) -> None:
    m = subject.manager
    assert m.list_keys() == []
    assert m.get_key("absent") is None
    m.delete_key("absent")  # a missing key is not an error
    assert m.list_keys() == []


@pytest.mark.parametrize("algorithm", list(KeyAlgorithm), ids=lambda a: a.value)
def test_key_lifecycle(subject: Subject, algorithm: KeyAlgorithm) -> None:
    m = subject.manager
    key_id = f"ca-{algorithm.value}"

    generated = m.generate_key(key_id, algorithm)
    assert_key_shape(generated, algorithm)
    assert_signs_verifiably(generated, algorithm)

    fetched = m.get_key(key_id)
    assert fetched is not None
    assert_key_shape(fetched, algorithm)
    assert spki(fetched.public_key()) == spki(generated.public_key())
    assert_signs_verifiably(fetched, algorithm)
    assert m.list_keys() == [key_id]

    if subject.persistent:
        again = subject.reopen()
        reloaded = again.get_key(key_id)
        assert reloaded is not None
        assert spki(reloaded.public_key()) == spki(generated.public_key())
        assert again.list_keys() == [key_id]
        # One signature is enough to show the reloaded key is the same private key.
        h = hash_for(algorithm)
        crl = signed_crl(reloaded, h)  # one CRL: two built across a second would differ
        verify_signature(generated.public_key(), crl.signature, crl.tbs_certlist_bytes, h)

    m.delete_key(key_id)
    assert m.get_key(key_id) is None
    assert m.list_keys() == []
    m.delete_key(key_id)


@pytest.mark.parametrize(
    "algorithm", [KeyAlgorithm.EC_P256, KeyAlgorithm.RSA_2048], ids=lambda a: a.value
)
def test_replacing_a_key_id_gives_a_new_key(subject: Subject, algorithm: KeyAlgorithm) -> None:
    m = subject.manager
    first = m.generate_key("intermediate", algorithm)
    second = m.generate_key("intermediate", algorithm)
    assert spki(first.public_key()) != spki(second.public_key())
    current = m.get_key("intermediate")
    assert current is not None
    assert spki(current.public_key()) == spki(second.public_key())
    assert m.list_keys() == ["intermediate"]
    assert_signs_verifiably(current, algorithm)


def test_replacing_with_another_algorithm(subject: Subject) -> None:
    m = subject.manager
    m.generate_key("ocsp", KeyAlgorithm.EC_P256)
    m.generate_key("ocsp", KeyAlgorithm.EC_P384)
    key = m.get_key("ocsp")
    assert key is not None
    assert_key_shape(key, KeyAlgorithm.EC_P384)
    assert m.list_keys() == ["ocsp"]


def test_keys_are_independent_and_listed_sorted(subject: Subject) -> None:
    m = subject.manager
    for key_id in ("root", "intermediate-2", "Intermediate_1", "a.b"):
        m.generate_key(key_id, KeyAlgorithm.EC_P256)
    assert m.list_keys() == sorted(["root", "intermediate-2", "Intermediate_1", "a.b"])
    root = m.get_key("root")
    m.delete_key("intermediate-2")
    assert m.list_keys() == sorted(["root", "Intermediate_1", "a.b"])
    still = m.get_key("root")
    assert root is not None and still is not None
    assert spki(root.public_key()) == spki(still.public_key())


BAD_KEY_IDS = ["", ".", "..", "../escape", "a/b", "/abs", ".hidden", "x" * 65, "caf\u00e9", "a b"]


@pytest.mark.parametrize("key_id", BAD_KEY_IDS)
def test_unsafe_key_ids_are_refused(named_subject: Subject, key_id: str) -> None:
    m = named_subject.manager
    with pytest.raises(InvalidInput, match="invalid key id"):
        m.generate_key(key_id, KeyAlgorithm.EC_P256)
    with pytest.raises(InvalidInput):
        m.get_key(key_id)
    with pytest.raises(InvalidInput):
        m.delete_key(key_id)


def test_longest_key_id_is_accepted(subject: Subject) -> None:
    key_id = "k" * 64
    subject.manager.generate_key(key_id, KeyAlgorithm.EC_P256)
    assert subject.manager.list_keys() == [key_id]


# -- disk only --------------------------------------------------------------------------


def test_disk_directory_and_files_are_private_even_with_a_lax_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        manager = DiskKeyManager(tmp_path / "data" / "keys")
        manager.generate_key("root", KeyAlgorithm.EC_P256)
    finally:
        os.umask(old)
    directory = tmp_path / "data" / "keys"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((directory / "root.pem").stat().st_mode) == 0o600
    assert sorted(p.name for p in directory.iterdir()) == ["root.pem"]


def test_disk_writes_through_an_exclusive_0600_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, int, int]] = []
    real_open = os.open

    def recording_open(path: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
        calls.append((os.fspath(path), flags, mode))
        return real_open(path, flags, mode, **kw)

    manager = DiskKeyManager(tmp_path / "keys")
    monkeypatch.setattr(os, "open", recording_open)
    manager.generate_key("root", KeyAlgorithm.EC_P256)
    monkeypatch.undo()

    writes = [c for c in calls if c[1] & os.O_WRONLY]
    assert len(writes) == 1
    path, flags, mode = writes[0]
    assert Path(path).parent == tmp_path / "keys"
    assert Path(path).name != "root.pem"  # a temporary name, renamed into place
    assert flags & os.O_CREAT and flags & os.O_EXCL
    assert mode == 0o600
    assert manager.list_keys() == ["root"]


def test_disk_pem_is_pkcs8_and_encrypted_with_a_passphrase(tmp_path: Path) -> None:
    plain = DiskKeyManager(tmp_path / "plain")
    plain.generate_key("root", KeyAlgorithm.EC_P256)
    text = (tmp_path / "plain" / "root.pem").read_bytes()
    assert text.startswith(b"-----BEGIN PRIVATE KEY-----")
    serialization.load_pem_private_key(text, password=None)

    encrypted = DiskKeyManager(tmp_path / "enc", PASSPHRASE)
    key = encrypted.generate_key("root", KeyAlgorithm.RSA_2048)
    text = (tmp_path / "enc" / "root.pem").read_bytes()
    assert text.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    loaded = serialization.load_pem_private_key(text, password=PASSPHRASE)
    assert spki(loaded.public_key()) == spki(key.public_key())


def test_disk_encrypted_key_without_passphrase_is_a_config_error(tmp_path: Path) -> None:
    DiskKeyManager(tmp_path, PASSPHRASE).generate_key("root", KeyAlgorithm.EC_P256)
    with pytest.raises(ConfigError) as info:
        DiskKeyManager(tmp_path).get_key("root")
    assert str(info.value) == (
        f"key root in {tmp_path} is encrypted: set key_manager.passphrase_file or passphrase_env"
    )


def test_disk_wrong_passphrase_is_a_config_error(tmp_path: Path) -> None:
    DiskKeyManager(tmp_path, PASSPHRASE).generate_key("root", KeyAlgorithm.EC_P384)
    with pytest.raises(ConfigError, match=f"wrong passphrase for key root in {tmp_path}") as info:
        DiskKeyManager(tmp_path, b"not the passphrase").get_key("root")
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_disk_plain_key_still_loads_once_a_passphrase_is_configured(tmp_path: Path) -> None:
    key = DiskKeyManager(tmp_path).generate_key("root", KeyAlgorithm.EC_P256)
    loaded = DiskKeyManager(tmp_path, PASSPHRASE).get_key("root")
    assert loaded is not None and spki(loaded.public_key()) == spki(key.public_key())


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_disk_refuses_key_files_open_to_others(tmp_path: Path, mode: int) -> None:
    manager = DiskKeyManager(tmp_path)
    manager.generate_key("root", KeyAlgorithm.EC_P256)
    path = tmp_path / "root.pem"
    path.chmod(mode)
    with pytest.raises(ConfigError) as info:
        DiskKeyManager(tmp_path).get_key("root")
    assert f"permissions {mode:04o} on {path} are too open; expected 0600" in str(info.value)
    # The same manager must not serve a cached copy either.
    with pytest.raises(ConfigError, match="too open"):
        manager.get_key("root")


def test_disk_refuses_a_directory_others_may_write(tmp_path: Path) -> None:
    directory = tmp_path / "keys"
    directory.mkdir(mode=0o700)
    directory.chmod(0o777)
    with pytest.raises(ConfigError, match="permissions 0777 on .* are too open; expected 0700"):
        DiskKeyManager(directory)


def test_disk_refuses_a_symlinked_key_file(tmp_path: Path) -> None:
    other = DiskKeyManager(tmp_path / "elsewhere")
    other.generate_key("victim", KeyAlgorithm.EC_P256)
    manager = DiskKeyManager(tmp_path / "keys")
    (tmp_path / "keys" / "root.pem").symlink_to(tmp_path / "elsewhere" / "victim.pem")
    with pytest.raises(ConfigError, match="symbolic link"):
        manager.get_key("root")


def test_disk_errors_never_show_key_material(tmp_path: Path) -> None:
    DiskKeyManager(tmp_path, PASSPHRASE).generate_key("root", KeyAlgorithm.EC_P256)
    pem = (tmp_path / "root.pem").read_text()
    body = "".join(pem.splitlines()[1:-1])
    for manager in (DiskKeyManager(tmp_path), DiskKeyManager(tmp_path, b"wrong")):
        with pytest.raises(ConfigError) as info:
            manager.get_key("root")
        message = str(info.value)
        assert body[:16] not in message and PASSPHRASE.decode() not in message


def test_disk_damaged_file_is_a_config_error(tmp_path: Path) -> None:
    manager = DiskKeyManager(tmp_path)
    manager.generate_key("root", KeyAlgorithm.EC_P256)
    # the file's own PEM armour around a body that is not a key
    lines = (tmp_path / "root.pem").read_bytes().splitlines()
    (tmp_path / "root.pem").write_bytes(b"\n".join((lines[0], b"AAAA", lines[-1], b"")))
    with pytest.raises(ConfigError, match="not a PEM PKCS#8 private key"):
        DiskKeyManager(tmp_path).get_key("root")


def test_disk_sees_a_key_replaced_by_another_instance(tmp_path: Path) -> None:
    first, second = DiskKeyManager(tmp_path), DiskKeyManager(tmp_path)
    first.generate_key("root", KeyAlgorithm.EC_P256)
    assert first.get_key("root") is not None
    replacement = second.generate_key("root", KeyAlgorithm.EC_P256)
    current = first.get_key("root")
    assert current is not None and spki(current.public_key()) == spki(replacement.public_key())


def test_disk_lists_only_key_files(tmp_path: Path) -> None:
    manager = DiskKeyManager(tmp_path)
    manager.generate_key("root", KeyAlgorithm.EC_P256)
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / ".root.pem.0123.tmp").write_text("left over")
    (tmp_path / "bad name.pem").write_text("x")
    assert manager.list_keys() == ["root"]


def test_disk_refuses_an_empty_passphrase(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="empty"):
        DiskKeyManager(tmp_path, b"")


# -- the factory ------------------------------------------------------------------------


def test_factory_memory(tmp_path: Path) -> None:
    manager = open_key_manager(KeyManagerConfig(kind="memory"), tmp_path, {})
    assert isinstance(manager, MemoryKeyManager)
    assert not (tmp_path / "keys").exists()


def test_factory_disk_without_passphrase(tmp_path: Path) -> None:
    manager = open_key_manager(KeyManagerConfig(kind="disk"), tmp_path, {})
    assert isinstance(manager, DiskKeyManager)
    manager.generate_key("root", KeyAlgorithm.EC_P256)
    assert (tmp_path / "keys" / "root.pem").read_bytes().startswith(b"-----BEGIN PRIVATE KEY")


def test_factory_disk_passphrase_file_drops_the_trailing_newline(tmp_path: Path) -> None:
    secret = tmp_path / "passphrase"
    secret.write_bytes(PASSPHRASE + b"\n")
    config = KeyManagerConfig(kind="disk", passphrase_file=secret)
    open_key_manager(config, tmp_path, {}).generate_key("root", KeyAlgorithm.EC_P256)
    assert DiskKeyManager(tmp_path / "keys", PASSPHRASE).get_key("root") is not None


def test_factory_disk_passphrase_from_the_given_environ_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = KeyManagerConfig(kind="disk", passphrase_env="TM_TEST_PASSPHRASE")
    monkeypatch.setenv("TM_TEST_PASSPHRASE", "from-os-environ")
    manager = open_key_manager(config, tmp_path, {"TM_TEST_PASSPHRASE": PASSPHRASE.decode()})
    manager.generate_key("root", KeyAlgorithm.EC_P256)
    assert DiskKeyManager(tmp_path / "keys", PASSPHRASE).get_key("root") is not None
    monkeypatch.delenv("TM_TEST_PASSPHRASE")
    with pytest.raises(ConfigError, match="TM_TEST_PASSPHRASE is not set") as info:
        open_key_manager(config, tmp_path, {})
    assert info.value.field == "key_manager.passphrase_env"


@pytest.mark.parametrize(
    ("settings", "field_name", "message"),
    [
        ({"passphrase_file": "missing-file"}, "key_manager.passphrase_file", "cannot read"),
        (
            {"passphrase_file": "f", "passphrase_env": "E"},
            "key_manager.passphrase_file",
            "only one of",
        ),
    ],
)
def test_factory_disk_bad_passphrase_settings(
    tmp_path: Path, settings: dict[str, str], field_name: str, message: str
) -> None:
    values: dict[str, Any] = dict(settings)
    if "passphrase_file" in values:
        values["passphrase_file"] = tmp_path / values["passphrase_file"]
    with pytest.raises(ConfigError, match=message) as info:
        open_key_manager(KeyManagerConfig(kind="disk", **values), tmp_path, {"E": "x"})
    assert info.value.field == field_name


def test_factory_disk_empty_passphrase_file(tmp_path: Path) -> None:
    (tmp_path / "empty").write_bytes(b"\n")
    config = KeyManagerConfig(kind="disk", passphrase_file=tmp_path / "empty")
    with pytest.raises(ConfigError, match="is empty"):
        open_key_manager(config, tmp_path, {})


@pytest.mark.parametrize(
    ("settings", "field_name"),
    [
        ({"pkcs11_token_label": "t", "pkcs11_pin_env": "PIN"}, "key_manager.pkcs11_module"),
        ({"pkcs11_module": "/x.so", "pkcs11_pin_env": "PIN"}, "key_manager.pkcs11_token_label"),
        ({"pkcs11_module": "/x.so", "pkcs11_token_label": "t"}, "key_manager.pkcs11_pin_file"),
        (
            {"pkcs11_module": "/x.so", "pkcs11_token_label": "t", "pkcs11_pin_env": "NOPE"},
            "key_manager.pkcs11_pin_env",
        ),
        (
            {
                "pkcs11_module": "/nonexistent/lib.so",
                "pkcs11_token_label": "t",
                "pkcs11_pin_env": "PIN",
            },
            "key_manager.pkcs11_module",
        ),
    ],
)
def test_factory_pkcs11_missing_settings(
    tmp_path: Path, settings: dict[str, str], field_name: str
) -> None:
    config = KeyManagerConfig(kind="pkcs11", **settings)  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as info:
        open_key_manager(config, tmp_path, {"PIN": "1234"})
    assert info.value.field == field_name


def test_importing_the_package_does_not_load_pkcs11() -> None:
    code = (
        "import sys, trustmesh.pki.keys as k; "
        "assert 'pkcs11' not in sys.modules, 'pkcs11 imported eagerly'; "
        "print(sorted(k.__all__))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert "open_key_manager" in out and "PKCS11KeyManager" in out
