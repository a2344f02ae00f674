"""A fresh SoftHSM2 token per test, for tests of the PKCS#11 key manager.

``softhsm_token`` is the fixture, ready for ``from softhsm import
softhsm_token`` in a conftest; ``softhsm_token_fixture(label=..., pin=...)``
builds another one under whatever name it is assigned to (test modules use
``softhsm_token = softhsm_token_fixture()`` so they also run on their own).
The fixture writes a ``softhsm2.conf`` whose token
directory is a temporary one, points ``SOFTHSM2_CONF`` at it for this process
(and the processes it starts), initializes a token and yields a
``SoftHsmToken(module, label, pin)``.

SoftHSM reads its configuration and scans its tokens in ``C_Initialize``
only, so the fixture re-initializes the library in this process; PKCS#11
sessions opened before that (by earlier tests) stop working. When SoftHSM is
not installed the fixture fails, it does not skip: CI installs it with
``scripts/setup.sh --test``.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

__all__ = [
    "SOFTHSM_MODULE",
    "SoftHsmToken",
    "create_softhsm_token",
    "softhsm_token",
    "softhsm_token_fixture",
]

SOFTHSM_MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")
SO_PIN = "5678"


class SoftHsmToken(NamedTuple):
    """Where the token is and how to log in to it; unpacks as ``module, label, pin``."""

    module: Path
    label: str
    pin: str


def _require_softhsm() -> str:
    util = shutil.which("softhsm2-util")
    if util is None or not SOFTHSM_MODULE.is_file():
        pytest.fail(
            f"SoftHSM2 is not installed (need softhsm2-util and {SOFTHSM_MODULE}): "
            "run scripts/setup.sh --test",
            pytrace=False,
        )
    return util


def create_softhsm_token(
    directory: Path, monkeypatch: pytest.MonkeyPatch, label: str, pin: str
) -> SoftHsmToken:
    """Initialize a token under ``directory`` and make this process's SoftHSM see it."""
    util = _require_softhsm()
    tokens = directory / "tokens"
    tokens.mkdir(mode=0o700, parents=True, exist_ok=True)
    conf = directory / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    monkeypatch.setenv("SOFTHSM2_CONF", str(conf))
    result = subprocess.run(
        [util, "--init-token", "--free", "--label", label, "--pin", pin, "--so-pin", SO_PIN],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"softhsm2-util --init-token failed: {result.stderr or result.stdout}")
    _reinitialize_library()
    return SoftHsmToken(SOFTHSM_MODULE, label, pin)


def _reinitialize_library() -> None:
    """Make an already-loaded SoftHSM read the new SOFTHSM2_CONF and find the token."""
    import pkcs11

    lib = pkcs11.lib(str(SOFTHSM_MODULE))
    lib.reinitialize()


def _finalize_library() -> None:
    import pkcs11
    import pkcs11.exceptions

    try:
        pkcs11.lib(str(SOFTHSM_MODULE)).finalize()
    except pkcs11.exceptions.PKCS11Error:
        pass


def softhsm_token_fixture(label: str = "trustmesh-test", pin: str = "1234") -> Callable[..., Any]:
    """Build a function-scoped fixture that yields a fresh :class:`SoftHsmToken`."""

    @pytest.fixture
    def _softhsm_token(
        tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
    ) -> Iterator[SoftHsmToken]:
        directory = tmp_path_factory.mktemp("softhsm")
        yield create_softhsm_token(directory, monkeypatch, label, pin)
        # Let go of the token files before the temporary directory goes away.
        _finalize_library()

    return _softhsm_token


# Ready to import into a conftest: ``from softhsm import softhsm_token``.
softhsm_token = softhsm_token_fixture()
