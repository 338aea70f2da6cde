"""Whether this machine holds a Kerberos ticket (``klist -s``), to explain a refused GSSAPI login.

Only asked after a login failed: ssh itself does GSSAPI, and says nothing about a missing ticket at
``LogLevel ERROR``. ``klist`` reads the same ``KRB5CCNAME``/``KRB5_CONFIG`` as the ssh it runs beside.
"""

from __future__ import annotations

import shutil
import subprocess

#: Seconds for ``klist -s`` (it reads a local cache; it never talks to the KDC).
KLIST_TIMEOUT = 10.0


def has_ticket() -> bool | None:
    """True when the credential cache holds an unexpired ticket, False when it holds none,
    None when this cannot be told (no ``klist`` installed, or it hung). MIT and Heimdal both know ``-s``."""
    klist = shutil.which("klist")
    if klist is None:
        return None
    try:
        proc = subprocess.run(
            [klist, "-s"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=KLIST_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.returncode == 0
