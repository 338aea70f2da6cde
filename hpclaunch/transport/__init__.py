"""Ways to reach the cluster: this machine (a login node) or one SSH connection to a login node.

``connect(None)`` runs everything locally; ``connect("hpcdev")`` goes through ``~/.ssh/config``'s
``Host hpcdev``, with the system OpenSSH (a ControlMaster) or paramiko, as :mod:`.choice` decides.
The paramiko transport imports paramiko only when it is used, so ``hpclaunch --help`` stays fast.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from hpclaunch.transport.base import CommandResult, Forward, ForwardStatus, PathNotFound, Transport

if TYPE_CHECKING:
    from hpclaunch.transport.local import LocalTransport
    from hpclaunch.transport.openssh import OpenSSHTransport
    from hpclaunch.transport.ssh import SSHTransport
    from hpclaunch.transport.sshauth import Prompter

__all__ = [
    "CommandResult",
    "Forward",
    "ForwardStatus",
    "LocalTransport",
    "OpenSSHTransport",
    "PathNotFound",
    "SSHTransport",
    "Transport",
    "connect",
]


def connect(
    host: str | None,
    *,
    user: str | None = None,
    port: int | None = None,
    identity_file: str | Sequence[str] | None = None,
    ssh_config_path: str | None = None,
    accept_new_host_key: bool = False,
    known_hosts_file: str | None = None,
    connect_timeout: float | None = None,
    keepalive: int | None = None,
    prompter: Prompter | None = None,
    login_shell: bool = True,
    transport: str = "auto",
    session_idle: int = 600,
) -> Transport:
    """A transport for ``host``: local when it is None or empty, else SSH (opened on first use).

    ``accept_new_host_key`` (or ``HPCLAUNCH_ACCEPT_NEW_HOST_KEY=1``, or ``StrictHostKeyChecking
    accept-new`` in the ssh config) records the key of a host seen for the first time; a changed key
    is always refused. ``prompter`` answers keyboard-interactive prompts (default: the terminal; the
    OpenSSH transport lets ``ssh`` ask). ``transport``: ``auto``, ``openssh`` or ``paramiko``;
    ``session_idle``: seconds the kept connection stays up, idle, for the next process (0: off): the
    OpenSSH master, or with paramiko a connection holder (:mod:`.held`; where unix sockets with peer
    credentials are missing, e.g. Windows, paramiko logs in once per process instead).
    ``login_shell`` runs SSH commands in the environment of the user's login shell on the host (captured
    once per connection); locally the process environment is already the login one and is used as is.
    """
    if not host:
        from hpclaunch.transport.local import LocalTransport

        return LocalTransport()
    from hpclaunch.transport.choice import OPENSSH, choose

    # What every SSH transport takes; each adds its own way of keeping the login.
    common = {
        "user": user,
        "port": port,
        "identity_file": identity_file,
        "ssh_config_path": ssh_config_path,
        "accept_new_host_key": accept_new_host_key,
        "known_hosts_file": known_hosts_file,
        "connect_timeout": connect_timeout,
        "keepalive": keepalive,
        "login_shell": login_shell,
    }
    if choose(transport).name == OPENSSH:
        from hpclaunch.transport.openssh import OpenSSHTransport

        return OpenSSHTransport(host, persist=session_idle, **common)  # type: ignore[arg-type]
    from hpclaunch.transport import held

    if session_idle > 0 and held.supported():
        return held.HeldTransport(host, prompter=prompter, idle=session_idle, **common)  # type: ignore[arg-type]
    from hpclaunch.transport.ssh import SSHTransport

    return SSHTransport(host, prompter=prompter, **common)  # type: ignore[arg-type]


def __getattr__(name: str) -> object:
    # Each transport's module loads when it is used: paramiko not up front, and an SSH profile never
    # imports the local transport.
    if name == "LocalTransport":
        from hpclaunch.transport.local import LocalTransport

        return LocalTransport
    if name == "SSHTransport":
        from hpclaunch.transport.ssh import SSHTransport

        return SSHTransport
    if name == "OpenSSHTransport":
        from hpclaunch.transport.openssh import OpenSSHTransport

        return OpenSSHTransport
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
