"""Every job parameter, defined once.

The CLI builds its flags from :data:`JOB_PARAMS`, the config file validates profile keys against it,
the Python API checks keyword arguments with it, and the templates receive the validated values.
Unknown names are rejected with the list of valid ones.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ParameterError

#: C0 controls but tab, DEL, C1 controls and the Unicode line/paragraph separators: characters that end a
#: line for bash, sbatch or Python's ``str.splitlines``, or that a terminal interprets.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
#: Lone surrogates: what Python makes of bytes in argv that are not UTF-8; they cannot be written out.
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def reject_control_chars(name: str, value: str) -> str:
    """Refuse newline, CR, NUL and friends: quoting cannot stop a newline from starting a script line."""
    if _SURROGATE.search(value):
        raise ParameterError(
            f"{name}: {value!r} is not valid UTF-8 text", hint="check the terminal's encoding"
        )
    match = _CONTROL.search(value)
    if match:
        raise ParameterError(
            f"{name}: control character {match.group()!r} is not allowed in a job parameter",
            hint="put the value on one line",
        )
    return value


# --- validators: each takes (name, raw) and returns the normalised value or raises ParameterError ---


def _as_str(name: str, raw: Any) -> str:
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        raise ParameterError(f"{name}: expected text, got {type(raw).__name__} {raw!r}")
    return reject_control_chars(name, str(raw))


def whole_number(minimum: int, maximum: int | None = None) -> Callable[[str, Any], int]:
    """A validator of whole numbers in ``[minimum, maximum]`` (numbers as text are accepted)."""

    def check(name: str, raw: Any) -> int:
        if isinstance(raw, bool):
            raise ParameterError(f"{name}: expected a whole number, got {raw!r}")
        try:
            value = int(str(raw).strip()) if not isinstance(raw, int) else raw
        except ValueError:
            raise ParameterError(f"{name}: expected a whole number, got {raw!r}") from None
        if value < minimum:
            raise ParameterError(f"{name}: must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise ParameterError(f"{name}: must be at most {maximum}, got {value}")
        return value

    return check


_SLURM_NAME = re.compile(r"^[A-Za-z0-9_.+:@=,\-\[\]]+$")


def _slurm_name(name: str, raw: Any) -> str:
    """Partition, account, QOS, GPU type: Slurm entity names, no spaces or shell syntax."""
    value = _as_str(name, raw).strip()
    if not _SLURM_NAME.match(value):
        raise ParameterError(
            f"{name}: {value!r} is not a valid Slurm name",
            hint="use letters, digits and _ . - only",
        )
    return value


_CONSTRAINT = re.compile(r"^[A-Za-z0-9_.\-&|!*\[\]():, ]+$")


def _constraint(name: str, raw: Any) -> str:
    value = _as_str(name, raw).strip()
    if not _CONSTRAINT.match(value):
        raise ParameterError(f"{name}: {value!r} is not a valid Slurm constraint expression")
    return value


_SLURM_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
# Units in falling order, each at most once: 90m, 2h, 2h30m, 1d12h, 1h 30m 10s.
_HUMAN_TIME = re.compile(
    r"^(?=\d)(?:(\d+)\s*d\s*)?(?:(\d+)\s*h\s*)?(?:(\d+)\s*m\s*)?(?:(\d+)\s*s)?$", re.IGNORECASE
)
_HUMAN_UNITS = (86400, 3600, 60, 1)


def parse_time(raw: str) -> int:
    """Seconds in a Slurm time limit: ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH[:MM[:SS]]``, ``2h30m``."""
    text = raw.strip()
    human = _HUMAN_TIME.match(text)
    if human:  # the lookahead makes at least one unit match
        return sum(int(n) * unit for n, unit in zip(human.groups(), _HUMAN_UNITS, strict=True) if n)
    match = _SLURM_TIME.match(text)
    if not match:
        raise ValueError(text)
    days, a, b, c = match.groups()
    if days is not None:  # D-H, D-H:M, D-H:M:S
        hours, minutes, seconds = int(a), int(b or 0), int(c or 0)
        return int(days) * 86400 + hours * 3600 + minutes * 60 + seconds
    if c is not None:  # H:M:S
        return int(a) * 3600 + int(b) * 60 + int(c)
    if b is not None:  # M:S
        return int(a) * 60 + int(b)
    return int(a) * 60  # M


def format_time(seconds: int) -> str:
    """Slurm's ``D-HH:MM:SS`` (or ``HH:MM:SS`` under a day)."""
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours:02d}:{minutes:02d}:{secs:02d}"
    return f"{days}-{clock}" if days else clock


