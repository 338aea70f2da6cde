"""Which SSH client a profile's ``transport = "auto"|"openssh"|"paramiko"`` means on this machine, and why.

``auto`` takes OpenSSH where its ``ssh`` can keep a ControlMaster (one login for a working session,
and everything the user's OpenSSH does: Kerberos, FIDO2, PKCS#11), which rules out Windows, whose
OpenSSH port has no ControlMaster; paramiko elsewhere.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

from hpclaunch.errors import ConfigError

OPENSSH = "openssh"
PARAMIKO = "paramiko"
AUTO = "auto"


@dataclass(frozen=True)
class Choice:
    name: str  # "openssh" or "paramiko"
    why: str  # one phrase for `config show`


def choose(kind: str = AUTO) -> Choice:
    """The client for ``kind``; ``openssh`` without an ``ssh`` on PATH is a ConfigError."""
    value = str(kind)
    ssh = shutil.which("ssh")
    if value == PARAMIKO:
        return Choice(PARAMIKO, 'transport = "paramiko"')
    if value == OPENSSH:
        if ssh is None:
            from hpclaunch.transport.openssh import NO_SSH, NO_SSH_HINT

            raise ConfigError(NO_SSH, hint=NO_SSH_HINT)
        return Choice(OPENSSH, f'transport = "openssh" ({ssh})')
    if value != AUTO:
        raise ConfigError(f"transport must be one of auto, openssh, paramiko, got {value!r}")
    if os.name == "nt":
        return Choice(PARAMIKO, "auto: Windows's OpenSSH has no ControlMaster")
    if ssh is None:
        return Choice(PARAMIKO, "auto: no OpenSSH client (`ssh`) on PATH")
    return Choice(OPENSSH, f"auto: {ssh} supports ControlMaster")
