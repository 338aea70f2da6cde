"""Pure parsers of Slurm's machine-readable output. No I/O here: tests feed them captured real output.

The argv that produce each format live here too, so a format and its parser cannot drift apart.

Longer than most modules on purpose: one pure function per Slurm output format (sbatch, squeue,
scontrol, sacct, sinfo, error messages), side by side with the argv that produces each, so the golden
tests in ``tests/unit/test_slurm_parse.py`` cover every format in one place.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Literal

from hpclaunch.errors import SlurmError
from hpclaunch.states import JobInfo, JobState

#: Separates fields of squeue and sacct output. Job names may hold ``|``; they are also printed last,
#: so even a name holding the delimiter survives a split bounded by the number of fields.
DELIM = "|#|"

#: squeue ``-O`` field names (Slurm 22.05). ``-o`` letters have no StdOut, ``-O`` does.
SQUEUE_FIELDS: tuple[str, ...] = (
    "JobArrayID",  # 123 or 123_4 or 123_[5-9], as users see it
    "JobID",  # the unique numeric id
    "ArrayJobID",
    "ArrayTaskID",
    "State",
    "Reason",
    "NodeList",
    "StartTime",  # estimated for a pending job
    "SubmitTime",
    "TimeUsed",
    "TimeLimit",
    "exit_code",
    "RestartCnt",
    "Partition",
    "UserName",
    "WorkDir",
    "STDOUT",  # NOT expanded by squeue (``slurm-%j.out``); scontrol expands it
    "STDERR",
    "Name",  # last: may contain anything
)

#: sacct ``--format`` fields (Slurm 22.05). ``-X`` keeps only the allocation, not the steps.
SACCT_FIELDS: tuple[str, ...] = (
    "JobID",
    "JobIDRaw",
    "State",
    "Reason",
    "NodeList",
    "Start",
    "Submit",
    "Elapsed",
    "Timelimit",
    "ExitCode",
    "Partition",
    "User",
    "WorkDir",
    "JobName",  # last: may contain anything
)

#: The environment every query runs with: a user's ``SLURM_TIME_FORMAT=relative`` would break parsing.
QUERY_ENV: dict[str, str] = {"SLURM_TIME_FORMAT": "standard"}


def squeue_format() -> str:
    """The ``-O`` argument: every field followed by the delimiter, which also turns off padding."""
    return ",".join(f"{field}:{DELIM}" for field in SQUEUE_FIELDS)


def squeue_argv(
    job_ids: Sequence[str] | None = None, *, user: str | None = None, everyone: bool = False
) -> list[str]:
    """``squeue`` (all states) for the given ids, a user's jobs (``--me`` by default), or every job."""
    argv = ["squeue", "--noheader", "--states=all"]
    if job_ids is not None:
        argv.append("--jobs=" + ",".join(job_ids))
    elif user is not None:
        argv.append("--user=" + user)
    elif not everyone:
        argv.append("--me")
    argv += ["--Format=" + squeue_format()]
    return argv


def steps_argv(job_id: str) -> list[str]:
    """``squeue --steps`` of one job: a step id per line."""
    return ["squeue", "--noheader", "--steps", f"--jobs={job_id}", "--format=%i"]


def parse_tool_steps(stdout: str, job_id: str) -> list[str]:
    """The job's ``srun`` steps (``JOB.0``, ``JOB.1``, ...): the tools that joined it. The allocation's
    own steps (``batch``, ``extern``, ``interactive``) are named, not numbered."""
    steps = []
    for line in stdout.split():
        base, _, step = line.strip().partition(".")
        if base == job_id and step.isdigit():
            steps.append(line.strip())
    return steps


def scontrol_argv(job_id: str | None = None) -> list[str]:
    """``scontrol -o show job [id]``: one line per job; without an id, every job the controller holds."""
    argv = ["scontrol", "--oneliner", "show", "job"]
    if job_id is not None:
        argv.append(job_id)
    return argv


def sacct_argv(job_ids: Sequence[str]) -> list[str]:
    """``sacct`` for the given ids, allocations only. ``-j`` makes the start window the epoch."""
    return [
        "sacct",
        "--allocations",
        "--noheader",
        "--parsable2",
        "--delimiter=" + DELIM,
        "--format=" + ",".join(SACCT_FIELDS),
        "--jobs=" + ",".join(job_ids),
    ]


# --- sbatch -------------------------------------------------------------------------------------------