def _time(name: str, raw: Any) -> str:
    text = _as_str(name, raw).strip()
    if text.upper() in ("UNLIMITED", "INFINITE"):
        return text.upper()
    try:
        seconds = parse_time(text)
    except ValueError:
        raise ParameterError(
            f"{name}: {text!r} is not a time limit",
            hint="use Slurm's format, e.g. 30, 2:00:00 or 1-12:00:00 (or 90m, 2h30m, 1d)",
        ) from None
    if seconds <= 0:
        raise ParameterError(f"{name}: the time limit must be longer than zero")
    return format_time(seconds)


_MEMORY = re.compile(r"^(\d+)\s*([KMGT])?(?:i?B)?$", re.IGNORECASE)


def _memory(name: str, raw: Any) -> str:
    text = _as_str(name, raw).strip()
    match = _MEMORY.match(text)
    if not match:
        raise ParameterError(
            f"{name}: {text!r} is not an amount of memory",
            hint="use a number with an optional unit K, M, G or T, e.g. 16G or 4000M",
        )
    return f"{int(match.group(1))}{(match.group(2) or 'M').upper()}"


def _text_list(name: str, raw: Any) -> tuple[str, ...]:
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, (list, tuple)):
        raise ParameterError(f"{name}: expected a list of text, got {type(raw).__name__}")
    return tuple(_as_str(f"{name}[{i}]", item) for i, item in enumerate(raw))


def _directives(name: str, raw: Any) -> tuple[str, ...]:
    items = _text_list(name, raw)
    for item in items:
        if not item.startswith("-"):
            raise ParameterError(
                f"{name}: {item!r} is not an sbatch option",
                hint="give options as sbatch takes them, e.g. --exclusive or --mail-type=END",
            )
    return items


_MODULE = re.compile(r"^[A-Za-z0-9_.+/@:\-]+$")


def _module_names(name: str, raw: Any) -> tuple[str, ...]:
    items = _text_list(name, raw)
    for item in items:
        if not _MODULE.match(item):
            raise ParameterError(f"{name}: {item!r} is not an environment module name, e.g. cuda/12.4")
    return items


def _path(name: str, raw: Any) -> str:
    value = _as_str(name, raw).strip()
    if not value:
        raise ParameterError(f"{name}: the path is empty")
    return value


def _job_name(name: str, raw: Any) -> str:
    value = _as_str(name, raw).strip()
    if not value:
        raise ParameterError(f"{name}: the job name is empty")
    if len(value) > 200:
        raise ParameterError(f"{name}: the job name is longer than 200 characters")
    return value


@dataclass(frozen=True)
class Param:
    """One job parameter: its name, meaning, default and validation."""

    name: str
    help: str
    validate: Callable[[str, Any], Any]
    default: Any = None
    metavar: str = "TEXT"
    multiple: bool = False
    #: True for values that are shell code by design (setup lines): never quoted, only one-line checked.
    is_code: bool = False
    example: str = ""

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def envvar(self) -> str:
        return "HPCLAUNCH_" + self.name.upper()

    def check(self, raw: Any) -> Any:
        return self.validate(self.name, raw)


JOB_PARAMS: tuple[Param, ...] = (
    Param("job_name", "Slurm job name.", _job_name, metavar="NAME"),
    Param("partition", "Partition (queue) to submit to.", _slurm_name, metavar="NAME"),
    Param("account", "Account to charge.", _slurm_name, metavar="NAME"),
    Param("qos", "Quality of service.", _slurm_name, metavar="NAME"),
    Param("time", "Time limit, e.g. 30, 2:00:00, 1-12:00:00, 90m, 2h30m.", _time, "01:00:00", "TIME"),
    Param("nodes", "Number of nodes.", whole_number(1), 1, "N"),
    Param(
        "ntasks_per_node", "Tasks (processes) per node; one per GPU for training.", whole_number(1), 1, "N"
    ),
    Param("cpus_per_task", "CPU cores per task.", whole_number(1), 1, "N"),
    Param("mem", "Memory per node, e.g. 16G (default: the partition's default).", _memory, None, "SIZE"),
    Param("gpus", "GPUs per node, requested as --gres=gpu[:TYPE]:N.", whole_number(0), 0, "N"),
    Param("gpu_type", "GPU type for --gres, e.g. a100.", _slurm_name, None, "TYPE"),
    Param("constraint", "Node feature constraint, e.g. 'a100|h100'.", _constraint, None, "EXPR"),
    Param("output", "Job output file (%j = job id). Default: in the run directory.", _path, None, "PATH"),
    Param("error", "Job error file. Default: together with the output.", _path, None, "PATH"),
    Param(
        "sbatch_options",
        "Extra sbatch option, e.g. --exclusive (repeatable).",
        _directives,
        (),
        "OPTION",
        multiple=True,
    ),
    Param("modules", "Environment module to load (repeatable).", _module_names, (), "MODULE", multiple=True),
    Param("conda_env", "Conda environment to activate.", _path, None, "ENV"),
    Param("venv", "Python virtual environment directory to activate.", _path, None, "DIR"),
    Param(
        "setup",
        "Shell line run before the job, e.g. 'module load cuda' (repeatable; shell code by design).",
        _text_list,
        (),
        "LINE",
        multiple=True,
        is_code=True,
    ),
)

