"""The private runtime directory: where connections kept between CLI commands have their sockets.

``$HPCLAUNCH_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/hpclaunch``, else ``/tmp/hpclaunch-<uid>``. It must be
a real directory (not a symlink), owned by this user and closed to everyone else (0700): whoever can
reach a ControlMaster socket runs commands as us, so a directory another user made or opened is refused.
Unix socket paths are limited to about 104 bytes, hence a short default under /tmp.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile

from hpclaunch.errors import TransportError

ENV = "HPCLAUNCH_RUNTIME_DIR"
#: sun_path is 108 bytes on Linux, 104 on macOS; OpenSSH adds a 17-byte suffix while it binds.
MAX_SOCKET_PATH = 104 - 17


def directory() -> str:
    """The runtime directory, made 0700 if missing; a TransportError if it is not safe to use."""
    path = os.environ.get(ENV) or ""
    if not path:
        xdg = os.environ.get("XDG_RUNTIME_DIR") or ""
        path = os.path.join(xdg, "hpclaunch") if xdg else ""
        if not path or len(path) > 40:
            path = os.path.join(tempfile.gettempdir(), f"hpclaunch-{os.getuid()}")
    path = os.path.abspath(os.path.expanduser(path))
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise TransportError(f"cannot create the runtime directory {path}: {exc.strerror or exc}") from None
    check_private(path)
    return path


def check_private(path: str) -> None:
    """Refuse ``path`` unless it is a directory of ours that nobody else can enter."""
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise TransportError(
            f"the runtime directory {path} is not a directory", hint=f"remove it, or set {ENV}"
        )
    if info.st_uid != os.getuid():
        raise TransportError(
            f"the runtime directory {path} belongs to another user (uid {info.st_uid})",
            hint=f"someone may be trying to intercept your connections; set {ENV} to a directory of yours",
        )
    if info.st_mode & 0o077:
        raise TransportError(
            f"the runtime directory {path} is open to other users ({stat.filemode(info.st_mode)})",
            hint=f"run: chmod 700 {path}",
        )


def socket_path(kind: str, identity: str, in_dir: str | None = None) -> str:
    """``<runtime dir>/<kind>-<hash of identity>``: one socket per distinct way of connecting (another
    key or config is another login); a TransportError if it is too long for a unix socket."""
    key = hashlib.sha256(identity.encode()).hexdigest()[:20]
    path = os.path.join(in_dir or directory(), f"{kind}-{key}")
    if len(path) > MAX_SOCKET_PATH:
        raise TransportError(
            f"the {kind} socket path {path} is too long for a unix socket",
            hint=f"set {ENV} to a shorter directory",
        )
    return path
