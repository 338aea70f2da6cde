"""Job arrays: one ``sbatch --array=0-(N-1)`` whose tasks each run with their own parameters.

Everything a Slurm header says (name, time, GPUs...) is shared by all tasks; what differs per task are
*script-level* parameters. :func:`submit_array` writes them into the run directory as

- ``params.jsonl``: line ``i`` is task ``i``'s parameters as one JSON object (for programs, and for
  reading back which task ran what), and
- ``params.sh``: a bash ``case`` on ``$SLURM_ARRAY_TASK_ID`` that exports ``HPCLAUNCH_PARAM_<NAME>`` for
  each parameter and ``HPCLAUNCH_TASK_PARAMS`` (the task's JSON line), every value quoted,

both with mode 0600. The job script sources ``params.sh`` before its setup lines. In the ``run``
template's command, an argument may name a parameter as ``{name}``: it becomes ``"${HPCLAUNCH_PARAM_NAME}"``
in the script, so a value reaches the program as one argument and is never parsed by the shell.

Task states are read in one scheduler call for the whole array (``squeue --jobs=ID_0,ID_1,...``).
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .errors import ParameterError, SlurmError, TemplateError
from .job import Job
from .params import reject_control_chars
from .render import shell_quote

if TYPE_CHECKING:
    from .polling import UpdateCallback
    from .states import JobInfo
    from .submission import Submitter

#: Names of per-task parameters: they become environment variables HPCLAUNCH_PARAM_<NAME upper-cased>.
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
#: ``{name}`` in a command argument of the ``run`` template.
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
#: The environment variable prefix of per-task parameters.
ENV_PREFIX = "HPCLAUNCH_PARAM_"
PARAMS_FILE = "params.jsonl"
ENV_FILE = "params.sh"
#: A task's place in the whole sweep: set by the job script; Slurm's own id where that is not.
_INDEX = "${HPCLAUNCH_TASK_INDEX:-${SLURM_ARRAY_TASK_ID:-?}}"
#: The ids of the Slurm arrays a sweep was split into (only when there are several).
PARTS_FILE = "parts.json"


def env_name(name: str) -> str:
    """The environment variable a task parameter is exported as: ``lr`` -> ``HPCLAUNCH_PARAM_LR``."""
    return ENV_PREFIX + name.upper()


def env_value(value: Any) -> str:
    """How a value appears in the task's environment: text as it is, anything else as JSON
    (``3``, ``0.001``, ``true``)."""
    return value if isinstance(value, str) else json.dumps(value)


def check_params_list(params_list: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Validate the per-task parameters: a non-empty list of mappings of names to JSON scalars.

    Names are identifiers (case-insensitively unique, as they become environment variable names);
    values are text, whole numbers, finite floats or booleans, with no control characters.
    """
    if isinstance(params_list, (str, bytes)) or not isinstance(params_list, Sequence):
        raise ParameterError("submit_array: params_list must be a list of dicts, one per task")
    if not params_list:
        raise ParameterError("submit_array: params_list is empty: an array needs at least one task")
    out: list[dict[str, Any]] = []
    for index, params in enumerate(params_list):
        where = f"submit_array: task {index}"
        if not isinstance(params, Mapping):
            raise ParameterError(f"{where}: expected a dict of parameters, got {type(params).__name__}")
        seen: dict[str, str] = {}
        task: dict[str, Any] = {}
        for name, value in params.items():
            if not isinstance(name, str) or not _NAME.match(name):
                raise ParameterError(
                    f"{where}: parameter name {name!r} is not an identifier",
                    hint="use letters, digits and _ (it becomes the variable HPCLAUNCH_PARAM_<NAME>)",
                )
            upper = name.upper()
            if upper in seen:
                raise ParameterError(
                    f"{where}: parameters {seen[upper]!r} and {name!r} differ only in case",
                    hint=f"both would be {env_name(name)}",
                )
            seen[upper] = name
            task[name] = _check_value(f"{where}: {name}", value)
        out.append(task)
    return out


