"""A local record of the jobs hpclaunch submitted from this machine: where each one writes.

Slurm forgets a finished job after MinJobAge (300 s by default; sacct remembers it only where the site
runs accounting), yet its run directory and output file stay. With this record, ``logs`` and ``fetch``
still find them, and an id that neither Slurm nor this record knows is a typo ("no such job") instead of
a wait until the deadline. One JSON file, 0600, under ``$XDG_STATE_HOME/hpclaunch``; writers take a lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

#: Records kept per file: the newest win (a busy user submits a few hundred jobs a week).
KEEP = 2000


@dataclass(frozen=True)
class JobRecord:
    """One submitted job as hpclaunch knows it without asking the scheduler."""

    profile: str
    job_id: str
    name: str | None = None
    run_dir: str | None = None
    output: str | None = None
    submitted: str = ""


def records_path() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "hpclaunch" / "jobs.json"


def _load(path: Path) -> list[dict[str, str | None]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [r for r in data if isinstance(r, dict)] if isinstance(data, list) else []


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path.with_suffix(".lock"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def add(record: JobRecord) -> None:
    """Remember a submitted job. A record that cannot be written (a read-only home) is skipped: the
    job is queued either way, and only the conveniences above are lost."""
    path = records_path()
    with contextlib.suppress(OSError), _locked(path):
        entry = {**asdict(record), "submitted": record.submitted or time.strftime("%Y-%m-%dT%H:%M:%S")}
        kept = [
            r
            for r in _load(path)
            if not (r.get("job_id") == record.job_id and r.get("profile") == record.profile)
        ]
        kept.append(entry)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(kept[-KEEP:], f, indent=1)
        os.replace(tmp, path)


def find(profile: str, job_id: str) -> JobRecord | None:
    """The record of ``job_id`` submitted through ``profile``, if this machine submitted it."""
    for r in reversed(_load(records_path())):
        if r.get("job_id") == job_id and r.get("profile") == profile:
            return JobRecord(
                profile=profile,
                job_id=job_id,
                name=r.get("name"),
                run_dir=r.get("run_dir"),
                output=r.get("output"),
                submitted=str(r.get("submitted") or ""),
            )
    return None
