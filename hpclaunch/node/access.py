"""Give an SSH client a way onto a job's node (write its entry) and take it back (remove it).

``step`` (the default): a ProxyCommand ``hpclaunch proxy JOB`` and a per-job host key (see
:mod:`.stepsshd`). ``jump``: through the login host to the node's own sshd, its host key read once
from the login host (``ssh-keyscan`` there) and pinned, never "accept anything".
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..config import NodeAccess
from ..errors import HpclaunchError, NodeAccessError
from . import sshentry, stepsshd

if TYPE_CHECKING:
    from ..submission import Submitter
    from .target import NodeTarget


def hpclaunch_argv(global_options: Sequence[str] = ()) -> list[str]:
    """How ssh runs this very hpclaunch (same interpreter, same config and profile)."""
    return [sys.executable, "-m", "hpclaunch", *global_options]


def grant(
    cluster: Submitter,
    target: NodeTarget,
    *,
    global_options: Sequence[str] = (),
    mode: NodeAccess | None = None,
    where: sshentry.Paths | None = None,
) -> sshentry.Entry:
    """Write the job's ``Host hpclaunch-JOB`` entry (and, for ``step``, its server files)."""
    profile = cluster.profile
    mode = mode or profile.node_access
    identities = sshentry.login_identities(profile.host, profile.ssh_config, profile.identity_file)
    if mode is NodeAccess.STEP:
        key = stepsshd.install(cluster, target.job_id)
        entry = sshentry.Entry(
            job_id=target.job_id,
            user=target.user,
            host_name=target.node,
            proxy_command=[*hpclaunch_argv(global_options), "proxy", target.job_id],
            identity_files=identities,
            host_keys=[key.public_line],
        )
    else:
        port = profile.node_ssh_port or 22
        keys = _scan_host_keys(cluster, target.node, port)
        proxy_command: list[str] = []
        jump = None
        if profile.host:
            login = f"{profile.user}@{profile.host}" if profile.user else profile.host
            if profile.ssh_config:  # an alias from that file: the jump must read it too
                proxy_command = ["ssh", "-F", profile.ssh_config, "-W", f"{target.node}:{port}", login]
            else:
                jump = login + (f":{profile.port}" if profile.port else "")
        entry = sshentry.Entry(
            job_id=target.job_id,
            user=target.user,
            host_name=target.node,
            port=port,
            proxy_command=proxy_command,
            proxy_jump=jump,
            identity_files=identities,
            host_keys=keys,
        )
    sshentry.write(entry, where)
    return entry


def revoke(cluster: Submitter, job_id: str, *, where: sshentry.Paths | None = None) -> bool:
    """Remove the entry and the job's server files; whether an entry was there. Best effort on the
    cluster side: a job that ended may have taken the connection's patience with it."""
    removed = sshentry.remove(job_id, where)
    with contextlib.suppress(HpclaunchError):
        stepsshd.uninstall(cluster, job_id)
    return removed


def _scan_host_keys(cluster: Submitter, node: str, port: int) -> list[str]:
    """The node's host keys as the login host sees them (inside the site's network)."""
    argv = ["ssh-keyscan", "-T", "5", "-p", str(port), node]
    result = cluster.transport.run(argv, timeout=30, check=False)
    keys = [
        " ".join(line.split()[1:3])
        for line in result.stdout.splitlines()
        if line.strip() and not line.startswith("#") and len(line.split()) >= 3
    ]
    if not keys:
        raise NodeAccessError(
            f"no sshd answers on {node}:{port} from {cluster.transport.description}",
            hint='this site may not run sshd on its nodes: use node_access = "step"',
        )
    return keys
