"""``hpclaunch connect`` / ``disconnect``: one login for a working session, opened and ended by hand.

The kept connection is the ControlMaster with the OpenSSH transport, a connection holder with paramiko
(``session_idle`` seconds after the last use either way); ``connect`` logs in now, so an MFA prompt
comes once, here, and not in the middle of a later command.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from ..console import say
from .context import AppContext

if TYPE_CHECKING:
    from ..transport.base import Transport

OFF = "session_idle = 0: each command logs in and logs out"
NO_HOLDER = (
    "not kept between commands: the paramiko transport's connection holder needs unix sockets, "
    "which this system lacks; each command logs in"
)


def session_state(transport: Transport, idle: int) -> str:
    """The kept connection of a profile, in one phrase (for ``config show`` and ``connect``)."""
    from ..transport.held import HeldTransport
    from ..transport.openssh import OpenSSHTransport

    if not transport.is_remote:
        return "none needed: commands run on this machine"
    if isinstance(transport, HeldTransport):
        pid = transport.holder_pid()
        if pid is None:
            return f"closed (the next command logs in and keeps it for {idle} s idle)"
        return f"open: connection holder pid {pid} ({transport.socket_path}), ends after {idle} s idle"
    if not isinstance(transport, OpenSSHTransport):
        return OFF if idle == 0 else NO_HOLDER
    pid = transport.master_pid()
    if idle == 0:
        return f"open (ssh master pid {pid}); {OFF}" if pid else OFF
    if pid is None:
        return f"closed (the next command logs in and keeps it for {idle} s idle)"
    return f"open: ssh master pid {pid} ({transport.control_path}), ends after {idle} s idle"


@click.command("connect")
@click.pass_obj
def command(app: AppContext) -> None:
    """Log in to the profile's host now and keep the connection for the commands that follow."""
    cluster = app.cluster()
    transport = cluster.transport
    transport.connect()
    say(f"{transport.description}: {session_state(transport, cluster.profile.session_idle)}")


@click.command("disconnect")
@click.pass_obj
def disconnect(app: AppContext) -> None:
    """End the connection kept for the profile (the next command logs in again)."""
    from ..transport.held import HeldTransport
    from ..transport.openssh import OpenSSHTransport

    transport = app.cluster().transport
    if isinstance(transport, (OpenSSHTransport, HeldTransport)):
        ended = transport.end_master() if isinstance(transport, OpenSSHTransport) else transport.end_holder()
        say(f"{transport.description}: {'disconnected' if ended else 'no connection was open'}")
    elif transport.is_remote:
        say(f"{transport.description}: {session_state(transport, app.cluster().profile.session_idle)}")
    else:
        say("no connection: commands run on this machine")
