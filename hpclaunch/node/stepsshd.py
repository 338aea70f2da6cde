"""An unprivileged ``sshd -i`` as a step of the job: an SSH server on the node that opens no port.

``hpclaunch proxy JOB`` (an OpenSSH ``ProxyCommand``) runs ``srun -u --overlap --jobid JOB start.sh``
through the connection and relays its stdin/stdout; ``start.sh`` puts the step's Slurm and GPU
environment into the session (sshd starts sessions from a clean one) and runs ``sshd -i`` with the
job's own host key and the user's own ``authorized_keys``. Without ``-u`` srun buffers and the key
exchange stalls. The files live in ``WORKDIR/node-sshd/JOB`` on the cluster side, all 0600/0700.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import NodeAccessError
from .shell import step_argv

if TYPE_CHECKING:
    from ..submission import Submitter
    from .target import NodeTarget

DIR_NAME = "node-sshd"

#: The session's environment from the step's: Slurm's variables and the GPUs it was given. One
#: ``SetEnv`` line (sshd keeps only the first), values that quoting cannot carry left out.
START_SH = r"""#!/bin/bash
# Written by hpclaunch: runs as a step of the job; stdin/stdout are the SSH connection.
set -eu
dir=$(cd "$(dirname "$0")" && pwd)
cfg="$dir/sshd_config.$$"
trap 'rm -f "$cfg"' EXIT
{
  cat "$dir/sshd_config"
  printf 'SetEnv'
  while IFS= read -r -d '' kv; do
    case "$kv" in
      SLURM_*=* | SLURMD_NODENAME=* | CUDA_VISIBLE_DEVICES=* | GPU_DEVICE_ORDINAL=* | ROCR_VISIBLE_DEVICES=* \
        | HIP_VISIBLE_DEVICES=* | ZE_AFFINITY_MASK=*) ;;
      *) continue ;;
    esac
    case "$kv" in *'"'* | *\\* | *$'\n'*) continue ;; esac
    printf ' "%s"' "$kv"
  done < <(env -0)
  printf '\n'
} > "$cfg"
chmod 600 "$cfg"
sshd=$(command -v sshd || echo /usr/sbin/sshd)
"$sshd" -i -f "$cfg"
"""


def sshd_config(directory: str) -> str:
    """The per-job server: only the user's keys, no PAM, no pid file; forwarding on for VS Code."""
    return f"""# Written by hpclaunch for one job; removed by `hpclaunch ssh-config JOB --remove`.
HostKey {directory}/host_ed25519
AuthorizedKeysFile .ssh/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PidFile none
StrictModes no
AllowTcpForwarding yes
X11Forwarding no
PrintMotd no
Subsystem sftp internal-sftp
LogLevel ERROR
"""


@dataclass(frozen=True)
class HostKey:
    private_openssh: bytes
    public_line: str  # "ssh-ed25519 AAAA..."


def new_host_key(comment: str) -> HostKey:
    """A fresh Ed25519 host key, made here so its public half is known without reading it back."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return HostKey(private, f"{public.decode()} {comment}")


def job_dir(cluster: Submitter, job_id: str) -> str:
    workdir = cluster.transport.expand(cluster.profile.workdir)
    return posixpath.join(workdir, DIR_NAME, job_id)


def install(cluster: Submitter, job_id: str) -> HostKey:
    """Write the job's host key, server config and start script on the cluster side; the public key."""
    files = cluster.transport
    directory = job_dir(cluster, job_id)
    files.makedirs(posixpath.dirname(directory), mode=0o700)
    files.makedirs(directory, mode=0o700)
    key = new_host_key(f"hpclaunch-{job_id}")
    files.write_bytes(f"{directory}/host_ed25519", key.private_openssh, mode=0o600)
    files.write_text(f"{directory}/sshd_config", sshd_config(directory), mode=0o600)
    files.write_text(f"{directory}/start.sh", START_SH, mode=0o700)
    return key


def uninstall(cluster: Submitter, job_id: str) -> None:
    """Remove the job's server files (a missing directory is fine)."""
    directory = job_dir(cluster, job_id)
    cluster.transport.run(["rm", "-rf", "--", directory], timeout=60)


def proxy_argv(cluster: Submitter, target: NodeTarget) -> list[str]:
    """The job step whose stdin/stdout is an SSH server on the node."""
    directory = job_dir(cluster, target.job_id)
    if not cluster.transport.exists(f"{directory}/start.sh"):
        raise NodeAccessError(
            f"job {target.job_id} has no SSH server files in {directory}",
            hint=f"run: hpclaunch ssh-config {target.job_id}",
        )
    return step_argv(target, ["bash", f"{directory}/start.sh"], pty=False)  # -u: unbuffered