_PARSABLE = re.compile(r"^(\d+)(?:;(\S+))?$")


def parse_sbatch(stdout: str) -> tuple[str, str | None]:
    """Read ``sbatch --parsable`` output: ``123`` or ``123;cluster`` -> (job id, cluster or None).

    Site job_submit plugins sometimes print notices first, so the last matching line wins.
    """
    for line in reversed(stdout.strip().splitlines()):
        match = _PARSABLE.match(line.strip())
        if match:
            return match.group(1), match.group(2)
    raise SlurmError(
        f"sbatch printed no job id: {stdout.strip()[:200]!r}",
        hint="is this sbatch from Slurm, and was --parsable accepted?",
    )


# --- job ids ------------------------------------------------------------------------------------------

_JOB_ID = re.compile(r"^(\d+)(?:_(\d+|\[[^\]]*\]))?(?:\+(\d+))?(?:\.(\S+))?$")


def split_job_id(job_id: str) -> tuple[str, str | None]:
    """``123`` -> (``123``, None); ``123_4`` -> (``123``, ``4``); ``123_[5-9]`` -> (``123``, ``[5-9]``)."""
    match = _JOB_ID.match(job_id.strip())
    if not match:
        raise SlurmError(f"not a Slurm job id: {job_id!r}")
    return match.group(1), match.group(2)


def is_job_id(text: str) -> bool:
    """True for ids Slurm accepts in ``-j``: ``123``, ``123_4``, ``123_[5-9]``, ``123+0``, ``123.batch``."""
    return bool(_JOB_ID.match(text))


def expand_task_range(spec: str) -> list[int]:
    """``[5-9%2]`` or ``1,3,5-7`` -> the task ids it names (the ``%`` throttle is dropped)."""
    spec = spec.strip("[]").split("%", 1)[0]
    out: list[int] = []
    for part in filter(None, spec.split(",")):
        if "-" in part:
            lo_text, hi_text = part.split("-", 1)
            step = 1
            if ":" in hi_text:
                hi_text, step_text = hi_text.split(":", 1)
                step = int(step_text)
            out.extend(range(int(lo_text), int(hi_text) + 1, step))
        else:
            out.append(int(part))
    return out


# --- values -------------------------------------------------------------------------------------------

_NONE_VALUES = frozenset({"", "n/a", "none", "(null)", "unknown", "invalid", "not_set"})