def _check_value(where: str, value: Any) -> Any:
    if isinstance(value, bool) or isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ParameterError(f"{where}: {value!r} cannot be written as JSON")
        return value
    if isinstance(value, str):
        return reject_control_chars(where, value)
    raise ParameterError(
        f"{where}: expected text, a number or a boolean, got {type(value).__name__} {value!r}",
        hint="pass structured values as a JSON string and parse it in the job",
    )


def params_jsonl(tasks: Sequence[Mapping[str, Any]]) -> str:
    """One JSON object per line, line ``i`` for task ``i`` (JSON escapes newlines: one line each)."""
    return "".join(json.dumps(dict(t), sort_keys=True, allow_nan=False) + "\n" for t in tasks)


def params_script(tasks: Sequence[Mapping[str, Any]]) -> str:
    """The bash file every task sources: a ``case`` exporting that task's parameters, all quoted."""
    lines = [
        "# Written by hpclaunch (Cluster.submit_array): each array task exports its own parameters.",
        f'case "{_INDEX}" in',
    ]
    for index, task in enumerate(tasks):
        exports = [f"HPCLAUNCH_TASK_PARAMS={shlex.quote(json.dumps(dict(task), sort_keys=True))}"]
        exports += [f"{env_name(k)}={shlex.quote(env_value(v))}" for k, v in sorted(task.items())]
        lines.append(f"{index}) export {' '.join(exports)} ;;")
    lines += [
        f'*) echo "hpclaunch: error: no parameters for array task {_INDEX}" >&2; exit 2 ;;',
        "esac",
        "",
    ]
    return "\n".join(lines)


def command_line(command: Sequence[str], tasks: Sequence[Mapping[str, Any]]) -> tuple[str, set[str]]:
    """The ``run`` command as one bash line, with ``{name}`` of a task parameter replaced by
    ``"${HPCLAUNCH_PARAM_NAME}"``; returns the line and the names it uses.

    Braces that do not name a parameter (``{1..3}``, awk's ``{print $1}``) stay literal text.
    A name used here must be a parameter of every task.
    """
    known = set().union(*(t.keys() for t in tasks))
    used: set[str] = set()
    words = []
    for arg in command:
        if not isinstance(arg, str):
            raise ParameterError(f"submit_array: command arguments must be text, got {arg!r}")
        parts = _PLACEHOLDER.split(arg)
        pieces = []
        for position, part in enumerate(parts):
            if position % 2 == 0:
                if part:
                    pieces.append(shell_quote(part))
            elif part in known:
                used.add(part)
                pieces.append(f'"${{{env_name(part)}}}"')
            else:
                pieces.append(shell_quote("{" + part + "}"))
        words.append("".join(pieces) or "''")
    for name in sorted(used):
        missing = [i for i, t in enumerate(tasks) if name not in t]
        if missing:
            raise ParameterError(
                f"submit_array: the command uses {{{name}}} but task {missing[0]} has no parameter {name!r}",
                hint="give every task a value for each parameter the command names",
            )
    return " ".join(words), used


def array_spec(count: int, max_concurrent: int | None) -> str:
    """``0-(count-1)`` with an optional ``%max_concurrent`` throttle."""
    check_max_concurrent(max_concurrent)
    spec = f"0-{count - 1}"
    if max_concurrent is not None:
        spec += f"%{max_concurrent}"
    return spec


def check_max_concurrent(max_concurrent: int | None) -> None:
    if max_concurrent is not None and (
        isinstance(max_concurrent, bool) or not isinstance(max_concurrent, int) or max_concurrent < 1
    ):
        raise ParameterError(
            f"submit_array: max_concurrent must be a whole number of at least 1, got {max_concurrent!r}"
        )