PARAMS_BY_NAME: Mapping[str, Param] = {p.name: p for p in JOB_PARAMS}


def validate_params(
    values: Mapping[str, Any],
    *,
    params: Sequence[Param] = JOB_PARAMS,
    source: str = "",
) -> dict[str, Any]:
    """Check names and values; unknown names are refused with the list of valid ones."""
    known = {p.name: p for p in params}
    out: dict[str, Any] = {}
    where = f"{source}: " if source else ""
    for key, raw in values.items():
        name = key.replace("-", "_")
        param = known.get(name)
        if param is None:
            import difflib

            close = difflib.get_close_matches(name, known, n=1)
            raise ParameterError(
                f"{where}unknown job parameter {key!r}",
                hint=(f"did you mean {close[0]!r}? " if close else "")
                + "valid ones: "
                + ", ".join(sorted(known)),
            )
        if raw is None:
            continue
        try:
            out[name] = param.check(raw)
        except ParameterError as err:
            raise ParameterError(where + err.message, hint=err.hint) from None
    return out


def resolve(*layers: Mapping[str, Any], params: Sequence[Param] = JOB_PARAMS) -> dict[str, Any]:
    """Merge validated layers, highest priority first, over the defaults; every name is present."""
    merged: dict[str, Any] = {p.name: p.default for p in params}
    for layer in reversed(layers):
        for key, value in layer.items():
            if value is not None and value != ():
                merged[key] = value
    return merged


def sbatch_directives(
    job: Mapping[str, Any], *, output: str | None = None, chdir: str | None = None
) -> list[str]:
    """The sbatch options a job asks for: written as ``#SBATCH`` lines by the templates and passed as
    arguments when a user's own script is submitted, so both paths agree. Absent keys are left out."""
    out: list[str] = []

    def add(key: str, option: str | None = None) -> None:
        if job.get(key) not in (None, "", ()):
            out.append(f"--{option or key.replace('_', '-')}={job[key]}")

    add("job_name")
    for key in ("partition", "account", "qos", "time", "nodes", "ntasks_per_node", "cpus_per_task", "mem"):
        add(key)
    if job.get("gpus"):
        kind = f"{job['gpu_type']}:" if job.get("gpu_type") else ""
        out.append(f"--gres=gpu:{kind}{job['gpus']}")
    add("constraint")
    if job.get("output") or output:
        out.append(f"--output={job.get('output') or output}")
    add("error")
    if chdir:
        out.append(f"--chdir={chdir}")
    out.extend(job.get("sbatch_options") or ())
    return out


def gpus_beyond_a_node(asked: int, per_node: int | None) -> str | None:
    """The one line for a GPU count no node has (``--gpus`` is per node), or None when it fits or
    the nodes' GPUs are not known. Every command says it alike: preflight, submit, train."""
    if per_node is None or asked <= per_node:
        return None
    return f"--gpus {asked} is more than a node has here ({per_node} per node): use more --nodes instead"


def gres_gpus(gres: str | None) -> int:
    """The GPUs per node in a ``--gres`` value (``gpu:2``, ``gpu:a100:2,shard:1``); 0 when none."""
    for item in (gres or "").split(","):
        kind, _, rest = item.partition(":")
        if kind.strip() == "gpu":
            count = rest.rsplit(":", 1)[-1]
            return int(count) if count.isdigit() else 1
    return 0
