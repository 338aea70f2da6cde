"""The exception tree. The library raises these; only the CLI turns them into exit codes.

Every error carries a one-line message that says what is wrong and, in ``hint``, what to do.
"""

from __future__ import annotations

import os
from collections.abc import Sequence


class HpclaunchError(Exception):
    """Base of every error hpclaunch raises on purpose."""

    exit_code: int = 1

    def __init__(self, message: str, *, hint: str | None = None, details: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        #: Supporting text shown under the one line, such as the last lines of a job's log.
        self.details = details

    def one_line(self) -> str:
        """The message and hint folded into one line for a terminal."""
        text = " ".join(self.message.split())
        if self.hint:
            text += f" ({' '.join(self.hint.split())})"
        return text

    def __str__(self) -> str:
        # A script using the API sees what to do, as the CLI's user does: the valid keys, the fix.
        return self.one_line()


class ConfigError(HpclaunchError):
    """The configuration file or a profile is invalid."""

    exit_code = 2


class ParameterError(HpclaunchError):
    """A job parameter has an invalid value or an unknown name."""

    exit_code = 2


class TemplateError(HpclaunchError):
    """A template is missing, or it could not be rendered."""

    exit_code = 2

    @classmethod
    def not_a_file(cls, what: str, path: os.PathLike[str], *, hint: str) -> TemplateError:
        """``job script /etc is a directory, not a file`` or ``... does not exist``."""
        problem = "is a directory, not a file" if os.path.isdir(path) else "does not exist"
        return cls(f"{what} {path} {problem}", hint=hint)


class TransportError(HpclaunchError):
    """The connection to the cluster, or a file operation over it, failed."""

    exit_code = 3


class ConnectionFailed(TransportError):
    """The SSH connection could not be opened or authenticated."""


class HostKeyError(ConnectionFailed):
    """The server's host key is unknown or has changed."""


class CommandError(TransportError):
    """An external command exited non-zero. Carries argv, exit code, stdout and stderr."""

    def __init__(
        self,
        argv: Sequence[str],
        returncode: int,
        stdout: str,
        stderr: str,
        *,
        message: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        detail = (stderr.strip() or stdout.strip()).splitlines()
        last = detail[-1] if detail else "no output"
        super().__init__(
            message or f"`{' '.join(self.argv[:2])}` exited with {returncode}: {last}",
            hint=hint,
        )


class CommandTimeout(TransportError):
    """An external command did not finish within its deadline."""


class SlurmError(HpclaunchError):
    """Slurm refused or failed an operation."""

    exit_code = 4


class JobNotFound(SlurmError):
    """No job with this id is known to the scheduler (a typo, or one purged long after it ended)."""


class SubmissionRejected(SlurmError):
    """sbatch refused the job; the message quotes Slurm."""


class CannotRun(SubmissionRejected):
    """The request can never run as asked (over a partition's limits, a QOS or account not allowed,
    no such node configuration); the message says what to change."""


class SlurmUnavailable(SlurmError):
    """The controller did not answer (a transient error worth retrying)."""


class JobFailed(SlurmError):
    """A job ended in a state other than COMPLETED."""


class WaitTimeout(HpclaunchError):
    """A bounded wait ran out."""

    exit_code = 5


class JupyterError(HpclaunchError):
    """The notebook server could not be found, started or reached."""

    exit_code = 6


class NodeAccessError(HpclaunchError):
    """A job's node cannot be reached as asked: the job is not running, not yours, or a port never
    started listening."""

    exit_code = 7


class TunnelError(TransportError):
    """A port forward could not be opened or broke."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or TERM/HUP) after which hpclaunch cleaned up; ``done`` says what it did, for the user:
    ``cancelled job 12``."""

    def __init__(self, done: str) -> None:
        super().__init__(done)
        self.done = done


class HpclaunchWarning(UserWarning):
    """Something to fix that does not stop the command, such as a config file others can read.

    The CLI shows each one once as ``hpclaunch: warning: ...``.
    """
