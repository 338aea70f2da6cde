"""Find a running notebook server in the text a job printed.

Pure functions over text, so every rule is tested against captured real output
(``tests/data/banners``). Three sources, most trusted first:

1. our template's marker line (:data:`MARKER`), printed only once the server answers HTTP;
2. the startup banner of Jupyter Server 1/2 (JupyterLab 3/4, Notebook 7, nbclassic) or of
   the classic Notebook 4-6 server;
3. an ``ssh -L`` command that a site's own job script printed for its users.

Within a source the last occurrence wins: a job that restarted its server (a port taken, a
crash) printed the one that is alive last.
"""

from __future__ import annotations

import posixpath
import re
import shlex
from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qs

__all__ = ["MARKER", "ServerLocation", "find_server", "format_marker"]

MARKER = "HPCLAUNCH_JUPYTER_READY"

Source = Literal["marker", "banner", "ssh-forward"]


@dataclass(frozen=True)
class ServerLocation:
    """Where a notebook server listens, as seen from the job's node.

    ``host`` is printed form without IPv6 brackets ('node1', '127.0.0.1', '::1'). A loopback
    host means the server is reachable only on the node itself; '0.0.0.0' or '::' means every
    interface of the node. ``token`` is None when it was not printed in full (Jupyter prints
    ``?token=...`` for a token it did not generate, such as ours).
    """

    host: str
    port: int
    base_url: str
    token: str | None
    source: Source


def format_marker(host: str, port: int, base_url: str = "/") -> str:
    """The ready line our job template prints; :func:`find_server` parses it back exactly.

    Values are checked rather than quoted: the line is written by a shell ``echo`` and read
    by a regular expression, and neither end can carry spaces or control characters.
    """
    host = host.strip("[]") if host.startswith("[") else host
    if not host or not _SAFE_FIELD.fullmatch(host):
        raise ValueError(f"marker host must be a non-empty name without spaces: {host!r}")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"marker port must be an integer in 1..65535: {port!r}")
    if not base_url.startswith("/") or not _SAFE_FIELD.fullmatch(base_url):
        raise ValueError(f"marker base_url must be a path starting with '/': {base_url!r}")
    return f"{MARKER} host={host} port={port} base_url={_normal_base(base_url)}"


def find_server(text: str) -> ServerLocation | None:
    """The server a job's output announces, or None while it has announced none.

    None also when the last banner names no TCP address (a UNIX socket server), or when a
    banner's header is out but its URL line is not yet: the caller polls again.
    """
    lines = _clean(text).splitlines()
    return _find_marker(lines) or _find_banner(lines) or _find_ssh_forward(lines)


# -- cleaning ------------------------------------------------------------------------------

# CSI (colours, cursor moves), OSC (titles, hyperlinks) and two-byte escapes such as the
# charset switch ESC ( B that tornado's coloured log formatter emits after each prefix.
_ANSI = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)"
    r"|\x1b[()*+][0-9A-Za-z]"
    r"|\x1b[@-Z\\-_]"
)


def _clean(text: str) -> str:
    """Drop terminal escapes; ``splitlines`` then treats a bare ``\\r`` as a line break."""
    return _ANSI.sub("", text)


# -- marker --------------------------------------------------------------------------------

_SAFE_FIELD = re.compile(r"[^\s\x00-\x1f\x7f]+")
_MARKER_RE = re.compile(
    re.escape(MARKER)
    + r"\s+host=(?P<host>[^\s'\"]+)\s+port=(?P<port>\d{1,5})\s+base_url=(?P<base>/[^\s'\"]*)\s*$"
)


def _find_marker(lines: list[str]) -> ServerLocation | None:
    for line in reversed(lines):
        match = _MARKER_RE.search(line)
        if match is None:
            continue
        port = int(match["port"])
        if 0 < port < 65536:
            host = match["host"]
            host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
            return ServerLocation(host, port, _normal_base(match["base"]), None, "marker")
    return None


# -- banner --------------------------------------------------------------------------------

