"""OpenSSH user certificates (``KEY-cert.pub``, ``CertificateFile``): which key they certify, and when.

paramiko offers a certificate without looking inside it; the server then refuses an expired one
without saying why. Reading the validity here turns that into one clear line.
"""

from __future__ import annotations

import base64
import binascii
import struct
import time
from dataclasses import dataclass

#: Length-prefixed public-key fields after the nonce, per certificate type (PROTOCOL.certkeys).
_KEY_FIELDS = {
    "ssh-ed25519-cert-v01@openssh.com": 1,
    "ssh-rsa-cert-v01@openssh.com": 2,
    "ssh-dss-cert-v01@openssh.com": 4,
    "ecdsa-sha2-nistp256-cert-v01@openssh.com": 2,
    "ecdsa-sha2-nistp384-cert-v01@openssh.com": 2,
    "ecdsa-sha2-nistp521-cert-v01@openssh.com": 2,
    "sk-ssh-ed25519-cert-v01@openssh.com": 2,
    "sk-ecdsa-sha2-nistp256-cert-v01@openssh.com": 3,
}
_FOREVER = (1 << 64) - 1


@dataclass(frozen=True)
class Certificate:
    path: str
    cert_type: str
    #: The whole certificate blob (what is offered to the server).
    blob: bytes
    #: The plain public key blob it certifies (compare with ``PKey.asbytes()``).
    public_key: bytes
    key_id: str
    valid_after: int
    valid_before: int

    def problem(self, now: float | None = None) -> str | None:
        """Why it cannot be used now (expired, not yet valid), or None."""
        now = time.time() if now is None else now
        if self.valid_before != _FOREVER and now >= self.valid_before:
            return f"certificate {self.path} expired at {_when(self.valid_before)}; get a new one"
        if now < self.valid_after:
            return f"certificate {self.path} is not valid before {_when(self.valid_after)}"
        return None


def _when(stamp: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(stamp))


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError("truncated certificate")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def string(self) -> bytes:
        (length,) = struct.unpack(">I", self.take(4))
        return self.take(length)

    def uint64(self) -> int:
        value: int = struct.unpack(">Q", self.take(8))[0]
        return value


def _pack(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def parse_certificate(text: str, path: str = "<text>") -> Certificate:
    """A ``-cert.pub`` line (``type base64 [comment]``) -> Certificate; ValueError if it is not one."""
    fields = text.split()
    if len(fields) < 2:
        raise ValueError(f"{path} is not an OpenSSH certificate")
    try:
        blob = base64.b64decode(fields[1], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{path} is not an OpenSSH certificate") from None
    reader = _Reader(blob)
    cert_type = reader.string().decode("ascii", errors="replace")
    count = _KEY_FIELDS.get(cert_type)
    if count is None:
        raise ValueError(f"{path}: unknown certificate type {cert_type!r}")
    reader.string()  # nonce
    key_fields = b"".join(_pack(reader.string()) for _ in range(count))
    # sk- keys keep an "@openssh.com" suffix in their plain type.
    suffix = "@openssh.com" if cert_type.startswith("sk-") else ""
    plain_type = cert_type.replace("-cert-v01@openssh.com", suffix).encode("ascii")
    reader.uint64()  # serial
    reader.take(4)  # user or host certificate
    key_id = reader.string().decode("utf-8", errors="replace")
    reader.string()  # principals
    valid_after, valid_before = reader.uint64(), reader.uint64()
    return Certificate(
        path, cert_type, blob, _pack(plain_type) + key_fields, key_id, valid_after, valid_before
    )


def load_certificate(path: str) -> Certificate | None:
    """The certificate in ``path``; None when the file is missing or is not one."""
    try:
        with open(path, encoding="utf-8") as fh:
            return parse_certificate(fh.read(), path)
    except (OSError, ValueError):
        return None
