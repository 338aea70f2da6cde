"""A shell or a command as a step of a running job (``srun --overlap --jobid``), over the connection."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import ParameterError

if TYPE_CHECKING:
    from ..transport.base import CommandRunner
    from .target import NodeTarget

#: The interactive program when no command is given.
DEFAULT_SHELL = ("bash", "-l")


def check_command(command: Sequence[str]) -> list[str]:
    """The command's words as given (quoted once at the SSH boundary); only a NUL cannot travel."""
    for arg in command:
        if "\0" in arg:
            raise ParameterError(f"command: {arg!r} contains a NUL byte")
    return list(command)


def step_argv(target: NodeTarget, command: Sequence[str], *, pty: bool) -> list[str]:
    """``srun`` joining the job on its first node as one task; ``--overlap`` shares the job's CPUs,
    memory and GPUs with what already runs there (the step sees the job's CUDA_VISIBLE_DEVICES)."""
    words = check_command(command)
    argv = ["srun", "--overlap", "--jobid", target.job_id, "--nodes=1", "--ntasks=1"]
    argv.append(f"--nodelist={target.node}")
    # --pty makes srun relay a terminal; without it -u passes output on as it comes, not in blocks.
    argv.append("--pty" if pty else "-u")
    return [*argv, *(words or DEFAULT_SHELL)]


def run_in_job(runner: CommandRunner, target: NodeTarget, command: Sequence[str], *, pty: bool) -> int:
    """Run ``command`` (a login shell when empty) in the job, joined to our terminal or stdio."""
    return runner.run_attached(step_argv(target, command, pty=pty), tty=pty)
