"""What a job asks for, read as sbatch reads it, and checked against its partition's limits.

Slurm accepts a job that exceeds its partition's limits and leaves it pending for ever
(``PartitionTimeLimit``, ``PartitionNodeLimit``) unless the site sets ``EnforcePartLimits``, and
``sbatch --test-only`` passes such a job too. So the preflight compares the request with the limits
itself (:func:`over_limits`), then asks ``--test-only`` for the rest and for the estimated start.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from hpclaunch.errors import SubmissionRejected
from hpclaunch.params import parse_time

#: sbatch options that hpclaunch reads back from a script or its arguments, by every spelling.
_OPTION_NAMES = {
    "-J": "job_name",
    "--job-name": "job_name",
    "-o": "output",
    "--output": "output",
    "-e": "error",
    "--error": "error",
    "-D": "chdir",
    "--chdir": "chdir",
    "-c": "cpus_per_task",
    "--cpus-per-task": "cpus_per_task",
    "-p": "partition",
    "--partition": "partition",
    "-N": "nodes",
    "--nodes": "nodes",
    "-t": "time",
    "--time": "time",
    "-q": "qos",
    "--qos": "qos",
    "-A": "account",
    "--account": "account",
    "-a": "array",
    "--array": "array",
    "--gres": "gres",
}
_FLAGS_WITHOUT_VALUE = frozenset(
    {"-H", "--hold", "-Q", "--quiet", "-v", "--verbose", "-W", "--wait", "--exclusive", "--parsable",
     "-O", "--overcommit", "-s", "--oversubscribe", "--requeue", "--no-requeue", "-h", "--help",
     "--spread-job", "--use-min-nodes", "--contiguous", "-k", "--no-kill", "--test-only"}
)  # fmt: skip


def parse_sbatch_options(args: Sequence[str]) -> dict[str, str]:
    """The options hpclaunch reads among sbatch-style arguments (``-J x``, ``-Jx``, ``--job-name=x``);
    the rest are accepted and ignored. A later value wins, as with sbatch."""
    found: dict[str, str] = {}
    items = list(args)
    index = 0
    while index < len(items):
        arg = items[index]
        index += 1
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            if not eq and name not in _FLAGS_WITHOUT_VALUE and name in _OPTION_NAMES:
                value = items[index] if index < len(items) else ""
                index += 1
        elif arg.startswith("-") and len(arg) >= 2:
            name, value = arg[:2], arg[2:]
            if not value and name not in _FLAGS_WITHOUT_VALUE and name in _OPTION_NAMES:
                value = items[index] if index < len(items) else ""
                index += 1
        else:
            continue
        key = _OPTION_NAMES.get(name)
        if key is not None:
            found[key] = value
    return found


def sbatch_header_args(script_text: str) -> list[str]:
    """The arguments of the ``#SBATCH`` lines at the top of a script, as sbatch reads them: from the
    lines after the shebang, up to the first line that is neither blank nor a comment."""
    args: list[str] = []
    for number, line in enumerate(script_text.splitlines()):
        stripped = line.strip()
        if number == 0 and stripped.startswith("#!"):
            continue
        if not stripped or (stripped.startswith("#") and not stripped.startswith("#SBATCH")):
            continue
        if not stripped.startswith("#SBATCH"):
            break
        try:
            args += shlex.split(stripped[len("#SBATCH") :], comments=True)
        except ValueError as exc:
            raise SubmissionRejected(f"cannot read the #SBATCH line {stripped!r}: {exc}") from exc
    return args


def job_request(script_text: str, sbatch_args: Sequence[str] = ()) -> dict[str, str]:
    """What a script asks for: its ``#SBATCH`` header, overridden by command-line arguments."""
    return parse_sbatch_options([*sbatch_header_args(script_text), *sbatch_args])


# -- partitions -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Partition:
    """The limits of one partition, from ``scontrol show partition -o``."""

    name: str
    state: str
    default: bool
    total_nodes: int | None
    max_nodes: int | None  # None: UNLIMITED
    max_time: int | None  # seconds; None: UNLIMITED
    allow_qos: tuple[str, ...] | None  # None: ALL
    allow_accounts: tuple[str, ...] | None  # None: ALL


def _limit(value: str | None) -> int | None:
    if value is None or value.upper() in ("UNLIMITED", "INFINITE", "NONE", "N/A"):
        return None
    try:
        return int(value)
    except ValueError:
        return None


def _time_limit(value: str | None) -> int | None:
    if value is None or value.upper() in ("UNLIMITED", "INFINITE", "NONE", "N/A"):
        return None
    try:
        return parse_time(value)
    except Exception:  # an unexpected format must not break the preflight: no limit known
        return None