# "[I 2024-01-01 12:00:00.000 ServerApp] " (Jupyter Server) or "[I 12:00:00.000 NotebookApp] ".
_LOG_PREFIX = re.compile(r"^\s*\[[DIWEC] [^\]]*\]")
# "Jupyter Server 2.14.0 is running at:", "The Jupyter Notebook is running at:",
# "Jupyter Notebook 6.4.12 is running at:"; Notebook 4 put the URL on the same line.
# Anchored to Jupyter's wording so a site script's "... is running at node12" cannot open a block.
_RUNNING_AT = re.compile(r"^\s*(?:The\s+)?Jupyter\s+(?:Server|Notebook)(?:\s+\S+)?\s+is\s+running\s+at:?")
# Headers of the critical block printed for a generated token, across versions.
_ACCESS_HEADER = re.compile(
    r"copy and paste one of these URLs:|to login with a token:|Copy/paste this URL into your browser",
    re.IGNORECASE,
)
_GATEWAY_HEADER = re.compile(r"Gateway server running at", re.IGNORECASE)
# An http(s) URL with an explicit port; host is a name, [IPv6], or Notebook 5's
# "(node1 or 127.0.0.1)". "http+unix://" (a socket server) does not match: no "http://" in it.
_URL = re.compile(
    r"\bhttps?://(?P<host>\([^)\s]*(?:\s+or\s+[^)\s]+)*\)|\[[0-9A-Fa-f:.%\w]+\]|[A-Za-z0-9_.\-]+)"
    r":(?P<port>\d{1,5})(?P<path>/[^\s?#\[\]<>\"'`]*)?(?:\?(?P<query>[^\s#\[\]<>\"'`]*))?"
)
# A line that is only a URL: "    http://...", " or http://...", "http://... :: /root/dir".
_URL_LINE = re.compile(
    r"^\s*(?:or\s+)?(?P<url>https?://(?:\([^)]*\)\S*|\S+))(?:\s+::\s.*)?\s*$", re.IGNORECASE
)
# Paths that follow base_url in printed URLs: default_url of each app, or a document in it.
_APP_PATH = re.compile(r"^(?P<base>/(?:[^/]+/)*?)(?:(?:lab|tree|notebooks|edit|doc|voila|retro)(?:/.*)?)?$")
_TOKEN = re.compile(r"[A-Za-z0-9_\-]+")

_LOOPBACK = {"localhost", "ip6-localhost", "ip6-loopback", "::1"}
_WILDCARD = {"0.0.0.0", "::", "*", ""}  # noqa: S104 - addresses read from a log, nothing binds


@dataclass(frozen=True)
class _Candidate:
    host: str
    port: int
    base_url: str
    token: str | None
    has_token_param: bool  # '?token=' was printed, even if redacted


@dataclass
class _Epoch:
    """The URL blocks one server start printed: its 'running at' list and its access block."""

    by_running_at: bool
    candidates: list[_Candidate]
    has_access_block: bool = False


def _find_banner(lines: list[str]) -> ServerLocation | None:
    epochs: list[_Epoch] = []
    loose: list[list[_Candidate]] = []  # URL blocks under no known header
    i = 0
    while i < len(lines):
        body = _strip_prefix(lines[i])
        running_at = _RUNNING_AT.search(body)
        if running_at is not None:
            block, i = _url_block(lines, i + 1)
            epochs.append(_Epoch(True, _urls(body[running_at.end() :]) + block))
            continue
        if _ACCESS_HEADER.search(body):
            block, i = _url_block(lines, i + 1)
            if not block:  # a header whose URLs follow a second header line
                continue
            current = epochs[-1] if epochs else None
            if current is not None and current.by_running_at and not current.has_access_block:
                current.candidates += block  # the same server's critical block
                current.has_access_block = True
            else:
                epochs.append(_Epoch(False, block, has_access_block=True))
            continue
        if _GATEWAY_HEADER.search(body):
            _, i = _url_block(lines, i + 1)  # the kernel gateway's URL, not ours
            continue
        if _URL_LINE.match(body):
            block, i = _url_block(lines, i)
            loose.append(block)
            continue
        i += 1

    if epochs:
        return _best(epochs[-1].candidates)
    # No header at all (a log level above INFO, or only `jupyter server list` output):
    # trust bare URL lines only when they carry a token, unlike a site's "open http://localhost:8888".
    for block in reversed(loose):
        with_token = [c for c in block if c.has_token_param]
        if with_token:
            return _best(with_token)
    return None


def _strip_prefix(line: str) -> str:
    match = _LOG_PREFIX.match(line)
    return line[match.end() :] if match else line


def _url_block(lines: list[str], start: int) -> tuple[list[_Candidate], int]:
    """The URLs on consecutive URL-only lines from ``start``, and the index after them."""
    found: list[_Candidate] = []
    i = start
    while i < len(lines):
        match = _URL_LINE.match(_strip_prefix(lines[i]))
        if match is None:
            break
        found += _urls(match["url"])
        i += 1
    return found, i


