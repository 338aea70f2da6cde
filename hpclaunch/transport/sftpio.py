"""Writing files over SFTP safely: created with their mode, replaced atomically, directories with modes.

paramiko's ``SFTPClient.open`` sends no attributes, so a new file would start 0644 (the server's
umask) and be readable by others until a chmod; these helpers never leave such a window.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import paramiko


def open_for_write(sftp: paramiko.SFTPClient, path: str, mode: int) -> paramiko.SFTPFile:
    """Create ``path`` with ``mode`` in the OPEN request itself, so it is never readable by others.

    ``SFTPClient.open`` sends no attributes (the file would start 0644 by the server's umask).
    """
    from paramiko.sftp import CMD_HANDLE, CMD_OPEN, SFTP_FLAG_CREATE, SFTP_FLAG_EXCL, SFTP_FLAG_WRITE
    from paramiko.sftp_attr import SFTPAttributes
    from paramiko.sftp_file import SFTPFile

    attrs = SFTPAttributes()
    attrs.st_mode = mode
    flags = SFTP_FLAG_WRITE | SFTP_FLAG_CREATE | SFTP_FLAG_EXCL
    kind, msg = sftp._request(CMD_OPEN, path, flags, attrs)  # type: ignore[attr-defined]
    if kind != CMD_HANDLE:
        raise OSError(f"unexpected SFTP reply {kind} to open")
    handle = msg.get_binary()
    handle_file = SFTPFile(sftp, handle, "wb", -1)
    handle_file.set_pipelined(True)  # do not wait for each 32 KiB write's reply
    return handle_file


def write_atomic(sftp: paramiko.SFTPClient, target: str, mode: int, fill: Callable[[Any], None]) -> None:
    """Write through ``fill(file)`` into a temporary made with ``mode``, then rename it over ``target``."""
    tmp = f"{target}.tmp-{secrets.token_hex(6)}"
    try:
        with open_for_write(sftp, tmp, mode) as fh:
            fill(fh)
        sftp.chmod(tmp, mode)  # the server's umask may have cut bits the caller asked for
        try:
            sftp.posix_rename(tmp, target)
        except OSError as exc:
            if exc.errno is not None:
                raise
            # Server without posix-rename: plain rename refuses to replace, so remove first.
            with contextlib.suppress(FileNotFoundError):
                sftp.remove(target)
            sftp.rename(tmp, target)
    except BaseException:
        with contextlib.suppress(Exception):
            sftp.remove(tmp)
        raise


def makedirs(sftp: paramiko.SFTPClient, target: str, mode: int) -> None:
    """Make ``target`` and its missing parents, each with ``mode`` (past the server's umask)."""
    missing: list[str] = []
    current = target.rstrip("/") or "/"
    while current not in ("", "/", "."):
        try:
            sftp.stat(current)
            break
        except FileNotFoundError:
            missing.append(current)
            current = os.path.dirname(current)
    for directory in reversed(missing):
        try:
            sftp.mkdir(directory, mode)
        except OSError:
            # Someone else made it meanwhile: fine; anything else shows on the next stat.
            sftp.stat(directory)
        sftp.chmod(directory, mode)
