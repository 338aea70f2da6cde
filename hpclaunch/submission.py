"""Putting jobs on a cluster: run directories, parameters resolved once, and the one submit path.

Every feature (plain jobs, arrays, training runs, notebooks) goes through :class:`Submitter`:

1. ``resolve_job``: validate the call's job parameters and merge, once, highest first:
   call site > ``Cluster(**defaults)`` > profile > the feature's defaults > built-in defaults;
2. ``prepare``: render the template into a script for a run directory (nothing is written yet);
3. ``submit_prepared`` / ``stage_and_submit``: make the run directory, stage files, write
   ``job.sbatch``, submit; a refusal or an interrupt on the way removes the run directory again.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, TypeVar

from . import config as config_mod
from . import jobrecords
from .errors import HpclaunchError, ParameterError, TemplateError
from .job import Job
from .params import JOB_PARAMS, resolve, sbatch_directives, validate_params
from .polling import PollBudget
from .render import Renderer

if TYPE_CHECKING:
    from .polling import UpdateCallback
    from .scheduler import Capabilities, Scheduler
    from .slurm.request import Preflight
    from .states import JobInfo
    from .transport.base import Transport

T = TypeVar("T")

#: Feature defaults: fixed values, or computed from what the user chose (call site, Cluster(), profile).
FeatureDefaults = Mapping[str, Any] | Callable[[Mapping[str, Any]], Mapping[str, Any]]

#: Job parameters holding paths that the cluster side expands (``~`` is the remote home).
_PATH_PARAMS = ("venv", "output", "error", "conda_env")
SCRIPT_NAME = "job.sbatch"
#: How :meth:`Submitter.new_run_dir` names a run directory: NAME-YYYYmmdd-HHMMSS-6 hex digits.
_RUN_DIR_NAME = re.compile(r"^[A-Za-z0-9_.-]+-\d{8}-\d{6}-[0-9a-f]{6}$")


#: A script that names its own output file (or is an array, whose default name differs) in ``#SBATCH``.
_OWN_OUTPUT = re.compile(r"^#SBATCH\s+(-o\b|--output\b|-a\b|--array\b)", re.MULTILINE)


def is_run_dir_name(name: str) -> bool:
    """Whether ``name`` is a run directory's name as hpclaunch makes them (clean removes nothing else)."""
    return bool(_RUN_DIR_NAME.match(name))


@dataclass(frozen=True)
class Prepared:
    """A rendered job script and where it will run; nothing is on the cluster yet."""

    template: str
    script: str
    run_dir: str
    job: Mapping[str, Any]

    @property
    def name(self) -> str:
        return str(self.job["job_name"])

    def output(self, job_id: str) -> str | None:
        """The output file we chose for ``job_id`` (None when the user gave their own ``--output``)."""
        return None if self.job.get("output") else f"{self.run_dir}/slurm-{job_id}.out"


