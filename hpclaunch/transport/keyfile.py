"""A private key file on disk, as OpenSSH judges it before use: who may read it, whether it is locked.

Both transports ask before a login, so a refused login can say the likely reason in one line.
"""

from __future__ import annotations

import base64
import binascii
import os
import struct
import warnings

from hpclaunch.errors import HpclaunchWarning

_OPENSSH_BEGIN = "-----BEGIN OPENSSH PRIVATE KEY-----"
_OPENSSH_MAGIC = b"openssh-key-v1\0"


def warn_if_exposed(path: str, *, ignored: bool = False) -> None:
    """OpenSSH refuses a private key file that others can read (``ignored``: the OpenSSH transport,
    whose ssh skips it); paramiko would use it. Either way, say how to fix it."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & 0o066:
        how = "readable" if mode & 0o044 else "writable"
        effect = ", so ssh will not use it" if ignored else ""
        warnings.warn(
            f"SSH key {path} is {how} by other users{effect}; run: chmod 600 {path}",
            HpclaunchWarning,
            stacklevel=2,
        )


def needs_passphrase(path: str) -> bool:
    """Whether the key file is encrypted (OpenSSH's own format, or PEM/PKCS#8); False if unreadable."""
    try:
        with open(path, encoding="ascii", errors="replace") as file:
            text = file.read(64 * 1024)
    except OSError:
        return False
    # PEM's "Proc-Type: 4,ENCRYPTED" header, PKCS#8's "BEGIN ENCRYPTED PRIVATE KEY".
    if "ENCRYPTED" in text.split("\n\n", 1)[0]:
        return True
    if _OPENSSH_BEGIN not in text:
        return False
    body = text.split(_OPENSSH_BEGIN, 1)[1].split("-----END", 1)[0]
    try:
        blob = base64.b64decode("".join(body.split()))
    except (binascii.Error, ValueError):
        return False
    if not blob.startswith(_OPENSSH_MAGIC) or len(blob) < len(_OPENSSH_MAGIC) + 4:
        return False
    (size,) = struct.unpack(">I", blob[len(_OPENSSH_MAGIC) : len(_OPENSSH_MAGIC) + 4])
    start = len(_OPENSSH_MAGIC) + 4
    return blob[start : start + size] != b"none"


__all__ = ["needs_passphrase", "warn_if_exposed"]
