"""Emptying the work directory of finished runs: home quotas count files as well as bytes.

Only directories named the way :meth:`Submitter.new_run_dir` names them are considered (so a ``workdir``
that points at the whole of a scratch space loses nothing else), and a directory is kept while any of the
user's queued jobs works or writes in it: the scheduler is asked once. The directory is listed with one
remote command, whatever the number of runs.
"""

from __future__ import annotations

import os
import posixpath
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .submission import is_run_dir_name

if TYPE_CHECKING:
    from .submission import Submitter

#: A run directory without a job's output file is kept this long: it may be a submission in progress.
IN_PROGRESS_GRACE = 600.0

# GNU find (every Slurm cluster's): type, size, mtime and path relative to the work dir, NUL-terminated,
# after the far side's clock (ages are measured there, not against this machine's clock).
_LIST_SCRIPT = 'date +%s && find "$1" -mindepth 1 -printf "%y %s %T@ %P\\0"'


@dataclass(frozen=True)
class RunDir:
    """One run directory: what it is and what removing it frees."""

    path: str
    kind: str  # notebook | training | plain
    files: int
    bytes: int
    #: Newest modification time of anything in it (seconds since the epoch, the cluster's clock).
    newest: float
    has_output: bool


@dataclass(frozen=True)
class CleanPlan:
    """What ``clean`` removes and what it keeps, and why."""

    remove: tuple[RunDir, ...]
    live: tuple[RunDir, ...]  # a pending or running job works or writes there
    results: tuple[RunDir, ...]  # finished training runs, kept without ``results=True``
    recent: tuple[RunDir, ...]  # younger than ``older_than``, or perhaps still being submitted

    @property
    def files(self) -> int:
        return sum(d.files for d in self.remove)

    @property
    def bytes(self) -> int:
        return sum(d.bytes for d in self.remove)


def parse_listing(base: str, text: str, kinds: Mapping[str, Sequence[str]]) -> list[RunDir]:
    """The run directories in ``find -printf '%y %s %T@ %P\\0'`` output (pure; tested on real output).

    ``kinds`` maps a kind to the names whose presence at a run directory's top marks it (first match wins).
    """
    entries: dict[str, dict[str, float]] = {}
    names: dict[str, set[str]] = {}
    for record in text.split("\0"):
        fields = record.split(" ", 3)
        if len(fields) != 4:
            continue
        kind, size, mtime, rel = fields
        top, _, inner = rel.partition("/")
        if not is_run_dir_name(top):
            continue
        stats = entries.setdefault(top, {"files": 0, "bytes": 0, "newest": 0.0})
        stats["newest"] = max(stats["newest"], float(mtime))
        if not inner:
            continue
        names.setdefault(top, set()).add(inner.split("/", 1)[0])
        if kind != "d":
            stats["files"] += 1
            stats["bytes"] += int(size)
    out = []
    for top, stats in sorted(entries.items()):
        present = names.get(top, set())
        kind = next((k for k, marks in kinds.items() if present & set(marks)), "plain")
        out.append(
            RunDir(
                path=posixpath.join(base, top),
                kind=kind,
                files=int(stats["files"]),
                bytes=int(stats["bytes"]),
                newest=stats["newest"],
                has_output=any(n.startswith("slurm-") and n.endswith(".out") for n in present),
            )
        )
    return out


def _local_listing(base: str) -> str:
    """The same listing as the remote ``find``, made here (a laptop's find may lack ``-printf``)."""
    records = []
    for root, dirs, files in os.walk(base):
        for name in [*dirs, *files]:
            path = os.path.join(root, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue  # removed while we looked
            kind = "d" if name in dirs else "f"
            records.append(f"{kind} {st.st_size} {st.st_mtime} {os.path.relpath(path, base)}")
    return "\0".join(records)


def scan(submitter: Submitter, kinds: Mapping[str, Sequence[str]]) -> tuple[list[RunDir], float]:
    """The run directories under the profile's work directory, and the far side's current time."""
    transport = submitter.transport
    base = transport.expand(submitter.profile.workdir).rstrip("/") or "/"
    if not transport.exists(base):
        return [], time.time()
    if transport.is_remote:
        result = transport.run(["sh", "-c", _LIST_SCRIPT, "sh", base], timeout=300)
        clock, _, listing = result.stdout.partition("\n")
        now = float(clock.strip())
    else:
        listing, now = _local_listing(base), time.time()
    return parse_listing(base, listing, kinds), now


def live_paths(submitter: Submitter) -> list[str]:
    """Where the user's pending and running jobs work and write (one scheduler call)."""
    paths: list[str] = []
    for info in submitter.scheduler.jobs():
        if not info.is_terminal:
            paths.extend(p for p in (info.work_dir, info.stdout_path) if p)
    return paths


def plan(
    submitter: Submitter,
    *,
    kinds: Mapping[str, Sequence[str]],
    older_than: float = 0.0,
    results: bool = False,
) -> CleanPlan:
    """Sort the run directories into removable and kept; nothing is removed yet."""
    dirs, now = scan(submitter, kinds)
    live = live_paths(submitter) if dirs else []
    out: dict[str, list[RunDir]] = {"remove": [], "live": [], "results": [], "recent": []}
    for d in dirs:
        if any(p == d.path or p.startswith(d.path + "/") for p in live):
            out["live"].append(d)
        elif now - d.newest < older_than or (not d.has_output and now - d.newest < IN_PROGRESS_GRACE):
            out["recent"].append(d)
        elif d.kind == "training" and not results:
            out["results"].append(d)
        else:
            out["remove"].append(d)
    return CleanPlan(**{k: tuple(v) for k, v in out.items()})


def remove(submitter: Submitter, dirs: Iterable[RunDir]) -> None:
    """Delete the planned directories (a few ``rm`` calls, however many there are)."""
    submitter.remove_run_dirs([d.path for d in dirs])
