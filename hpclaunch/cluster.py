"""The object people script against: one profile, one connection, many jobs.

:class:`Cluster` is a façade: submitting and watching jobs come from
:class:`~hpclaunch.submission.Submitter`; arrays, the submitit executor, notebooks and training
runs are delegated to their own modules. The CLI commands are thin layers over it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from . import config as config_mod
from .job import Job
from .submission import Submitter

if TYPE_CHECKING:
    from submitit.core.core import Executor

    from .array import ArrayJob
    from .cleanup import CleanPlan
    from .jupyter.session import JupyterOptions, Session
    from .slurm.request import Preflight
    from .states import JobInfo
    from .train import TrainOptions
    from .transport.base import Transport


class Cluster(Submitter):
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
        template_dir: str | os.PathLike[str] | None = None,
        accept_new_host_key: bool | None = None,
        ssh_client: str | None = None,
        transport: Transport | None = None,
        preflight: Callable[[Preflight], None] | None = None,
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
            template_dir=os.fspath(template_dir) if template_dir is not None else None,
            accept_new_host_key=accept_new_host_key,
            transport=ssh_client,
        )
        super().__init__(chosen, job_defaults=job_defaults, transport=transport, preflight=preflight)

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
        job = self.resolve_job(params, default_name=f"hpclaunch-{template}")
        run_dir = run_dir or self.new_run_dir(job["job_name"])
        if template == "jupyter" and context is None:
            from .jupyter.session import JupyterOptions, template_context

            context = template_context(self, JupyterOptions().resolved(self.profile), run_dir)
        prepared = self.prepare(
            template, job, run_dir=run_dir, command=command, variables=variables, context=context
        )
        return prepared.script

    def check(
        self,
        template_or_script: str | os.PathLike[str],
        *,
        command: Sequence[str] = (),
        variables: Mapping[str, Any] | None = None,
        context: Mapping[str, Any] | None = None,
        **params: Any,
    ) -> Preflight:
        """Whether and when a job could start, queueing nothing: the partition's limits and
        ``sbatch --test-only`` with the very script. Raises CannotRun with what to change.

        >>> cluster.check("run", command=["hostname"], nodes=5)     # doctest: +SKIP
        CannotRun: partition debug has 2 nodes; asked for 5: give fewer --nodes
        """
        if template_or_script == "jupyter" and context is None:
            from .jupyter.session import JupyterOptions, template_context

            run_dir = self.new_run_dir("hpclaunch-jupyter")
            context = template_context(self, JupyterOptions().resolved(self.profile), run_dir)
        return super().check(
            template_or_script, command=command, variables=variables, context=context, **params
        )

    # --- the work directory ---------------------------------------------------------------------

    def clean(self, *, older_than: float = 0.0, results: bool = False, dry_run: bool = False) -> CleanPlan:
        """Remove the run directories of finished notebook and plain jobs (training runs too with
        ``results``; none untouched for less than ``older_than`` seconds, none a queued job works in).
        Returns the plan: what was (with ``dry_run``: would be) removed, and what was kept and why."""
        from . import cleanup, train
        from .jupyter.session import TOKEN_FILE

        kinds = {"notebook": (TOKEN_FILE,), "training": (train.CODE_DIR, *train.RESULT_FILES)}
        planned = cleanup.plan(self, kinds=kinds, older_than=older_than, results=results)
        if not dry_run:
            cleanup.remove(self, planned.remove)
        return planned

    # --- arrays and functions ------------------------------------------------------------------

    def submit_array(
        self,
        params_list: Sequence[Mapping[str, Any]],
        *,
        template: str = "run",
        command: Sequence[str] = (),
        max_concurrent: int | None = None,
        variables: Mapping[str, Any] | None = None,
        files: Mapping[str | os.PathLike[str], str] | None = None,
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
        poll: float | None = None,
        max_poll: float | None = None,
    ) -> dict[str, JobInfo]:
        """Wait for many jobs (an ArrayJob counts as its tasks) with ONE batched state query per poll.

        Polls start every ``poll`` seconds and back off, with jitter, to ``max_poll``, both within the
        profile's ``poll_min``/``poll_max`` (0.2 s and 30 s unless the site sets others), so the load
        on the controller does not grow with the number of jobs. Returns the final info by job id; a
        job pending for a reason that cannot clear returns early, marked (``info.cannot_start``).
        Raises WaitTimeout after ``timeout`` seconds.
        """
        ids: list[str] = []
        for item in jobs:
            if isinstance(item, Job):
                ids.append(item.id)
            elif isinstance(item, str):
                ids.append(item)
            else:
                ids.extend(item.task_ids)
        return self.wait_ids(ids, timeout=timeout, on_update=on_update, poll=poll, max_poll=max_poll)

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

        ``session.serve()`` keeps it until Ctrl-C or the job's end, like ``hpclaunch jupyter``;
        ``session.close()`` closes the tunnel and cancels the job; ``close(cancel=False)`` keeps it.
        """
        from .jupyter.session import JupyterOptions, start

        return start(self, options or JupyterOptions(), params, status=status or (lambda _msg: None))

    def train(
        self,
        job_or_script: str | os.PathLike[str],
        script_args: Sequence[str] = (),
        *,
        options: TrainOptions | None = None,
        **params: Any,
    ) -> Job:
        """Stage a bundled training job (``mnist_lenet5``, ``cifar10_resnet``) or a .py script; submit it."""
        from .train import TrainOptions, submit

        return submit(self, job_or_script, script_args, params, options or TrainOptions())

    # --- lifetime ------------------------------------------------------------------------------

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = self.profile.host or "this machine"
        return f"Cluster(profile={self.profile.name!r}, host={where!r})"
