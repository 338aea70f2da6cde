"""Join this process's stdin/stdout/stderr to a paramiko session channel (``SSHTransport.run_attached``).

One loop, one ``select`` over our stdin, the channel and a self-pipe for SIGWINCH: the signal handler
only writes a byte, so a resize is sent from the loop and never from inside a paramiko call.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import termios
import threading
import tty as ttymod
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from hpclaunch.transport.relay import CHUNK

if TYPE_CHECKING:
    import paramiko


def terminal_size(fd: int) -> tuple[int, int]:
    """(columns, rows) of the terminal on ``fd``; 80x24 when it has none."""
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return 80, 24
    return size.columns, size.lines


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[None]:
    """Our terminal in raw mode (keys such as Ctrl-C go to the far side as bytes), restored after."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        ttymod.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@contextlib.contextmanager
def resize_pipe() -> Iterator[int | None]:
    """A pipe that gets a byte on each SIGWINCH (main thread only; None elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        yield None
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)

    def note(_signum: int, _frame: Any) -> None:
        with contextlib.suppress(OSError):  # a full pipe already says "resized"
            os.write(write_fd, b"x")

    previous = signal.signal(signal.SIGWINCH, note)
    try:
        yield read_fd
    finally:
        signal.signal(signal.SIGWINCH, previous)
        os.close(read_fd)
        os.close(write_fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def pump(chan: paramiko.Channel, *, tty: bool, stdin: int = 0, stdout: int = 1, stderr: int = 2) -> int:
    """Relay until the remote command ends; returns its exit status (-1 when the server sent none)."""
    with contextlib.ExitStack() as stack:
        resized = stack.enter_context(resize_pipe()) if tty else None
        if tty:
            stack.enter_context(raw_terminal(stdin))
        sources: list[Any] = [chan, stdin]
        if resized is not None:
            sources.append(resized)
        while True:
            ready, _, _ = select.select(sources, [], [])
            if resized is not None and resized in ready:
                os.read(resized, 1024)
                chan.resize_pty(*terminal_size(stdin))
            if stdin in ready:
                data = os.read(stdin, CHUNK)
                if data:
                    chan.sendall(data)
                else:  # our stdin ended: pass the EOF on, keep reading the output
                    chan.shutdown_write()
                    sources.remove(stdin)
            if chan in ready:
                while chan.recv_ready():
                    _write_all(stdout, chan.recv(CHUNK))
                while chan.recv_stderr_ready():
                    _write_all(stderr, chan.recv_stderr(CHUNK))
                if chan.eof_received or chan.closed:
                    # Drain what arrived with the EOF, then wait for the exit status.
                    while chan.recv_ready():
                        _write_all(stdout, chan.recv(CHUNK))
                    while chan.recv_stderr_ready():
                        _write_all(stderr, chan.recv_stderr(CHUNK))
                    break
        return chan.recv_exit_status()


def stdio_fds() -> tuple[int, int, int]:
    """The file descriptors of our stdin, stdout and stderr (flushed first: we bypass Python's buffers)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    return sys.stdin.fileno(), sys.stdout.fileno(), sys.stderr.fileno()
