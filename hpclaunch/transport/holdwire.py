"""The wire between a CLI process and its connection holder (:mod:`.holder`), and who may use it.

A message is a 4-byte big-endian length, that many bytes of one JSON object, then, when the object
has ``"blob": N``, N raw bytes (file contents, a command's stdin: never base64, never pickled). Only
JSON is ever parsed from the socket: a peer that could make us unpickle could run code as us.

Errors travel as data (:func:`error_to_wire`) and come back as the same hpclaunch class with the same
one line and hint, so a command through the holder fails exactly as it would on its own connection.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
from typing import Any

from hpclaunch.errors import (
    CommandError,
    CommandTimeout,
    ConfigError,
    ConnectionFailed,
    HostKeyError,
    HpclaunchError,
    TransportError,
    TunnelError,
)
from hpclaunch.transport.base import PathNotFound

#: Bumped when a message changes meaning; a holder of another version is ended and replaced.
VERSION = 1
_HEAD = struct.Struct(">I")
#: A header is a few hundred bytes; anything this big is not one of ours.
MAX_HEADER = 16 << 20

Message = dict[str, Any]

# Only these come back as themselves; anything else is a TransportError with the same line.
_ERRORS: dict[str, type[HpclaunchError]] = {
    cls.__name__: cls
    for cls in (
        TransportError,
        ConnectionFailed,
        HostKeyError,
        CommandTimeout,
        TunnelError,
        ConfigError,
    )
}


class WireError(TransportError):
    """The other end sent something that is not a message of this protocol, or hung up mid-way."""


class Closed(WireError, EOFError):
    """The other end hung up between two messages (an ordinary end of a conversation)."""


def send(sock: socket.socket, message: Message, blob: bytes | None = None) -> None:
    if blob is not None:
        message = {**message, "blob": len(blob)}
    data = json.dumps(message, separators=(",", ":")).encode("utf-8")
    sock.sendall(_HEAD.pack(len(data)) + data)
    if blob:
        sock.sendall(blob)


def recv(sock: socket.socket) -> tuple[Message, bytes | None]:
    """The next message and its blob (None without one); :class:`Closed` at a clean end."""
    head = _exactly(sock, _HEAD.size, at_start=True)
    (size,) = _HEAD.unpack(head)
    if size > MAX_HEADER:
        raise WireError(f"a message header of {size} bytes is not one of ours")
    try:
        message = json.loads(_exactly(sock, size).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise WireError("a message that is not JSON") from None
    if not isinstance(message, dict):
        raise WireError("a message that is not a JSON object")
    blob = message.pop("blob", None)
    if blob is None:
        return message, None
    if not isinstance(blob, int) or blob < 0:
        raise WireError(f"a bad blob size {blob!r}")
    return message, _exactly(sock, blob)


def _exactly(sock: socket.socket, size: int, *, at_start: bool = False) -> bytes:
    chunks: list[bytes] = []
    left = size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            if at_start and left == size:
                raise Closed("the other end hung up")
            raise WireError("the other end hung up in the middle of a message")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


# -- errors as data ---------------------------------------------------------------------------------


def error_to_wire(exc: BaseException) -> Message:
    """``exc`` as a message; what is not an hpclaunch error is reported as the holder's own failure."""
    if isinstance(exc, PathNotFound):
        where = exc.message.split(": ", 1)[0].removeprefix("no such file on ")
        return {"class": "PathNotFound", "path": exc.filename, "where": where, "message": exc.message}
    if isinstance(exc, CommandError):
        return {
            "class": "CommandError",
            "argv": list(exc.argv),
            "returncode": exc.returncode,
            "stdout": exc.stdout,
            "stderr": exc.stderr,
            "message": exc.message,
            "hint": exc.hint,
        }
    if isinstance(exc, HpclaunchError):
        name = type(exc).__name__ if type(exc).__name__ in _ERRORS else "TransportError"
        return {"class": name, "message": exc.message, "hint": exc.hint, "details": exc.details}
    return {
        "class": "TransportError",
        "message": f"the connection holder failed: {type(exc).__name__}: {exc}",
        "hint": "`hpclaunch disconnect` ends it; the next command starts a new one",
    }


def error_from_wire(data: Any) -> HpclaunchError:
    """The exception a message describes; a malformed one is a WireError, never a crash."""
    if not isinstance(data, dict) or not isinstance(data.get("message"), str):
        return WireError(f"the connection holder sent a malformed error: {str(data)[:200]}")
    kind = data.get("class")
    hint = data.get("hint") if isinstance(data.get("hint"), str) else None
    try:
        if kind == "PathNotFound":
            return PathNotFound(str(data["path"]), str(data["where"]))
        if kind == "CommandError":
            return CommandError(
                [str(a) for a in data["argv"]],
                int(data["returncode"]),
                str(data["stdout"]),
                str(data["stderr"]),
                message=data["message"],
                hint=hint,
            )
    except (KeyError, TypeError, ValueError):
        return WireError(f"the connection holder sent a malformed error: {str(data)[:200]}")
    details = data.get("details") if isinstance(data.get("details"), str) else None
    return _ERRORS.get(str(kind), TransportError)(data["message"], hint=hint, details=details)


# -- who is on the other end ------------------------------------------------------------------------


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end of a unix socket; None where the OS cannot say.

    Linux: ``SO_PEERCRED``; macOS and the BSDs: ``LOCAL_PEERCRED`` (a ``struct xucred``).
    """
    if sys.platform.startswith("linux") and hasattr(socket, "SO_PEERCRED"):
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        return int(uid)
    local_peercred = getattr(socket, "LOCAL_PEERCRED", None)
    if local_peercred is not None:
        # struct xucred { u_int cr_version; uid_t cr_uid; short cr_ngroups; gid_t cr_groups[16]; }
        raw = sock.getsockopt(0, local_peercred, struct.calcsize("2I") + 2 + 16 * 4 + 2)
        _version, uid = struct.unpack_from("2I", raw)
        return int(uid)
    return None


def can_check_peers() -> bool:
    """Whether :func:`peer_uid` works here (the holder is used only where it does)."""
    linux = sys.platform.startswith("linux") and hasattr(socket, "SO_PEERCRED")
    return hasattr(socket, "AF_UNIX") and (linux or hasattr(socket, "LOCAL_PEERCRED"))


def same_user(sock: socket.socket) -> bool:
    """Whether the peer runs as us. Unknown counts as no: the 0700 directory alone is not enough."""
    try:
        uid = peer_uid(sock)
    except OSError:
        return False
    return uid is not None and uid == os.getuid()
