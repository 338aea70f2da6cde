"""The object people script against: one profile, one connection, many jobs.

The CLI commands are thin layers over :class:`Cluster` and :class:`Job`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from . import config as config_mod
from .errors import HpclaunchError, ParameterError, TemplateError
from .job import Job
from .params import JOB_PARAMS, resolve, sbatch_directives, validate_params
from .render import Renderer

if TYPE_CHECKING:
    from submitit.core.core import Executor

    from .array import ArrayJob
    from .jupyter.session import JupyterOptions, Session
    from .scheduler import Scheduler
    from .slurm.states import JobInfo
    from .train import TrainOptions
    from .transport.base import Transport


class Cluster:
    """A Slurm cluster (or this machine) reached through one transport, opened lazily, once.

    >>> with Cluster("mycluster") as cluster:          # doctest: +SKIP
    ...     job = cluster.submit("run", command=["python", "train.py"], gpus=1, time="2h")
    ...     job.wait()
    """

    def __init__(
        self,
        profile: str | config_mod.Profile | None = None,
        *,
        config: str | os.PathLike[str] | None = None,
        host: str | None = None,
        user: str | None = None,
        port: int | None = None,
        template_dir: str | None = None,
        accept_new_host_key: bool | None = None,
        transport: Transport | None = None,
        **job_defaults: Any,
    ) -> None:
        if isinstance(profile, config_mod.Profile):
            chosen = profile
        else:
            chosen = config_mod.load(config).profile(profile)
        chosen = chosen.with_overrides(
            host=host,
            user=user,
            port=port,
            template_dir=template_dir,
            accept_new_host_key=accept_new_host_key,
        )
        config_mod.check_profile(chosen)
        self.profile = chosen
        self._job_defaults = validate_params(job_defaults, source="Cluster()")
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
            )
        return self._transport

    @property
    def scheduler(self) -> Scheduler:
        if self._scheduler is None:
            if self.profile.scheduler == "local":
                from .localsched import LocalScheduler

                self._scheduler = LocalScheduler()
            else:
                from .slurm.client import SlurmClient

                self._scheduler = SlurmClient(self.transport)
        return self._scheduler

    @property
    def renderer(self) -> Renderer:
        if self._renderer is None:
            self._renderer = Renderer(self.profile.template_dir)
        return self._renderer

    @property
    def is_remote(self) -> bool:
        return bool(self.profile.host)

    # --- parameters and scripts ----------------------------------------------------------------

    def resolve_job(self, params: Mapping[str, Any], *, default_name: str) -> dict[str, Any]:
        """Call-site values > Cluster() keyword defaults > profile > built-in defaults."""
        given = validate_params(params)
        job = resolve(given, self._job_defaults, self.profile.job, params=JOB_PARAMS)
        if not job.get("job_name"):
            job["job_name"] = default_name
        return job

    def new_run_dir(self, name: str) -> str:
        """A fresh, unique directory name under the profile's work directory (not yet created)."""
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:60]
        base = self.transport.expand(self.profile.workdir)
        return str(PurePosixPath(base) / f"{safe}-{stamp}-{secrets.token_hex(3)}")

    def render(
        self,
        template: str,
        *,
        command: Sequence[str] = (),
        variables: Mapping[str, Any] | None = None,
        run_dir: str | None = None,
        context: Mapping[str, Any] | None = None,
        **params: Any,
    ) -> str:
        """The job script ``template`` renders to, with nothing submitted.

        ``context`` adds template variables; the built-in ``jupyter`` template gets its defaults.
        """
        if template == "jupyter" and context is None:
            from .jupyter.session import JupyterOptions, template_context

            run_dir = run_dir or self.new_run_dir("hpclaunch-jupyter")
            context = template_context(self, JupyterOptions(), f"{run_dir}/jupyter.token")
        script, _, _ = self._prepare(template, command, variables, run_dir, params, context)
        return script

    def _prepare(
        self,
        template: str,
        command: Sequence[str],
        variables: Mapping[str, Any] | None,
        run_dir: str | None,
        params: Mapping[str, Any],
        extra: Mapping[str, Any] | None = None,
        *,
        output_name: str = "slurm-%j.out",
        more_directives: Sequence[str] = (),
    ) -> tuple[str, str, dict[str, Any]]:
        self.renderer.source_of(template)  # fail before connecting when the name is wrong
        if template == "run" and not command:
            raise ParameterError(
                "the 'run' template needs a command", hint="e.g. hpclaunch submit run -- hostname"
            )
        job = self.resolve_job(params, default_name=f"hpclaunch-{template}")
        run_dir = run_dir or self.new_run_dir(job["job_name"])
        for key in ("venv", "output", "error", "conda_env"):
            if job.get(key) and str(job[key]).startswith("~"):
                job[key] = self.transport.expand(job[key])
        context: dict[str, Any] = {
            "job": job,
            "run_dir": run_dir,
            "directives": [
                *sbatch_directives(job, output=f"{run_dir}/{output_name}", chdir=run_dir),
                *more_directives,
            ],
            "command": list(command),
            "vars": dict(variables or {}),
            **(extra or {}),
        }
        return self.renderer.render(template, context), run_dir, job

    # --- jobs ----------------------------------------------------------------------------------

    def submit(
        self,
        template_or_script: str,
        *,
        command: Sequence[str] = (),
        variables: Mapping[str, Any] | None = None,
        files: Mapping[str, str] | None = None,
        **params: Any,
    ) -> Job:
        """Render a template (or take a local script file) and submit it; returns the queued job.

        ``files`` maps local paths to names to stage into the run directory before submission.
        """
        if _looks_like_path(template_or_script):
            return self._submit_script(Path(template_or_script), params)
        script, run_dir, job = self._prepare(template_or_script, command, variables, None, params)
        self.transport.makedirs(run_dir, mode=0o700)
        with self.removed_on_error(run_dir):
            for local, name in (files or {}).items():
                self.transport.put(local, f"{run_dir}/{name}")
            self.transport.write_text(f"{run_dir}/job.sbatch", script, mode=0o600)
            job_id = self.scheduler.submit(script, workdir=run_dir)
        output = None if job.get("output") else f"{run_dir}/slurm-{job_id}.out"
        return Job(self, job_id, run_dir=run_dir, name=job["job_name"], output=output)

    @contextlib.contextmanager
    def removed_on_error(self, run_dir: str) -> Iterator[None]:
        """A rejected submission leaves no run directory behind."""
        try:
            yield
        except BaseException:
            with contextlib.suppress(HpclaunchError):
                self.remove_run_dir(run_dir)
            raise

    def remove_run_dir(self, run_dir: str) -> None:
        """Delete a run directory made by hpclaunch (refuses anything outside the work directory)."""
        base = self.transport.expand(self.profile.workdir).rstrip("/") + "/"
        if not run_dir.startswith(base) or "/../" in run_dir:
            raise ParameterError(f"refusing to delete {run_dir}: not a run directory under {base}")
        self.transport.run(["rm", "-rf", "--", run_dir], timeout=60)

    def submit_prepared(
        self,
        template: str,
        *,
        run_dir: str,
        context: Mapping[str, Any],
        params: Mapping[str, Any],
        command: Sequence[str] = (),
    ) -> Job:
        """Submit ``template`` into an existing run directory with extra template ``context``.

        Used by the notebook and training commands, which stage files there first.
        """
        # The caller made the run directory for this job: a refused one (a bad value) takes it away.
        with self.removed_on_error(run_dir):
            script, run_dir, job = self._prepare(template, command, None, run_dir, params, context)
            self.transport.write_text(f"{run_dir}/job.sbatch", script, mode=0o600)
            job_id = self.scheduler.submit(script, workdir=run_dir)
        output = None if job.get("output") else f"{run_dir}/slurm-{job_id}.out"
        return Job(self, job_id, run_dir=run_dir, name=job["job_name"], output=output)

    def _submit_script(self, path: Path, params: Mapping[str, Any]) -> Job:
        if not path.is_file():
            raise TemplateError(
                f"job script {path} does not exist", hint="give a template name or a script file"
            )
        try:
            script = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise TemplateError(f"cannot read job script {path}: {err}") from None
        # Only what the user asked for overrides the script's own #SBATCH lines.
        given = validate_params(params)
        given = {**self.profile.job, **self._job_defaults, **given}
        run_dir = None
        if self.is_remote:
            run_dir = self.new_run_dir(path.stem)
            self.transport.makedirs(run_dir, mode=0o700)
        args = sbatch_directives(given, chdir=run_dir)
        job_id = self.scheduler.submit(script, sbatch_args=args, workdir=run_dir or os.getcwd())
        return Job(self, job_id, run_dir=run_dir, name=given.get("job_name") or path.name)

    def job(self, job_id: str | int) -> Job:
        """Reattach to any job by id (submitted from anywhere); a malformed id is refused here."""
        from .slurm.parse import is_job_id

        text = str(job_id).strip()
        if not is_job_id(text):
            raise ParameterError(f"{text!r} is not a job id", hint="job ids look like 1234 or 1234_5")
        return Job(self, text)

    def jobs(self, name_prefix: str | None = None) -> list[Job]:
        """The user's jobs in the queue, optionally only those whose name starts with ``name_prefix``."""
        return [
            Job(self, info.job_id, name=info.name, info=info) for info in self.scheduler.jobs(name_prefix)
        ]

    def states(self, jobs: Sequence[Job | str]) -> dict[str, JobInfo]:
        """The state of many jobs in one scheduler call."""
        ids = [j.id if isinstance(j, Job) else str(j) for j in jobs]
        return self.scheduler.states(ids)

    def submit_array(
        self,
        params_list: Sequence[Mapping[str, Any]],
        *,
        template: str = "run",
        command: Sequence[str] = (),
        max_concurrent: int | None = None,
        variables: Mapping[str, Any] | None = None,
        files: Mapping[str, str] | None = None,
        **common: Any,
    ) -> ArrayJob:
        """Submit ONE ``sbatch --array=0-(N-1)[%max_concurrent]``: task ``i`` runs with ``params_list[i]``.

        ``common`` job parameters (time, gpus, ...) make the ``#SBATCH`` header that all tasks share.
        Each task gets its own parameters as environment variables ``HPCLAUNCH_PARAM_<NAME>`` (and
        ``HPCLAUNCH_TASK_PARAMS``, its JSON object); in the ``run`` template's ``command``, an argument
        ``{name}`` (or a part of one, ``--lr={lr}``) is replaced by the value, quoted. See
        :mod:`hpclaunch.array`.
        """
        from .array import submit_array

        return submit_array(
            self,
            params_list,
            template=template,
            command=command,
            max_concurrent=max_concurrent,
            variables=variables,
            files=files,
            **common,
        )

    def array(self, array_id: str | int) -> ArrayJob:
        """Reattach to a job array made by :meth:`submit_array` (from any process) by its job id."""
        from .array import attach_array

        return attach_array(self, array_id)

    def wait(
        self,
        jobs: Iterable[Job | ArrayJob | str],
        *,
        timeout: float | None = None,
        on_update: Callable[[JobInfo], None] | None = None,
        poll: float = 0.2,
        max_poll: float = 30.0,
    ) -> dict[str, JobInfo]:
        """Wait for many jobs (an ArrayJob counts as its tasks) with ONE batched state query per poll.

        Polls start every ``poll`` seconds and back off, with jitter, to ``max_poll``, so the load on
        the controller does not grow with the number of jobs. Returns the final info by job id;
        raises WaitTimeout after ``timeout`` seconds.
        """
        ids: list[str] = []
        for item in jobs:
            if isinstance(item, Job):
                ids.append(item.id)
            elif isinstance(item, str):
                ids.append(item.strip())
            else:
                ids.extend(item.task_ids)
        return self.scheduler.wait(ids, timeout=timeout, poll=poll, max_poll=max_poll, on_update=on_update)

    def executor(
        self, *, folder: str | os.PathLike[str] | None = None, python: str | None = None, **params: Any
    ) -> Executor:
        """A submitit executor configured from this profile and ``params`` (partition, account, time,
        GPUs, setup lines...), for running Python functions as jobs where ``sbatch`` is local.

        Over SSH this raises ConfigError: submitit runs ``sbatch`` on this machine and exchanges pickles
        through a filesystem shared with the nodes. See :mod:`hpclaunch.executor`.
        """
        from .executor import make_executor

        return make_executor(self, folder=folder, python=python, **params)

    # --- notebooks and training ----------------------------------------------------------------

    def jupyter(
        self,
        options: JupyterOptions | None = None,
        *,
        status: Callable[[str], None] | None = None,
        **params: Any,
    ) -> Session:
        """Start JupyterLab on a compute node and return the verified session (URL, token, tunnel).

        ``session.close()`` closes the tunnel and cancels the job; ``close(cancel=False)`` keeps it.
        """
        from .jupyter.session import JupyterOptions, start

        return start(self, options or JupyterOptions(), params, status=status or (lambda _msg: None))

    def train(
        self,
        job_or_script: str,
        script_args: Sequence[str] = (),
        *,
        options: TrainOptions | None = None,
        **params: Any,
    ) -> Job:
        """Stage a bundled training job (``mnist_lenet5``, ``cifar10_resnet``) or a .py script; submit it."""
        from .train import TrainOptions, submit

        return submit(self, job_or_script, script_args, params, options or TrainOptions())

    # --- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
            self._scheduler = None

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = self.profile.host or "this machine"
        return f"Cluster(profile={self.profile.name!r}, host={where!r})"


def _looks_like_path(value: str) -> bool:
    return "/" in value or value.endswith((".sh", ".slurm", ".sbatch", ".bash")) or Path(value).is_file()
