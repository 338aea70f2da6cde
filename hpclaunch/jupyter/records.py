"""A local record of the notebooks this machine started, so ``sessions`` and ``attach`` know them.

Tokens are never stored here: ``attach`` reads them back from the 0600 file on the cluster.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


def records_path() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "hpclaunch" / "sessions.json"


def load() -> list[dict[str, Any]]:
    path = records_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [r for r in data if isinstance(r, dict)] if isinstance(data, list) else []


def save(records: list[dict[str, Any]]) -> None:
    path = records_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(records, f, indent=2)
    os.replace(tmp, path)


def add(*, job_id: str, profile: str, host: str | None, run_dir: str | None, node: str, port: int) -> None:
    records = [r for r in load() if not (r.get("job_id") == job_id and r.get("profile") == profile)]
    records.append(
        {
            "job_id": job_id,
            "profile": profile,
            "host": host,
            "run_dir": run_dir,
            "node": node,
            "port": port,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
    )
    save(records[-200:])


def remove(job_id: str, profile: str) -> None:
    save([r for r in load() if not (r.get("job_id") == job_id and r.get("profile") == profile)])