def submit_array(
    cluster: Submitter,
    params_list: Sequence[Mapping[str, Any]],
    *,
    template: str = "run",
    command: Sequence[str] = (),
    max_concurrent: int | None = None,
    variables: Mapping[str, Any] | None = None,
    files: Mapping[str | os.PathLike[str], str] | None = None,
    **common: Any,
) -> ArrayJob:
    """See :meth:`hpclaunch.cluster.Cluster.submit_array`."""
    tasks = check_params_list(params_list)
    check_max_concurrent(max_concurrent)
    line, used = command_line(command, tasks)
    cluster.renderer.source_of(template)  # fail on a wrong name before touching the cluster
    default_name = f"hpclaunch-{template}"
    job = cluster.resolve_job(common, default_name=default_name)
    dir_name = job["job_name"] if job["job_name"] != default_name else f"{default_name}-array"
    run_dir = cluster.new_run_dir(str(dir_name).replace("/", "_"))
    context = {
        "array": {
            "count": len(tasks),
            "params_file": f"{run_dir}/{PARAMS_FILE}",
            "env_file": f"{run_dir}/{ENV_FILE}",
            "command_line": line,
        }
    }
    prepared = cluster.prepare(
        template,
        job,
        run_dir=run_dir,
        command=command,
        variables=variables,
        context=context,
        output_name="slurm-%A_%a.out",
    )
    script = prepared.script
    if f"HPCLAUNCH_PARAMS_FILE={shell_quote(context['array']['params_file'])}" not in script:
        raise TemplateError(
            f"template {template!r} does not read array parameters",
            hint="it must extend _base.sbatch.j2 (which includes _array.sbatch.j2)",
        )
    if used and line not in script:
        raise TemplateError(
            f"template {template!r} does not use the array's command line (array.command_line)",
            hint="use the built-in 'run' template, or read HPCLAUNCH_PARAM_<NAME> in yours",
        )
    submitted = cluster.stage_and_submit(
        prepared,
        lambda: cluster.scheduler.submit_array(
            script, count=len(tasks), workdir=run_dir, max_concurrent=max_concurrent
        ),
        files=files,
        texts={PARAMS_FILE: params_jsonl(tasks), ENV_FILE: params_script(tasks)},
    )
    parts = list(dict.fromkeys(task.array_id for task in submitted))
    if len(parts) > 1:  # so that attach_array finds every part again
        layout = {"parts": parts, "per_part": sum(1 for t in submitted if t.array_id == parts[0])}
        cluster.transport.write_text(f"{run_dir}/{PARTS_FILE}", json.dumps(layout) + "\n", mode=0o600)
    own_output = not prepared.job.get("output")
    task_jobs = [
        Job(
            cluster,
            task.job_id,
            run_dir=run_dir,
            name=prepared.name,
            output=f"{run_dir}/slurm-{task.array_id}_{task.index}.out" if own_output else None,
        )
        for task in submitted
    ]
    return ArrayJob(cluster, parts, tasks, task_jobs, run_dir=run_dir, name=prepared.name)