class Submitter:
    """One profile's way onto its cluster: the transport (opened lazily, once), the scheduler, the
    templates, and the user's job defaults."""

    def __init__(
        self,
        profile: config_mod.Profile,
        *,
        job_defaults: Mapping[str, Any] | None = None,
        transport: Transport | None = None,
        preflight: Callable[[Preflight], None] | None = None,
    ) -> None:
        config_mod.check_profile(profile)
        self.profile = profile
        #: When set, every submission is checked first (``check``) and the result handed to it; a request
        #: that can never run is refused with CannotRun before anything is written or queued.
        self.preflight = preflight
        self._job_defaults = validate_params(job_defaults or {}, source="Cluster()")
        self._transport = transport
        self._scheduler: Scheduler | None = None
        self._renderer: Renderer | None = None

    # --- lazily built parts -------------------------------------------------------------------

    @property
    def transport(self) -> Transport:
        """The connection, opened on first use."""
        if self._transport is None:
            from .transport import connect

            p = self.profile
            self._transport = connect(
                p.host,
                user=p.user,
                port=p.port,
                identity_file=p.identity_file,
                ssh_config_path=p.ssh_config,
                accept_new_host_key=p.accept_new_host_key,
                login_shell=p.login_shell,
                transport=p.transport.value,
                session_idle=p.session_idle,
            )
        return self._transport

    @property
    def scheduler(self) -> Scheduler:
        if self._scheduler is None:
            if self.profile.scheduler is config_mod.SchedulerKind.LOCAL:
                from .localsched import LocalScheduler

                self._scheduler = LocalScheduler()
            else:
                from .slurm.client import SlurmClient

                budget = PollBudget(self.profile.poll_min, self.profile.poll_max)
                self._scheduler = SlurmClient(self.transport, poll_budget=budget)
        return self._scheduler

    @property
    def capabilities(self) -> Capabilities:
        return self.scheduler.capabilities

    @property
    def renderer(self) -> Renderer:
        if self._renderer is None:
            self._renderer = Renderer(self.profile.template_dir)
        return self._renderer

    @property
    def is_remote(self) -> bool:
        return bool(self.profile.host)

    # --- parameters ----------------------------------------------------------------------------

    def chosen_params(self, params: Mapping[str, Any], *, source: str = "") -> dict[str, Any]:
        """What the user chose, validated: call site > ``Cluster()`` keyword defaults > profile.
        No built-in defaults (a script's own ``#SBATCH`` lines stand where the user chose nothing)."""
        given = validate_params(params, source=source)
        merged = {**self.profile.job, **self._job_defaults, **given}
        return {k: v for k, v in merged.items() if v is not None and v != ()}

    def resolve_job(
        self,
        params: Mapping[str, Any],
        *,
        default_name: str,
        defaults: FeatureDefaults | None = None,
        source: str = "",
    ) -> dict[str, Any]:
        """Every job parameter, resolved once: what the user chose > ``defaults`` > built-ins.
        ``source`` names the caller in an error (``executor(): unknown job parameter ...``)."""
        chosen = self.chosen_params(params, source=source)
        feature = defaults(chosen) if callable(defaults) else (defaults or {})
        job = resolve(chosen, feature, params=JOB_PARAMS)
        if not job.get("job_name"):
            job["job_name"] = default_name
        return job

    # --- run directories -----------------------------------------------------------------------

    def new_run_dir(self, name: str) -> str:
        """A fresh, unique directory name under the profile's work directory (not yet created)."""
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:60]
        base = self.transport.expand(self.profile.workdir)
        return str(PurePosixPath(base) / f"{safe}-{stamp}-{secrets.token_hex(3)}")

    @contextlib.contextmanager
    def removed_on_error(self, run_dir: str) -> Iterator[None]:
        """A rejected (or interrupted) submission leaves no run directory behind."""
        try:
            yield
        except BaseException:
            with contextlib.suppress(HpclaunchError):
                self.remove_run_dir(run_dir)
            raise

    def remove_run_dir(self, run_dir: str) -> None:
        """Delete a run directory made by hpclaunch (refuses anything outside the work directory)."""
        self.remove_run_dirs([run_dir])

    def remove_run_dirs(self, run_dirs: Sequence[str]) -> None:
        """Delete run directories, many per ``rm``; refuses all if any is not directly under the work
        directory."""
        base = self.transport.expand(self.profile.workdir).rstrip("/") + "/"
        for run_dir in run_dirs:
            rest = run_dir[len(base) :] if run_dir.startswith(base) else ""
            if not rest or "/" in rest.rstrip("/") or rest in (".", ".."):
                raise ParameterError(f"refusing to delete {run_dir}: not a run directory under {base}")
        for start in range(0, len(run_dirs), 200):
            self.transport.run(["rm", "-rf", "--", *run_dirs[start : start + 200]], timeout=300)

    # --- the one submit path -------------------------------------------------------------------

    def prepare(
        self,
        template: str,
        job: Mapping[str, Any],
        *,
        run_dir: str | None = None,
        command: Sequence[str] = (),
        variables: Mapping[str, Any] | None = None,
        context: Mapping[str, Any] | None = None,
        output_name: str = "slurm-%j.out",
        more_directives: Sequence[str] = (),
    ) -> Prepared:
        """Render ``template`` for a resolved ``job``; nothing is written to the cluster."""
        self.renderer.source_of(template)  # a wrong name fails before anything else
        if isinstance(command, str):
            raise ParameterError(
                f"command must be a list of arguments, not the string {command!r}",
                hint="pass e.g. ['python', 'train.py'] (shlex.split(text) turns a shell line into one)",
            )
        if template == "run" and not command:
            raise ParameterError(
                "the 'run' template needs a command", hint="e.g. hpclaunch submit run -- hostname"
            )
        if command and not self.renderer.uses(template, "command"):
            raise ParameterError(
                f"the {template!r} template takes no command, yet one was given: {' '.join(command)}",
                hint="leave out what follows `--`, or use the 'run' template for a command",
            )
        job = dict(job)
        run_dir = run_dir or self.new_run_dir(job["job_name"])
        for key in _PATH_PARAMS:
            if job.get(key) and str(job[key]).startswith("~"):
                job[key] = self.transport.expand(job[key])
        full: dict[str, Any] = {
            "job": job,
            "run_dir": run_dir,
            "directives": [
                *sbatch_directives(job, output=f"{run_dir}/{output_name}", chdir=run_dir),
                *more_directives,
            ],
            "command": list(command),
            "vars": dict(variables or {}),
            **(context or {}),
        }
        return Prepared(template, self.renderer.render(template, full), run_dir, job)

    def stage_and_submit(
        self,
        prepared: Prepared,
        submit: Callable[[], T],
        *,
        files: Mapping[str | os.PathLike[str], str] | None = None,
        texts: Mapping[str, str] | None = None,
    ) -> T:
        """Make the run directory, copy ``files`` (local path -> name in it) and write ``texts``
        (name -> content, mode 0600) and the script, then ``submit()``; on any failure the run
        directory is removed again."""
        run_dir = prepared.run_dir
        if self.preflight is not None:
            self.preflight(self.check_prepared(prepared))
        transport = self.transport
        transport.makedirs(run_dir, mode=0o700)
        with self.removed_on_error(run_dir):
            made = {run_dir}
            for local, name in (files or {}).items():
                parent = str(PurePosixPath(run_dir, name).parent)
                if parent not in made:
                    transport.makedirs(parent, mode=0o700)
                    made.add(parent)
                transport.put(os.fspath(local), f"{run_dir}/{name}", mode=0o600)
            for name, text in (texts or {}).items():
                transport.write_text(f"{run_dir}/{name}", text, mode=0o600)
            transport.write_text(f"{run_dir}/{SCRIPT_NAME}", prepared.script, mode=0o600)
            return submit()

    def check_prepared(self, prepared: Prepared) -> Preflight:
        """The scheduler's verdict on a prepared job, nothing queued (raises CannotRun)."""
        return self.scheduler.check(prepared.script, workdir=prepared.run_dir)

    def submit_prepared(
        self,
        prepared: Prepared,
        *,
        files: Mapping[str | os.PathLike[str], str] | None = None,
        texts: Mapping[str, str] | None = None,
    ) -> Job:
        """Stage and submit one prepared job; returns the queued job."""
        job_id = self.stage_and_submit(
            prepared,
            lambda: self.scheduler.submit(prepared.script, workdir=prepared.run_dir),
            files=files,
            texts=texts,
        )
        return self._recorded(
            Job(self, job_id, run_dir=prepared.run_dir, name=prepared.name, output=prepared.output(job_id))
        )

    def _recorded(self, job: Job) -> Job:
        """Note a submitted job in the local records (``logs``/``fetch`` after Slurm forgets it)."""
        record = jobrecords.JobRecord(
            self.profile.name, job.id, name=job.name, run_dir=job.run_dir, output=job.output_path_hint()
        )
        jobrecords.add(record)
        job.recorded = True
        return job

    def submit(
        self,
        template_or_script: str | os.PathLike[str],
        *,
        command: Sequence[str] = (),
        variables: Mapping[str, Any] | None = None,
        files: Mapping[str | os.PathLike[str], str] | None = None,
        **params: Any,
    ) -> Job:
        """Render a template (or take a local script file) and submit it; returns the queued job.

        ``files`` maps local paths to names to stage into the run directory before submission.
        """
        if isinstance(template_or_script, os.PathLike) or _looks_like_path(template_or_script):
            return self.submit_script(Path(template_or_script), params)
        job = self.resolve_job(params, default_name=f"hpclaunch-{template_or_script}")
        prepared = self.prepare(template_or_script, job, command=command, variables=variables)
        return self.submit_prepared(prepared, files=files)

    def submit_script(self, path: str | os.PathLike[str], params: Mapping[str, Any]) -> Job:
        """Submit the user's own job script; only what the user chose overrides its ``#SBATCH`` lines."""
        path = Path(path)
        if not path.is_file():
            raise TemplateError.not_a_file("job script", path, hint="give a template name or a script file")
        try:
            script = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise TemplateError(f"cannot read job script {path}: {err}") from None
        chosen = self.chosen_params(params)
        args = sbatch_directives(chosen)
        if self.preflight is not None:
            self.preflight(self.scheduler.check(script, sbatch_args=args))
        run_dir = None
        if self.is_remote:
            run_dir = self.new_run_dir(path.stem)
            self.transport.makedirs(run_dir, mode=0o700)
        args = sbatch_directives(chosen, chdir=run_dir)
        submit_dir = run_dir or os.getcwd()
        if run_dir is None:
            job_id = self.scheduler.submit(script, sbatch_args=args, workdir=submit_dir)
        else:
            with self.removed_on_error(run_dir):
                job_id = self.scheduler.submit(script, sbatch_args=args, workdir=submit_dir)
        output = None
        if not chosen.get("output") and not _OWN_OUTPUT.search(script):
            output = f"{submit_dir}/slurm-{job_id}.out"  # sbatch's default, in the directory it ran from
        name = chosen.get("job_name") or path.name
        return self._recorded(Job(self, job_id, run_dir=run_dir, name=name, output=output))

    # --- jobs ----------------------------------------------------------------------------------

    def job(self, job_id: str | int) -> Job:
        """Reattach to any job by id (submitted from anywhere); a malformed id is refused here."""
        from .slurm.parse import is_job_id

        text = str(job_id).strip()
        if not is_job_id(text):
            raise ParameterError(f"{text!r} is not a job id", hint="job ids look like 1234 or 1234_5")
        record = jobrecords.find(self.profile.name, text)
        if record is None:
            return Job(self, text)
        return Job(self, text, run_dir=record.run_dir, name=record.name, output=record.output, recorded=True)

    def jobs(self, name_prefix: str | None = None, *, finished: bool = False) -> list[Job]:
        """The user's active jobs in the queue by id, optionally only those whose name starts with
        ``name_prefix``; ``finished``: also those that ended recently (Slurm shows them for MinJobAge),
        after the active ones."""
        infos = [i for i in self.scheduler.jobs(name_prefix) if finished or not i.is_terminal]
        infos.sort(key=lambda i: (i.is_terminal, _id_key(i.job_id)))
        return [Job(self, info.job_id, name=info.name, info=info) for info in infos]

    def states(self, jobs: Sequence[Job | str]) -> dict[str, JobInfo]:
        """The state of many jobs in one scheduler call."""
        ids = [j.id if isinstance(j, Job) else str(j) for j in jobs]
        return self.scheduler.states(ids)

    def wait_ids(
        self,
        ids: Iterable[str],
        *,
        timeout: float | None = None,
        on_update: UpdateCallback | None = None,
        poll: float | None = None,
        max_poll: float | None = None,
    ) -> dict[str, JobInfo]:
        """Wait for many jobs with ONE batched state query per poll (see ``Cluster.wait``)."""
        return self.scheduler.wait(
            [str(i).strip() for i in ids], timeout=timeout, poll=poll, max_poll=max_poll, on_update=on_update
        )

    def check(
        self,
        template_or_script: str | os.PathLike[str],
        *,
        command: Sequence[str] = (),
        variables: Mapping[str, Any] | None = None,
        context: Mapping[str, Any] | None = None,
        **params: Any,
    ) -> Preflight:
        """Whether and when this job could start, queueing nothing (one scheduler call, plus the
        partitions' limits once per session). Raises CannotRun with what to change."""
        if isinstance(template_or_script, os.PathLike) or _looks_like_path(template_or_script):
            path = Path(template_or_script)
            try:
                script = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as err:
                raise TemplateError(f"cannot read job script {path}: {err}") from None
            return self.scheduler.check(script, sbatch_args=sbatch_directives(self.chosen_params(params)))
        job = self.resolve_job(params, default_name=f"hpclaunch-{template_or_script}")
        prepared = self.prepare(
            template_or_script, job, command=command, variables=variables, context=context
        )
        return self.check_prepared(prepared)

    # --- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
            self._scheduler = None


def _id_key(job_id: str) -> tuple[int, ...]:
    """Sort ``123``, ``123_4`` and ``1000`` as numbers."""
    return tuple(int(part) if part.isdigit() else 0 for part in job_id.replace("+", "_").split("_"))


def _looks_like_path(value: str) -> bool:
    return "/" in value or value.endswith((".sh", ".slurm", ".sbatch", ".bash")) or Path(value).is_file()
