"""``hpclaunch connect`` / ``disconnect``: one login for a working session, opened and ended by hand.

With the OpenSSH transport the kept connection is the ControlMaster (``session_idle`` seconds after
the last use); ``connect`` logs in now, so an MFA prompt comes once, here, and not in the middle of a
later command.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from ..console import say
from .context import AppContext

if TYPE_CHECKING:
    from ..transport.base import Transport

PARAMIKO_NOTE = (
    "not kept between commands: the paramiko transport logs in once per command "
    '(transport = "openssh" keeps one login for a working session)'
)


def session_state(transport: Transport, idle: int) -> str:
    """The kept connection of a profile, in one phrase (for ``config show`` and ``connect``)."""
    from ..transport.openssh import OpenSSHTransport

    if not transport.is_remote:
        return "none needed: commands run on this machine"
    if not isinstance(transport, OpenSSHTransport):
        return PARAMIKO_NOTE
    pid = transport.master_pid()
    if idle == 0:
        kept = "session_idle = 0: each command logs in and logs out"
        return f"open (ssh master pid {pid}); {kept}" if pid else kept
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
    from ..transport.openssh import OpenSSHTransport

    transport = app.cluster().transport
    if isinstance(transport, OpenSSHTransport):
        ended = transport.end_master()
        say(f"{transport.description}: {'disconnected' if ended else 'no connection was open'}")
    elif transport.is_remote:
        say(f"{transport.description}: {PARAMIKO_NOTE}")
    else:
        say("no connection: commands run on this machine")
