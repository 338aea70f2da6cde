"""Tunnels from this machine to ports on a job's node (TensorBoard, a Dash app, a Ray dashboard).

The far end is the node as the login host sees it (the transport's ``forward``), so a server in the job
must listen on the node's address, not only its 127.0.0.1. A port that does not listen yet is probed
with backoff from the login side, never waited on forever.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from ..errors import CommandTimeout, NodeAccessError, ParameterError
from ..polling import Backoff, Poller
from ..transport import relay
from ..transport.base import CommandRunner, Forward, Forwarder

Status = Callable[[str], None]

#: Opens a TCP connection to $1:$2 and closes it; bash's /dev/tcp needs no other tool on the login host.
_PROBE = 'exec 3<>"/dev/tcp/$1/$2"'


@dataclass(frozen=True)
class PortSpec:
    """``REMOTE_PORT[:LOCAL_PORT]``: the node's port, then this machine's (the reverse of ``ssh -L``'s
    order). No local port: the same number when it is free here, else any free one; 0: any free one."""

    remote: int
    local: int | None = None

    def local_choice(self) -> int:
        """The local port to ask for: the remote number when it is free (and not privileged)."""
        if self.local is not None:
            return self.local
        return self.remote if self.remote >= 1024 and relay.port_is_free(self.remote) else 0

    @classmethod
    def parse(cls, text: str) -> PortSpec:
        remote_text, sep, local_text = text.strip().partition(":")
        try:
            remote = int(remote_text)
            local = int(local_text) if sep else None
        except ValueError:
            raise ParameterError(
                f"{text!r} is not a port", hint="give REMOTE_PORT or REMOTE_PORT:LOCAL_PORT, e.g. 6006:16006"
            ) from None
        if not 1 <= remote <= 65535:
            raise ParameterError(f"port {remote} is out of range", hint="ports are 1 to 65535")
        if local is not None and not 0 <= local <= 65535:
            raise ParameterError(f"local port {local} is out of range", hint="0 (any free) to 65535")
        return cls(remote, local)

    def __str__(self) -> str:
        return f"{self.remote}:{self.local}" if self.local is not None else str(self.remote)


def parse_specs(texts: Sequence[str]) -> list[PortSpec]:
    """Every spec checked before any tunnel opens; a remote port asked twice is refused."""
    specs = [PortSpec.parse(t) for t in texts]
    seen: set[int] = set()
    for spec in specs:
        if spec.remote in seen:
            raise ParameterError(f"port {spec.remote} is given twice")
        seen.add(spec.remote)
    return specs


def url(forward: Forward) -> str:
    return f"http://127.0.0.1:{forward.local_port}/"


def is_listening(runner: CommandRunner, host: str, port: int) -> bool:
    """Whether ``host:port`` accepts a connection from the login side (where the tunnel's far end is)."""
    try:
        result = runner.run(["bash", "-c", _PROBE, "probe", host, str(port)], timeout=15, check=False)
    except CommandTimeout:  # a filtered port: no answer is no
        return False
    return result.ok


def wait_listening(
    runner: CommandRunner,
    host: str,
    port: int,
    *,
    timeout: float,
    status: Status = lambda _msg: None,
) -> None:
    """Probe with backoff until ``host:port`` listens; NodeAccessError after ``timeout`` seconds."""

    def gave_up(waited: float) -> NodeAccessError:
        return NodeAccessError(
            f"nothing listens on port {port} of {host} after {waited:.0f} s",
            hint="is the server running in the job, listening on the node's address (not only 127.0.0.1)?",
        )

    for waited in Poller(Backoff(initial=0.2, maximum=3.0, factor=1.6), timeout=timeout, on_timeout=gave_up):
        if is_listening(runner, host, port):
            return
        status(f"waiting for port {port} on {host} to listen ({waited:.0f} s)")


@contextlib.contextmanager
def open_forwards(forwarder: Forwarder, host: str, specs: Sequence[PortSpec]) -> Iterator[list[Forward]]:
    """One local listener per spec (127.0.0.1), all closed when the context ends, even on error."""
    with contextlib.ExitStack() as stack:
        yield [
            stack.enter_context(forwarder.forward(host, s.remote, local_port=s.local_choice())) for s in specs
        ]


def wait_all(
    runner: CommandRunner,
    host: str,
    specs: Sequence[PortSpec],
    *,
    timeout: float,
    status: Status = lambda _msg: None,
) -> None:
    """Every port listening, within one shared deadline."""
    deadline = time.monotonic() + timeout
    for spec in specs:
        left = max(deadline - time.monotonic(), 0.1)
        wait_listening(runner, host, spec.remote, timeout=left, status=status)
