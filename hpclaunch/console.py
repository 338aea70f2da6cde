"""What the user sees while waiting: one status line that rewrites itself on a terminal."""

from __future__ import annotations

import contextlib
import itertools
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import TextIO

_FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"


class StatusLine:
    """A spinner and a message on stderr; on a pipe or file only changed messages are printed."""

    def __init__(self, stream: TextIO | None = None, *, enabled: bool = True) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty()
        self._frames = itertools.cycle(_FRAMES)
        self._last = ""
        self._width = 0
        self._start = time.monotonic()

    def update(self, message: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            elapsed = time.monotonic() - self._start
            text = f"{next(self._frames)} {message} [{elapsed:4.0f}s]"
            pad = max(0, self._width - len(text))
            self.stream.write("\r" + text + " " * pad)
            self.stream.flush()
            self._width = len(text)
        elif message != self._last:
            self.stream.write(message + "\n")
            self.stream.flush()
        self._last = message

    def clear(self) -> None:
        if self.enabled and self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0

    def __enter__(self) -> StatusLine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.clear()


#: What a secret (a notebook's token) is replaced by wherever text is shown or logged.
REDACTED = "***"


def redact(text: str, secret: str | None) -> str:
    """``text`` with every occurrence of ``secret`` replaced by ``***``.

    An empty or missing secret leaves the text alone: replacing '' would splice '***'
    between every character.
    """
    if not secret:
        return text
    return text.replace(secret, REDACTED)


def say(message: str) -> None:
    """A line for the user on stderr (stdout is kept for results)."""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


#: Signals that end the CLI the way Ctrl-C does: a closed terminal (HUP) or `kill`/`timeout` (TERM)
#: must cancel the job and close the tunnel too, not leave a notebook running for hours.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def no_interrupts() -> contextlib.AbstractContextManager[None]:
    """Hold off Ctrl-C (and TERM, HUP) while cleaning up, so a second one cannot leave a half state."""
    return _ignoring(STOP_SIGNALS)


@contextlib.contextmanager
def _ignoring(signals: tuple[signal.Signals, ...]) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _interrupt_once(signum: int, frame: object) -> None:
    for sig in STOP_SIGNALS:
        if signal.getsignal(sig) is _interrupt_once:
            signal.signal(sig, signal.SIG_IGN)
    raise KeyboardInterrupt


@contextlib.contextmanager
def interrupt_once() -> Iterator[None]:
    """For the CLI process only: the first Ctrl-C, TERM or HUP raises KeyboardInterrupt; later ones
    are ignored.

    The first one starts the cleanup (cancel the job, close the tunnel) and the exit; a second press
    a moment later must not cut that short, nor kill the process during its exit (Python puts Ctrl-C
    back to the OS default while shutting down). A signal that arrived ignored stays ignored (nohup's
    HUP; the INT of `cmd &` in a script, of cron and of systemd), but the others still end the session
    cleanly: `kill PID` of a background notebook cancels its job. Afterwards the previous handlers
    come back.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    for sig in STOP_SIGNALS:
        if previous[sig] is not signal.SIG_IGN:
            signal.signal(sig, _interrupt_once)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            if signal.getsignal(sig) is _interrupt_once:
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