def _text(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    return None if value.lower() in _NONE_VALUES else value


def parse_time(value: str | None) -> datetime | None:
    """Slurm's standard ``2024-05-01T12:00:00``; ``N/A``, ``Unknown``, ``None`` -> None."""
    text = _text(value)
    if text is None:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


_DURATION = re.compile(r"^(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)(?:\.\d+)?$")


def parse_duration(value: str | None) -> int | None:
    """``[D-]HH:MM:SS``, ``MM:SS``, ``D-HH`` or minutes -> seconds; ``UNLIMITED``/``N/A`` -> None."""
    text = _text(value)
    if text is None or text.upper() in ("UNLIMITED", "INFINITE", "PARTITION_LIMIT"):
        return None
    match = _DURATION.match(text)
    if match:
        days, hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
        return ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if re.fullmatch(r"\d+-\d+", text):  # D-HH
        days_text, hours_text = text.split("-")
        return (int(days_text) * 24 + int(hours_text)) * 3600
    if text.isdigit():  # bare minutes, as sbatch --time takes them
        return int(text) * 60
    return None


def parse_exit_code(value: str | None) -> tuple[int | None, int | None]:
    """``3:0`` -> (3, None); ``0:9`` -> (0, 9) (scontrol and sacct); empty -> (None, None)."""
    text = _text(value)
    if text is None:
        return None, None
    code_text, _, signal_text = text.partition(":")
    try:
        code = int(code_text)
    except ValueError:
        return None, None
    try:
        signal = int(signal_text) if signal_text else 0
    except ValueError:
        signal = 0
    return code, (signal or None)


def parse_wait_status(value: str | None) -> tuple[int | None, int | None]:
    """squeue's ``exit_code`` is the raw wait status: ``768`` -> (3, None), ``9`` -> (0, 9)."""
    text = _text(value)
    if text is None or not text.isdigit():
        return None, None
    status = int(text)
    return (status >> 8) & 0xFF, (status & 0x7F) or None


def _int(value: str | None, default: int = 0) -> int:
    text = _text(value)
    try:
        return int(text) if text is not None else default
    except ValueError:
        return default


def _array_parts(
    display_id: str, array_job: str | None, array_task: str | None
) -> tuple[str | None, str | None]:
    """Array job id and task id, or (None, None) for a plain job."""
    array_job = _text(array_job)
    array_task = _text(array_task)
    if array_task is None:
        base, task = split_job_id(display_id) if is_job_id(display_id) else (display_id, None)
        if task is None:
            return None, None
        return base, task
    return array_job, array_task


# --- squeue -------------------------------------------------------------------------------------------


def split_fields(line: str, count: int, delim: str = DELIM) -> list[str] | None:
    """Split one delimited line into ``count`` fields; the last field keeps any stray delimiters."""
    if line.endswith(delim):
        line = line[: -len(delim)]
    parts = line.split(delim, count - 1)
    return parts if len(parts) == count else None


def parse_squeue(stdout: str) -> list[JobInfo]:
    """Parse the output of :func:`squeue_argv`. Lines that do not fit the format are skipped."""
    jobs = []
    for line in stdout.splitlines():
        if not line.strip():
            continue
        parts = split_fields(line, len(SQUEUE_FIELDS))
        if parts is None:
            continue
        row = dict(zip(SQUEUE_FIELDS, parts, strict=True))
        state = JobState.parse(row["State"])
        display_id = row["JobArrayID"].strip()
        array_job, array_task = _array_parts(display_id, row["ArrayJobID"], row["ArrayTaskID"])
        exit_code: int | None = None
        signal: int | None = None
        if state.is_terminal:  # squeue prints 0 for jobs that have not ended: meaningless then
            exit_code, signal = parse_wait_status(row["exit_code"])
        jobs.append(
            JobInfo(
                job_id=display_id,
                raw_job_id=_text(row["JobID"]),
                state=state,
                source="squeue",
                name=row["Name"],
                reason=_text(row["Reason"]),
                node_list=_text(row["NodeList"]),
                start_time=parse_time(row["StartTime"]),
                submit_time=parse_time(row["SubmitTime"]),
                elapsed=parse_duration(row["TimeUsed"]),
                time_limit=parse_duration(row["TimeLimit"]),
                exit_code=exit_code,
                signal=signal,
                work_dir=_text(row["WorkDir"]),
                stdout_path=_expand_if_plain(_text(row["STDOUT"]), display_id, row),
                stderr_path=_expand_if_plain(_text(row["STDERR"]), display_id, row),
                array_job_id=array_job,
                array_task_id=array_task,
                restart_count=_int(row["RestartCnt"]),
                partition=_text(row["Partition"]),
                user=_text(row["UserName"]),
            )
        )
    return jobs


def _expand_if_plain(pattern: str | None, display_id: str, row: Mapping[str, str]) -> str | None:
    """squeue prints the unexpanded pattern; expand it when every token is known, else give None.

    For array tasks squeue's default (``slurm-<raw id>.out``) is wrong (sbatch writes
    ``slurm-%A_%a.out``), so they get None and callers ask scontrol.
    """
    array_job = _text(row.get("ArrayJobID"))
    array_task = _text(row.get("ArrayTaskID"))
    if pattern is None or array_task is not None:
        return None
    raw_id = _text(row.get("JobID")) or display_id
    nodes = _text(row.get("NodeList"))
    values = {
        "j": raw_id,
        "x": row.get("Name", ""),
        "u": _text(row.get("UserName")) or "",
        "A": array_job or raw_id,
        "a": array_task if array_task and array_task.isdigit() else "4294967294",
    }
    if nodes and "," not in nodes and "[" not in nodes:
        values["N"] = nodes
    return expand_filename_pattern(pattern, values)


# --- filename patterns --------------------------------------------------------------------------------

_PATTERN_TOKEN = re.compile(r"%(%|(\d*)([A-Za-z]))")


def expand_filename_pattern(pattern: str, values: Mapping[str, str]) -> str | None:
    """Expand sbatch's ``%j``, ``%x``, ``%u``, ``%N``, ``%A``, ``%a``, ``%5j`` (zero padding) and ``%%``.

    Returns None when the pattern holds a token that ``values`` lacks (``%t``, ``%n``...), so a caller
    can ask a source that knows (``scontrol``) instead of guessing. ``\\`` disables expansion as in sbatch.
    """
    if "\\" in pattern:
        return pattern.replace("\\", "")
    missing = False

    def substitute(match: re.Match[str]) -> str:
        nonlocal missing
        if match.group(1) == "%":
            return "%"
        width, letter = match.group(2), match.group(3)
        if letter not in values:
            missing = True
            return match.group(0)
        value = values[letter]
        if width and value.isdigit():
            value = value.zfill(min(int(width), 10))
        return value

    expanded = _PATTERN_TOKEN.sub(substitute, pattern)
    return None if missing else expanded


# --- scontrol -----------------------------------------------------------------------------------------

# A new field starts at a space followed by ``Key=``; keys look like ``JobId``, ``CPUs/Task``,
# ``NtasksPerN:B:S:C`` or ``AllocNode:Sid``. Anything else is part of the previous value (Reason=,
# JobName=, Command= may hold spaces).
_SCONTROL_KEY = re.compile(r"(?:^|(?<= ))([A-Z][A-Za-z0-9_:/]*)=")


def parse_scontrol_record(line: str) -> dict[str, str]:
    """One ``scontrol -o show`` line -> {key: value}; values keep their spaces."""
    line = line.rstrip("\n")
    record: dict[str, str] = {}
    matches = list(_SCONTROL_KEY.finditer(line))
    for index, match in enumerate(matches):
        end = matches[index + 1].start() - 1 if index + 1 < len(matches) else len(line)
        record.setdefault(match.group(1), line[match.end() : max(end, match.end())].rstrip())
    return record


def _user_name(value: str | None) -> str | None:
    """``UserId=alice(1000)`` -> ``alice``."""
    text = _text(value)
    if text is None:
        return None
    return text.split("(", 1)[0] or None


def parse_scontrol_jobs(stdout: str) -> list[JobInfo]:
    """Parse ``scontrol -o show job [id]`` (one line per job, array tasks each on their own line)."""
    jobs = []
    for line in stdout.splitlines():
        if not line.startswith("JobId="):
            continue
        rec = parse_scontrol_record(line)
        raw_id = rec["JobId"].strip()
        array_job = _text(rec.get("ArrayJobId"))
        array_task = _text(rec.get("ArrayTaskId"))
        job_id = raw_id
        if array_job and array_task:
            # the not-yet-started rest of an array is ``6-9%1`` here but ``29_[6-9%1]`` elsewhere
            job_id = f"{array_job}_{array_task}" if array_task.isdigit() else f"{array_job}_[{array_task}]"
        state = JobState.parse(rec.get("JobState", ""))
        exit_code, signal = parse_exit_code(rec.get("ExitCode"))
        if not state.is_terminal:
            exit_code, signal = None, None
        jobs.append(
            JobInfo(
                job_id=job_id,
                raw_job_id=raw_id,
                state=state,
                source="scontrol",
                name=rec.get("JobName"),
                reason=_text(rec.get("Reason")),
                node_list=_text(rec.get("NodeList")),
                start_time=parse_time(rec.get("StartTime")),
                submit_time=parse_time(rec.get("SubmitTime")),
                elapsed=parse_duration(rec.get("RunTime")),
                time_limit=parse_duration(rec.get("TimeLimit")),
                exit_code=exit_code,
                signal=signal,
                work_dir=_text(rec.get("WorkDir")),
                stdout_path=_text(rec.get("StdOut")),
                stderr_path=_text(rec.get("StdErr")),
                array_job_id=array_job,
                array_task_id=array_task,
                restart_count=_int(rec.get("Restarts")),
                partition=_text(rec.get("Partition")),
                user=_user_name(rec.get("UserId")),
            )
        )
    return jobs


# --- sacct --------------------------------------------------------------------------------------------


def parse_sacct(stdout: str) -> list[JobInfo]:
    """Parse the output of :func:`sacct_argv`; job steps (``123.batch``), if present, are skipped.

    When a job was requeued sacct lists every attempt; the last line for an id wins.
    """
    jobs: dict[str, JobInfo] = {}
    for line in stdout.splitlines():
        if not line.strip():
            continue
        parts = split_fields(line, len(SACCT_FIELDS))
        if parts is None:
            continue
        row = dict(zip(SACCT_FIELDS, parts, strict=True))
        job_id = row["JobID"].strip()
        if "." in job_id:
            continue
        array_job, array_task = _array_parts(job_id, None, None)
        exit_code, signal = parse_exit_code(row["ExitCode"])
        state = JobState.parse(row["State"])
        if not state.is_terminal:
            exit_code, signal = None, None
        jobs[job_id] = JobInfo(
            job_id=job_id,
            raw_job_id=_text(row["JobIDRaw"]),
            state=state,
            source="sacct",
            name=row["JobName"],
            reason=_text(row["Reason"]),
            node_list=_text(row["NodeList"]),
            start_time=parse_time(row["Start"]),
            submit_time=parse_time(row["Submit"]),
            elapsed=parse_duration(row["Elapsed"]),
            time_limit=parse_duration(row["Timelimit"]),
            exit_code=exit_code,
            signal=signal,
            work_dir=_text(row["WorkDir"]),
            array_job_id=array_job,
            array_task_id=array_task,
            partition=_text(row["Partition"]),
            user=_text(row["User"]),
        )
    return list(jobs.values())


# --- errors -------------------------------------------------------------------------------------------

ErrorKind = Literal["transient", "invalid_job", "permanent"]

_TRANSIENT = re.compile(
    "|".join(
        [
            r"socket timed out",
            r"unable to contact slurm controller",
            r"resource temporarily unavailable",
            r"backup controller in standby mode",
            r"zero bytes were transmitted or received",
            r"connection refused",
            r"connection timed out",
            r"communication connection failure",
            r"slurmctld.*(not responding|busy)",
            r"too many pending rpcs",
            r"unable to establish.*connection",
            r"temporarily unable to accept job",
            r"try again",
        ]
    ),
    re.IGNORECASE,
)
_INVALID_JOB = re.compile(r"invalid job id specified|invalid job id\b|job id .* not found", re.IGNORECASE)
_FINISHED = re.compile(r"already completing or completed|job is no longer|job has already finished", re.I)
_SACCT_DISABLED = re.compile(r"accounting storage is disabled|slurmdbd.*not (running|configured)", re.I)


def classify_error(stderr: str) -> ErrorKind:
    """Sort a Slurm command's complaint: worth retrying, about an unknown job id, or final."""
    if _TRANSIENT.search(stderr):
        return "transient"
    if _INVALID_JOB.search(stderr):
        return "invalid_job"
    return "permanent"


def accounting_disabled(stderr: str) -> bool:
    """True when sacct says this cluster keeps no accounting (so sacct can never help)."""
    return bool(_SACCT_DISABLED.search(stderr))


def already_finished(stderr: str) -> bool:
    """True when scancel/scontrol refuse because the job has already ended."""
    return bool(_FINISHED.search(stderr))


def slurm_message(stderr: str, stdout: str = "") -> str:
    """Slurm's own words, without duplicates: the ``error:`` lines of a failed command, joined."""
    lines = [line.strip() for line in (stderr or stdout).splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()] or lines
    unique: list[str] = []
    for line in errors:
        if line not in unique:
            unique.append(line)
    return "; ".join(unique) if unique else "no message"


def ids_csv(job_ids: Iterable[str]) -> str:
    """Join ids for ``-j``."""
    return ",".join(job_ids)


_GRES_GPUS = re.compile(r"gpu(?::[^:,(]+)?:(\d+)")


def parse_sinfo_gpus(text: str) -> int | None:
    """The most GPUs per node in ``sinfo -h -o %G`` output (``gpu:2``, ``gpu:a100:4(S:0-1)``, ``(null)``);
    None when no node lists any."""
    counts = [int(m.group(1)) for gres in text.split() for m in _GRES_GPUS.finditer(gres)]
    return max(counts) if counts else None


def parse_config(text: str) -> dict[str, str]:
    """``scontrol show config`` as ``{key: value}`` (``MaxArraySize = 1001`` lines)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() and " " not in key.strip():
            out[key.strip()] = value.strip()
    return out


def parse_sinfo_cpus_per_gpu(sinfo_cpus_gres: str) -> int | None:
    """CPU cores per GPU on the partition's tightest node type, from ``sinfo -h -o "%c %G"`` lines
    (``64 gpu:a100:4(S:0-1)``): the share of one training process per GPU. None: no GPU nodes."""
    share: int | None = None
    for line in sinfo_cpus_gres.splitlines():
        fields = line.split()
        if len(fields) < 2 or not fields[0].rstrip("+").isdigit():
            continue
        gpus = sum(int(m.group(1)) for m in _GRES_GPUS.finditer(fields[1]))
        if gpus:
            per = max(1, int(fields[0].rstrip("+")) // gpus)
            share = per if share is None else min(share, per)
    return share
