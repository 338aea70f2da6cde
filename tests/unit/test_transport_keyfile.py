"""Whether a key file is locked by a passphrase: read from the file, as ssh-keygen wrote it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from hpclaunch.transport.keyfile import needs_passphrase

needs_keygen = pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs ssh-keygen (OpenSSH)")


def keygen(path: Path, passphrase: str, *extra: str) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-N", passphrase, "-f", str(path), *extra], check=True)
    return path


@needs_keygen
@pytest.mark.parametrize("kind", [["-t", "ed25519"], ["-t", "rsa", "-b", "2048", "-m", "PEM"]])
def test_locked_and_open_keys(tmp_path: Path, kind: list[str]) -> None:
    assert needs_passphrase(str(keygen(tmp_path / "locked", "s3cret", *kind)))
    assert not needs_passphrase(str(keygen(tmp_path / "open", "", *kind)))


@pytest.mark.parametrize(
    "text",
    [
        "not a key\n",
        "-----BEGIN OPENSSH PRIVATE KEY-----\n!!!notbase64\n-----END OPENSSH PRIVATE KEY-----\n",
        "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n",
    ],
)
def test_what_is_not_a_readable_key_is_not_locked(tmp_path: Path, text: str) -> None:
    path = tmp_path / "key"
    path.write_text(text)
    assert not needs_passphrase(str(path))
    assert not needs_passphrase(str(tmp_path / "missing"))