def _urls(text: str) -> list[_Candidate]:
    found: list[_Candidate] = []
    for match in _URL.finditer(text):
        port = int(match["port"])
        if not 0 < port < 65536:
            continue
        path = match["path"] or "/"
        base_match = _APP_PATH.match(path)
        base = base_match["base"] if base_match else path
        token = _token(match["query"])
        has_param = "token" in parse_qs(match["query"] or "", keep_blank_values=True)
        found += [_Candidate(h, port, _normal_base(base), token, has_param) for h in _hosts(match["host"])]
    return found


def _hosts(raw: str) -> list[str]:
    """'(node1 or 127.0.0.1)' -> both names; '[::1]' -> '::1'."""
    if raw.startswith("("):
        return [h for h in re.split(r"\s+or\s+", raw[1:-1]) if h]
    if raw.startswith("["):
        return [raw[1:-1]]
    return [raw]


def _token(query: str | None) -> str | None:
    """The token if printed in full; None for '...', '' or a placeholder like '<token>'."""
    if not query:
        return None
    values = parse_qs(query, keep_blank_values=True).get("token")
    if not values:
        return None
    value = values[0]
    return value if _TOKEN.fullmatch(value) else None


def _rank(host: str) -> int:
    """A name the login node can route to beats 'listening everywhere' beats loopback."""
    lowered = host.lower()
    if lowered in _LOOPBACK or lowered.startswith("127."):
        return 0
    if lowered in _WILDCARD:
        return 1
    return 2


def _best(candidates: list[_Candidate]) -> ServerLocation | None:
    if not candidates:
        return None
    top = max(_rank(c.host) for c in candidates)
    chosen = next(c for c in candidates if _rank(c.host) == top)
    return ServerLocation(chosen.host, chosen.port, chosen.base_url, chosen.token, "banner")


def _normal_base(path: str) -> str:
    """Jupyter's own form of base_url: leading and trailing slash."""
    path = "/" + path.strip("/")
    return path if path == "/" else path + "/"


# -- ssh -L lines --------------------------------------------------------------------------

# OpenSSH options that take an argument, from ssh(1); the rest are flags.
_SSH_ARG_OPTS = set("BbcDEeFIiJLlmOopQRSWw")
_FORWARD = re.compile(
    r"^(?:(?:\[[^\]]*\]|[^:\[\]]*):)?\d{1,5}:(?P<host>\[[^\]]+\]|[^:\[\]/]+):(?P<port>\d{1,5})$"
)


def _find_ssh_forward(lines: list[str]) -> ServerLocation | None:
    for line in reversed(lines):
        if "ssh" not in line or "-" not in line:
            continue
        found = _parse_ssh(line)
        if found is not None:
            return found
    return None


def _parse_ssh(line: str) -> ServerLocation | None:
    try:
        words = shlex.split(line)
    except ValueError:  # an unbalanced quote in prose around the command
        words = line.split()
    starts = [i for i, w in enumerate(words) if posixpath.basename(w) == "ssh"]
    for start in starts:
        found = _parse_ssh_args(words[start + 1 :])
        if found is not None:
            return found
    return None


def _parse_ssh_args(args: list[str]) -> ServerLocation | None:
    forwards: list[str] = []
    jump = False
    destination: str | None = None
    i = 0
    while i < len(args):
        word = args[i]
        if not word.startswith("-") or word == "-":
            destination = word
            break
        for k, flag in enumerate(word[1:], start=1):
            if flag in _SSH_ARG_OPTS:
                value = word[k + 1 :]
                if not value and i + 1 < len(args):
                    i += 1
                    value = args[i]
                if flag == "L":
                    forwards.append(value)
                elif flag == "J":
                    jump = True
                elif flag == "o" and value.lower().startswith(("proxyjump", "proxycommand")):
                    jump = True
                break
        i += 1

    for spec in forwards:
        match = _FORWARD.match(spec)
        if match is None:  # a UNIX socket forward, or an unexpanded ${port}
            continue
        port = int(match["port"])
        if not 0 < port < 65536:
            continue
        host = match["host"].strip("[]")
        if jump and _rank(host) == 0 and destination:
            # With -J the destination is the node itself, so its 'localhost' is the node.
            host = _ssh_host(destination)
        return ServerLocation(host, port, "/", None, "ssh-forward")
    return None


def _ssh_host(destination: str) -> str:
    """'user@node12' or 'ssh://user@node12:22' -> 'node12'."""
    if destination.startswith("ssh://"):
        rest = destination[len("ssh://") :].rpartition("@")[2]
        if rest.startswith("["):
            return rest[1:].partition("]")[0]
        return rest.partition(":")[0]
    return destination.rpartition("@")[2]