class ArrayJob:
    """A submitted job array: one Slurm job id (or several, when the sweep is larger than the site's
    ``MaxArraySize``), one :class:`~hpclaunch.job.Job` per task.

    >>> sweep = cluster.submit_array([{"lr": lr} for lr in (0.1, 0.01)],         # doctest: +SKIP
    ...                              command=["python", "train.py", "--lr", "{lr}"], time="10m")
    >>> sweep.wait(timeout=600)                                                  # doctest: +SKIP
    >>> [task.logs() for task in sweep]                                          # doctest: +SKIP
    """

    def __init__(
        self,
        cluster: Submitter,
        parts: str | Sequence[str],
        params: Sequence[Mapping[str, Any]],
        tasks: Sequence[Job],
        *,
        run_dir: str | None = None,
        name: str | None = None,
    ) -> None:
        self.cluster = cluster
        #: The Slurm arrays the sweep runs as, in task order: one unless it is larger than the site's
        #: ``MaxArraySize``. On the ``local`` backend, which has no arrays, the first task's job id.
        self.parts: list[str] = [parts] if isinstance(parts, str) else list(parts)
        #: The (first) array's job id (``123``; its tasks are ``123_0``, ``123_1``...).
        self.id = self.parts[0]
        #: Task ``i``'s parameters, as given.
        self.params: list[dict[str, Any]] = [dict(p) for p in params]
        self.tasks: list[Job] = list(tasks)
        self.run_dir = run_dir
        self.name = name

    @property
    def task_ids(self) -> list[str]:
        return [task.id for task in self.tasks]

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self) -> Iterator[Job]:
        return iter(self.tasks)

    def __getitem__(self, index: int) -> Job:
        return self.tasks[index]

    def states(self) -> list[JobInfo]:
        """Every task's current info, in task order, from one scheduler call."""
        infos = self.cluster.scheduler.states(self.task_ids)
        return [infos[task_id] for task_id in self.task_ids]

    def wait(
        self,
        timeout: float | None = None,
        *,
        on_update: UpdateCallback | None = None,
        max_poll: float | None = None,
    ) -> list[JobInfo]:
        """Block until every task has ended (one batched query per poll, with backoff and jitter);
        returns each task's final info in task order. Raises WaitTimeout after ``timeout`` seconds."""
        infos = self.cluster.wait_ids(self.task_ids, timeout=timeout, on_update=on_update, max_poll=max_poll)
        return [infos[task_id] for task_id in self.task_ids]

    def cancel(self) -> None:
        """Cancel every task (one ``scancel`` per array on Slurm)."""
        if self.cluster.capabilities.cancel_array:
            for part in self.parts:
                self.cluster.scheduler.cancel(part)
        else:
            for task in self.tasks:
                task.cancel()

    def logs(self) -> list[str]:
        """Each task's output so far, in task order."""
        return [task.logs() for task in self.tasks]

    def __repr__(self) -> str:
        return f"ArrayJob({self.id!r}, tasks={len(self.tasks)}, name={self.name!r})"


def attach_array(cluster: Submitter, array_id: str | int) -> ArrayJob:
    """Reattach to an array submitted by :func:`submit_array` (from any process), by its job id.

    One squeue call finds its run directory (the job's working directory), whose ``params.jsonl``
    says how many tasks it has and what each one got.
    """
    from .slurm.parse import split_job_id

    array_id = str(array_id).strip()
    base, task = split_job_id(array_id)
    if task is not None:
        raise SlurmError(f"{array_id} is one task of an array", hint=f"use cluster.array({base!r})")
    if not cluster.capabilities.arrays:
        raise SlurmError(
            f"the {cluster.scheduler.name} backend has no job arrays to reattach to",
            hint="use cluster.job(ID)",
        )
    info = cluster.scheduler.info(base)
    run_dir = info.work_dir
    params_file = f"{run_dir}/{PARAMS_FILE}"
    if info.array_job_id is None or not run_dir or not cluster.transport.exists(params_file):
        raise SlurmError(
            f"job {base} is not a job array submitted by hpclaunch ({info.describe()})",
            hint="cluster.job(ID) reattaches to any job",
        )
    tasks = [json.loads(line) for line in cluster.transport.read_text(params_file).splitlines() if line]
    parts, per_part = [base], len(tasks)
    if cluster.transport.exists(f"{run_dir}/{PARTS_FILE}"):
        layout = json.loads(cluster.transport.read_text(f"{run_dir}/{PARTS_FILE}"))
        parts, per_part = [str(p) for p in layout["parts"]], int(layout["per_part"])
    script_path = f"{run_dir}/job.sbatch"
    script = cluster.transport.read_text(script_path) if cluster.transport.exists(script_path) else ""
    known_output = f"#SBATCH --output={run_dir}/slurm-%A_%a.out" in script
    task_jobs = []
    for number in range(len(tasks)):
        part, index = parts[number // per_part], number % per_part
        output = f"{run_dir}/slurm-{part}_{index}.out" if known_output else None
        task_jobs.append(Job(cluster, f"{part}_{index}", run_dir=run_dir, name=info.name, output=output))
    return ArrayJob(cluster, parts, tasks, task_jobs, run_dir=run_dir, name=info.name)