def _allowed(value: str | None) -> tuple[str, ...] | None:
    if value is None or value.upper() == "ALL":
        return None
    return tuple(v for v in value.split(",") if v)


def parse_partitions(text: str) -> dict[str, Partition]:
    """``scontrol show partition -o`` (one partition a line of ``Key=Value`` pairs) by name."""
    out: dict[str, Partition] = {}
    for line in text.splitlines():
        fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
        name = fields.get("PartitionName")
        if not name:
            continue
        out[name] = Partition(
            name=name,
            state=fields.get("State", "UP"),
            default=fields.get("Default", "NO").upper() == "YES",
            total_nodes=_limit(fields.get("TotalNodes")),
            max_nodes=_limit(fields.get("MaxNodes")),
            max_time=_time_limit(fields.get("MaxTime")),
            allow_qos=_allowed(fields.get("AllowQos")),
            allow_accounts=_allowed(fields.get("AllowAccounts")),
        )
    return out


def _min_nodes(value: str) -> int | None:
    """The least number of nodes of ``--nodes`` (``5``, ``2-4``)."""
    match = re.match(r"^\s*(\d+)", value)
    return int(match.group(1)) if match else None


def over_limits(request: Mapping[str, str], partitions: Mapping[str, Partition]) -> str | None:
    """Why a request can never run in its partition, in one line saying what to change; or None."""
    name = request.get("partition")
    if name:
        name = name.split(",")[0]
        part = partitions.get(name)
        if part is None:
            known = ", ".join(sorted(partitions)) or "none"
            return f"there is no partition {name!r} (partitions: {known}); give another --partition"
    else:
        part = next((p for p in partitions.values() if p.default), None)
        if part is None:
            return None  # no default partition known: sbatch --test-only will say
    nodes = _min_nodes(request.get("nodes", "1")) or 1
    caps = [n for n in (part.total_nodes, part.max_nodes) if n is not None]
    if caps and nodes > min(caps):
        cap = min(caps)
        what = "has" if cap == part.total_nodes else "allows"
        plural = "s" if cap != 1 else ""
        return f"partition {part.name} {what} {cap} node{plural}; asked for {nodes}: give fewer --nodes"
    if request.get("time") and part.max_time is not None:
        try:
            asked = parse_time(request["time"])
        except Exception:
            asked = None
        if asked is not None and asked > part.max_time:
            return (
                f"partition {part.name} allows at most {_hms(part.max_time)}; asked for {_hms(asked)}: "
                "give less --time or another --partition"
            )
    qos = request.get("qos")
    if qos and part.allow_qos is not None and qos not in part.allow_qos:
        return (
            f"QOS {qos!r} is not allowed in partition {part.name} (allowed: {', '.join(part.allow_qos)}): "
            "give another --qos or none"
        )
    account = request.get("account")
    if account and part.allow_accounts is not None and account not in part.allow_accounts:
        return (
            f"account {account!r} may not use partition {part.name} "
            f"(allowed: {', '.join(part.allow_accounts)}): give another --account"
        )
    return None


def _hms(seconds: int) -> str:
    days, rest = divmod(seconds, 86400)
    text = f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}-{text}" if days else text


# -- sbatch --test-only -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preflight:
    """What the scheduler expects for a request that can run: when, and where."""

    start: datetime | None
    nodes: str | None
    partition: str | None

    def describe(self, now: datetime | None = None) -> str:
        """``starts about 14:02 on node1 (partition debug)``, or ``starts now ...``."""
        now = now or datetime.now()
        if self.start is None:
            when = "start time not known yet"
        elif (self.start - now).total_seconds() < 60:
            when = "starts now"
        elif self.start.date() == now.date():
            when = f"starts about {self.start:%H:%M}"
        else:
            when = f"starts about {self.start:%Y-%m-%d %H:%M}"
        where = f" on {self.nodes}" if self.nodes else ""
        part = f" (partition {self.partition})" if self.partition else ""
        return when + where + part


_TEST_ONLY = re.compile(
    r"Job \d+ to start at (?P<start>\S+) using \d+ processors? on nodes (?P<nodes>\S+)"
    r"(?: in partition (?P<partition>\S+))?"
)


def parse_test_only(text: str) -> Preflight | None:
    """``sbatch: Job 3 to start at 2026-12-01T23:55:44 using 1 processors on nodes node1 in partition
    debug`` (stderr of ``sbatch --test-only``); None when it is not there."""
    match = _TEST_ONLY.search(text)
    if match is None:
        return None
    try:
        start: datetime | None = datetime.fromisoformat(match.group("start"))
    except ValueError:
        start = None
    return Preflight(start=start, nodes=match.group("nodes"), partition=match.group("partition"))
