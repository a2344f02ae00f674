"""Key manager that keeps each CA key in a PEM file (PKCS#8) under one directory.

Layout: ``<directory>/<key_id>.pem``, the directory mode 0700 and every file
0600 from the moment it exists. Files are written to a temporary name, synced
and renamed into place, so a crash leaves either the old key or the new one,
never half of either. With a passphrase the PEM is encrypted
(``BestAvailableEncryption``). Like ssh, a key file readable by group or
others is refused rather than used.

Nothing here logs key material or puts it into an exception message.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import stat
import threading
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from trustmesh.errors import ConfigError, InvalidInput
from trustmesh.pki.keys.base import KeyAlgorithm, SigningKey, generate_software_key

__all__ = ["DiskKeyManager", "validate_key_id"]

_KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_SUFFIX = ".pem"
_SUPPORTED_CURVES = (ec.SECP256R1, ec.SECP384R1)


def validate_key_id(key_id: str) -> str:
    """Return ``key_id`` if it is a safe key name, else raise InvalidInput.

    A key id is 1-64 characters from ``A-Z a-z 0-9 . _ -`` and does not start
    with ``.`` (which rules out ``.``, ``..`` and hidden or temporary files).
    """
    if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id) or key_id.startswith("."):
        raise InvalidInput(
            f"invalid key id {key_id!r}: use 1-64 characters from A-Z a-z 0-9 . _ - "
            "not starting with '.'",
            field="key_id",
        )
    return key_id


class DiskKeyManager:
    """CA keys as PEM PKCS#8 files in ``directory``, optionally passphrase-encrypted."""

    def __init__(self, directory: Path, passphrase: bytes | None = None) -> None:
        if passphrase is not None and not passphrase:
            raise ConfigError("the key passphrase is empty")
        self._dir = Path(directory)
        self._passphrase = passphrase
        self._lock = threading.Lock()
        # key_id -> (device, inode, mtime_ns, size) of the file it was read from, and the key.
        self._cache: dict[str, tuple[tuple[int, int, int, int], SigningKey]] = {}
        self._ensure_directory()

    @property
    def name(self) -> str:
        return "disk"

    @property
    def directory(self) -> Path:
        """Where the key files live."""
        return self._dir

    # -- KeyManager -----------------------------------------------------------------

    def generate_key(self, key_id: str, algorithm: KeyAlgorithm) -> SigningKey:
        """Create a key, write it atomically as ``<key_id>.pem`` (0600) and return it."""
        validate_key_id(key_id)
        key = generate_software_key(algorithm)
        if self._passphrase is None:
            encryption: serialization.KeySerializationEncryption = serialization.NoEncryption()
        else:
            encryption = serialization.BestAvailableEncryption(self._passphrase)
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        )
        with self._lock:
            self._write_atomically(self._path(key_id), pem)
            self._cache.pop(key_id, None)
        return key

    def get_key(self, key_id: str) -> SigningKey | None:
        """Load ``<key_id>.pem``; None when there is no such file."""
        validate_key_id(key_id)
        with self._lock:
            return self._load(key_id)

    def delete_key(self, key_id: str) -> None:
        """Remove ``<key_id>.pem``; a missing file is not an error."""
        validate_key_id(key_id)
        with self._lock:
            self._cache.pop(key_id, None)
            try:
                os.unlink(self._path(key_id))
            except FileNotFoundError:
                return
            except OSError as exc:
                raise ConfigError(
                    f"cannot delete key {key_id} in {self._dir}: {exc.strerror}"
                ) from None
            self._sync_directory()

    def list_keys(self) -> list[str]:
        """Ids of the ``*.pem`` files in the directory, sorted."""
        try:
            names = os.listdir(self._dir)
        except OSError as exc:
            raise ConfigError(f"cannot list key directory {self._dir}: {exc.strerror}") from None
        ids = []
        for file_name in names:
            if not file_name.endswith(_SUFFIX):
                continue
            stem = file_name[: -len(_SUFFIX)]
            if _KEY_ID.fullmatch(stem) and not stem.startswith("."):
                ids.append(stem)
        return sorted(ids)

    # -- internals ------------------------------------------------------------------

    def _path(self, key_id: str) -> Path:
        return self._dir / f"{key_id}{_SUFFIX}"

    def _ensure_directory(self) -> None:
        try:
            self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = os.stat(self._dir)
        except OSError as exc:
            raise ConfigError(f"cannot create key directory {self._dir}: {exc.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"key directory {self._dir} is not a directory")
        mode = stat.S_IMODE(st.st_mode)
        # Anyone who may write into the directory may swap a CA key for their own.
        if mode & 0o022:
            raise ConfigError(
                f"permissions {mode:04o} on {self._dir} are too open; expected 0700 "
                f"(run: chmod 700 {self._dir})"
            )

    def _write_atomically(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            fd = os.open(tmp, flags, 0o600)
        except OSError as exc:
            raise ConfigError(f"cannot write a key into {self._dir}: {exc.strerror}") from None
        try:
            try:
                # The umask can only remove bits; make sure it left exactly 0600.
                os.fchmod(fd, 0o600)
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise ConfigError(f"cannot write key file {path}: {exc.strerror}") from None
        self._sync_directory()

    def _sync_directory(self) -> None:
        """Make a rename or unlink in the directory durable."""
        try:
            fd = os.open(self._dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise ConfigError(f"cannot open key directory {self._dir}: {exc.strerror}") from None
        try:
            os.fsync(fd)
        except OSError as exc:
            # Some filesystems cannot fsync a directory; the rename itself already happened.
            if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
                raise ConfigError(
                    f"cannot sync key directory {self._dir}: {exc.strerror}"
                ) from None
        finally:
            os.close(fd)

    def _load(self, key_id: str) -> SigningKey | None:
        path = self._path(key_id)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            self._cache.pop(key_id, None)
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ConfigError(f"key file {path} is a symbolic link; refusing it") from None
            raise ConfigError(f"cannot read key file {path}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(f"key file {path} is not a regular file")
            mode = stat.S_IMODE(st.st_mode)
            if mode & 0o077:
                raise ConfigError(
                    f"permissions {mode:04o} on {path} are too open; expected 0600 "
                    f"(run: chmod 600 {path})"
                )
            if st.st_uid not in (os.geteuid(), 0):
                raise ConfigError(f"key file {path} is owned by uid {st.st_uid}, not by this user")
            fingerprint = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
            cached = self._cache.get(key_id)
            if cached is not None and cached[0] == fingerprint:
                return cached[1]
            with os.fdopen(os.dup(fd), "rb") as f:
                pem = f.read()
        except OSError as exc:
            raise ConfigError(f"cannot read key file {path}: {exc.strerror}") from None
        finally:
            os.close(fd)
        key = self._parse(key_id, pem)
        self._cache[key_id] = (fingerprint, key)
        return key

    def _parse(self, key_id: str, pem: bytes) -> SigningKey:
        encrypted = b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in pem
        if encrypted and self._passphrase is None:
            raise ConfigError(
                f"key {key_id} in {self._dir} is encrypted: "
                "set key_manager.passphrase_file or passphrase_env"
            )
        # A plain key is still accepted when a passphrase is configured, so that
        # keys written before the passphrase was introduced keep working.
        password = self._passphrase if encrypted else None
        try:
            key = serialization.load_pem_private_key(pem, password=password)
        except (ValueError, TypeError):
            # Never chain the library's exception: keep key bytes out of tracebacks.
            if encrypted:
                raise ConfigError(
                    f"wrong passphrase for key {key_id} in {self._dir} (or the file is damaged)"
                ) from None
            raise ConfigError(
                f"key file {self._path(key_id)} is not a PEM PKCS#8 private key"
            ) from None
        if isinstance(key, rsa.RSAPrivateKey):
            return key
        if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, _SUPPORTED_CURVES):
            return key
        raise ConfigError(
            f"key file {self._path(key_id)} holds a {type(key).__name__}; "
            "a CA key must be RSA or EC P-256/P-384"
        )
