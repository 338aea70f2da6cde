"""Talk to Slurm through a Transport: submit, query (squeue, then scontrol, then sacct), cancel, wait.

Every command goes through ``transport.run`` with an argv list. Queries batch every id into one call per
tool, and a controller that does not answer yields UNKNOWN states, never a made-up failure.

Longer than most modules on purpose: it is the one choke point for every Slurm command hpclaunch runs
(sbatch, squeue, scontrol, sacct, scancel, sinfo), each with its retry rule and its error mapping, so
they read side by side; the parsing lives in ``parse.py`` and ``request.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from hpclaunch.errors import (
    CannotRun,
    CommandTimeout,
    JobNotFound,
    SlurmError,
    SlurmUnavailable,
    SubmissionRejected,
)
from hpclaunch.params import gpus_beyond_a_node, gres_gpus
from hpclaunch.polling import Backoff, PollBudget, Poller, UpdateCallback, wait_for
from hpclaunch.scheduler import ArrayTask, Capabilities
from hpclaunch.slurm import parse
from hpclaunch.slurm.request import (
    Partition,
    Preflight,
    job_request,
    over_limits,
    parse_partitions,
    parse_test_only,
)
from hpclaunch.states import NOT_FOUND, JobInfo, JobState, Phase
from hpclaunch.transport.base import CommandResult, CommandRunner

log = logging.getLogger(__name__)

#: Up to this many ids missing from squeue are asked one ``scontrol show job <id>`` each; more, and one
#: ``scontrol show job`` of every job is cheaper (scontrol takes one id at a time).
SCONTROL_PER_ID_LIMIT = 4

# Messages after which sbatch certainly did not create the job, so submitting again is safe. After a
# "Socket timed out" the controller may have accepted it: we do not resubmit then.
_NOT_SUBMITTED = re.compile(
    r"unable to contact slurm controller|connection refused|backup controller in standby mode"
    r"|temporarily unable to accept job",
    re.IGNORECASE,
)
_SIGNAL = re.compile(r"^(?:SIG)?[A-Z][A-Z0-9+]*$|^\d{1,2}$")


@dataclass(frozen=True)
class RetryPolicy:
    """How long to keep retrying a command that failed with a transient controller error."""

    deadline: float = 30.0  # seconds, for all tries of one command together
    backoff: Backoff = dataclasses.field(default_factory=lambda: Backoff(initial=0.5, maximum=8.0))


def _refusal_hint(text: str) -> str:
    if "node configuration is not available" in text.lower():
        return (
            "no node has what was asked for: ask for fewer --gpus, less --mem or --cpus-per-task, or "
            "another --constraint/--partition (see `sinfo -o '%P %D %c %m %G %f'`)"
        )
    if "invalid feature specification" in text.lower():
        return "no node here has that --constraint feature; list the features with `sinfo -o '%N %f'`"
    return "change the request; `hpclaunch check` tries one without queueing it"


class _RetriesSpent(Exception):
    """The retry deadline passed: the last result stands."""


@dataclass
class _Lookup:
    """What one round of queries learned: records by source, and why ids could not be resolved."""

    records: list[JobInfo] = dataclasses.field(default_factory=list)
    unavailable: str | None = None  # Slurm's words when the controller did not answer


class SlurmClient:
    """Slurm over a :class:`~hpclaunch.transport.base.Transport` (this machine, or one SSH connection)."""

    name = "slurm"
    capabilities = Capabilities(arrays=True, cancel_array=True, runs_here=False)

    def __init__(
        self,
        transport: CommandRunner,
        *,
        retry: RetryPolicy | None = None,
        command_timeout: float = 60.0,
        poll_budget: PollBudget | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._transport = transport
        self.retry = retry or RetryPolicy()
        self.command_timeout = command_timeout
        self.poll_budget = poll_budget or PollBudget()
        self._sleep = sleep
        self._clock = clock
        self._rng = rng
        #: None until sacct has been tried; False once it said accounting is disabled (never ask again).
        self.accounting: bool | None = None
        # Read once per session: they change rarely and are the same for every job.
        self._partitions: dict[str, Partition] | None = None
        self._config: dict[str, str] | None = None

    @property
    def transport(self) -> CommandRunner:
        """The transport every command goes through."""
        return self._transport

    # -- running commands ------------------------------------------------------------------------------

    def _run(
        self,
        argv: Sequence[str],
        *,
        stdin: str | None = None,
        env: Mapping[str, str] | None = None,
        retry_if: Callable[[str], bool] | None = None,
    ) -> CommandResult:
        """Run a Slurm command, retrying transient controller errors with backoff until the deadline.

        Returns the last result, failed or not; the caller decides what a failure means.
        """
        full_env = {**parse.QUERY_ENV, **(env or {})}
        result: CommandResult | None = None
        poller = Poller(
            self.retry.backoff,
            timeout=self.retry.deadline,
            on_timeout=lambda _waited: _RetriesSpent(),
            sleep=self._sleep,
            clock=self._clock,
            rng=self._rng,
        )
        try:
            for _ in poller:
                try:
                    result = self._transport.run(
                        argv, stdin=stdin, timeout=self.command_timeout, check=False, env=full_env
                    )
                except CommandTimeout as exc:
                    # A hung squeue is the controller being slow: as transient as "Socket timed out".
                    result = CommandResult(tuple(argv), 124, "", f"Socket timed out: {exc.message}")
                if result.ok:
                    return result
                text = result.stderr or result.stdout
                transient = parse.classify_error(text) == "transient"
                if retry_if is not None:
                    transient = transient and retry_if(text)
                if not transient:
                    return result
                log.debug("%s: transient error (%s); retrying", argv[0], text.strip())
        except _RetriesSpent:
            pass
        assert result is not None  # the first round always runs
        return result

    # -- submitting ------------------------------------------------------------------------------------

    def submit(
        self,
        script_text: str,
        *,
        sbatch_args: Sequence[str] = (),
        workdir: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> str:
        """Submit a job script given as text (on sbatch's stdin, never through a shell); return its id.

        ``env`` is added to sbatch's environment, which Slurm passes on to the job (``--export=ALL``).
        """
        if "\0" in script_text:
            raise SubmissionRejected("the job script contains a NUL byte")
        argv = ["sbatch", "--parsable", *self._check_args(sbatch_args)]
        if workdir is not None:
            argv.append(f"--chdir={workdir}")
        return self._sbatch(argv, stdin=script_text, env=env)

    def submit_array(
        self, script_text: str, *, count: int, workdir: str, max_concurrent: int | None = None
    ) -> list[ArrayTask]:
        """One ``sbatch --array=0-(N-1)[%M]`` per part of at most ``MaxArraySize`` tasks (read once per
        session). With a throttle, each part waits for the one before it (``afterany``), so no more
        than ``max_concurrent`` tasks of the whole sweep run at once."""
        limit = self.max_array_size() or count
        tasks: list[ArrayTask] = []
        previous: str | None = None
        try:
            for offset in range(0, count, limit):
                size = min(limit, count - offset)
                spec = f"0-{size - 1}" + (f"%{max_concurrent}" if max_concurrent is not None else "")
                args = [f"--array={spec}"]
                if previous is not None and max_concurrent is not None:
                    args.append(f"--dependency=afterany:{previous}")
                part = self.submit(
                    script_text, sbatch_args=args, workdir=workdir, env={"HPCLAUNCH_TASK_OFFSET": str(offset)}
                )
                tasks += [ArrayTask(f"{part}_{index}", part, index) for index in range(size)]
                previous = part
        except BaseException:
            # A part refused half way: leave no earlier part running.
            for part in dict.fromkeys(task.array_id for task in tasks):
                with contextlib.suppress(SlurmError):
                    self.cancel(part)
            raise
        return tasks

    def check(
        self, script_text: str, *, sbatch_args: Sequence[str] = (), workdir: str | None = None
    ) -> Preflight:
        """Whether and when the job could start, without queueing it: the partition's limits, then
        ``sbatch --test-only`` with the very script and options. Raises CannotRun with what to change."""
        request = job_request(script_text, sbatch_args)
        problem = over_limits(request, self.partitions())
        if problem:
            raise CannotRun(problem)
        argv = ["sbatch", "--test-only", *self._check_args(sbatch_args)]
        if workdir is not None:
            argv.append(f"--chdir={workdir}")
        result = self._run(argv, stdin=script_text)
        text = result.stderr + result.stdout
        found = parse_test_only(text)
        if result.ok and found is not None:
            return found
        if parse.classify_error(text) == "transient":
            raise SlurmUnavailable(f"the Slurm controller did not answer: {parse.slurm_message(text)}")
        # Slurm's "Requested node configuration is not available" says nothing of why: name the GPUs.
        asked = gres_gpus(request.get("gres"))
        problem = gpus_beyond_a_node(asked, self.gpus_per_node(request.get("partition"))) if asked else None
        if problem:
            raise CannotRun(problem)
        raise CannotRun(f"Slurm refuses the request: {parse.slurm_message(text)}", hint=_refusal_hint(text))

    def partitions(self) -> dict[str, Partition]:
        """Every partition's limits (``scontrol show partition -o``), read once per session."""
        if self._partitions is None:
            result = self._run(["scontrol", "show", "partition", "-o"])
            self._partitions = parse_partitions(result.stdout) if result.ok else {}
        return self._partitions

    def config(self, key: str) -> str | None:
        """One value of ``scontrol show config`` (read once per session), e.g. ``MaxArraySize``."""
        if self._config is None:
            result = self._run(["scontrol", "show", "config"])
            self._config = parse.parse_config(result.stdout) if result.ok else {}
        return self._config.get(key)

    def max_array_size(self) -> int | None:
        """Task ids of one array must stay below this (``MaxArraySize``); None when unknown."""
        value = self.config("MaxArraySize")
        return int(value) if value and value.isdigit() else None

    def cpus_per_gpu(self, partition: str | None) -> int | None:
        """CPU cores per GPU on the partition's tightest GPU node type (``sinfo %c %G``); None when
        no node has GPUs or sinfo cannot tell."""
        argv = ["sinfo", "-h", "-o", "%c %G"]
        if partition:
            argv += ["-p", partition]
        result = self._run(argv)
        return parse.parse_sinfo_cpus_per_gpu(result.stdout) if result.ok else None

    def gpus_per_node(self, partition: str | None) -> int | None:
        """The most GPUs any node of the partition has, from ``sinfo``; None when it cannot be told
        (sinfo failed, or shows no GPUs: a mistyped partition must not read as "0 per node")."""
        argv = ["sinfo", "-h", "-o", "%G"]
        if partition:
            argv += ["-p", partition]
        result = self._run(argv)
        if not result.ok:
            return None
        return parse.parse_sinfo_gpus(result.stdout)

    @staticmethod
    def _check_args(args: Sequence[str]) -> list[str]:
        if isinstance(args, str):
            raise TypeError("sbatch_args must be a list of strings, not one string")
        return [str(arg) for arg in args]

    def _sbatch(self, argv: list[str], *, stdin: str | None = None, env: Mapping[str, str] | None) -> str:
        result = self._run(
            argv, stdin=stdin, env=env, retry_if=lambda text: bool(_NOT_SUBMITTED.search(text))
        )
        if result.ok:
            job_id, _cluster = parse.parse_sbatch(result.stdout)
            return job_id
        text = result.stderr or result.stdout
        where = self._transport.description
        if result.returncode in (126, 127) and "sbatch" in text and "not found" in text.lower():
            raise SlurmError(
                f"sbatch is not available on {where}: {text.strip()}",
                hint="run this on a Slurm login node, or use the `local` profile",
            )
        if parse.classify_error(text) == "transient":
            hint = "try again in a minute"
            if not _NOT_SUBMITTED.search(text):
                hint = "the job may have been queued anyway: check `squeue --me` before submitting again"
            raise SlurmUnavailable(
                f"the Slurm controller did not answer sbatch: {parse.slurm_message(text)}", hint=hint
            )
        raise SubmissionRejected(f"sbatch refused the job: {parse.slurm_message(text)}")

    # -- querying --------------------------------------------------------------------------------------

    def states(self, job_ids: Iterable[str]) -> dict[str, JobInfo]:
        """The info of every id: one squeue call for all, then scontrol, then sacct for the rest.

        Ids no source knows (source ``NOT_FOUND``), or that could not be asked because the controller
        did not answer, are UNKNOWN with the reason in ``reason``; never FAILED.
        """
        ids = list(dict.fromkeys(str(job_id).strip() for job_id in job_ids))
        for job_id in ids:
            if not parse.is_job_id(job_id):
                raise SlurmError(f"not a Slurm job id: {job_id!r}")
        found: dict[str, JobInfo] = {}
        if not ids:
            return found
        unavailable: str | None = None

        lookup = self._squeue(ids)
        found.update(_match(ids, lookup.records))
        unavailable = lookup.unavailable
        missing = [job_id for job_id in ids if job_id not in found]

        # The same controller answers scontrol: when squeue could not reach it, neither can scontrol.
        if missing and unavailable is None:
            lookup = self._scontrol(missing)
            found.update(_match(missing, lookup.records))
            unavailable = lookup.unavailable
            missing = [job_id for job_id in ids if job_id not in found]

        if missing and unavailable is None and self.accounting is not False:
            lookup = self._sacct(missing)
            found.update(_match(missing, lookup.records))
            unavailable = lookup.unavailable
            missing = [job_id for job_id in ids if job_id not in found]

        if unavailable is not None:
            reason = f"Slurm did not answer: {unavailable}"
        else:
            sources = "squeue or scontrol" if self.accounting is False else "squeue, scontrol or sacct"
            reason = f"not known to {sources} (finished long ago, or from another cluster?)"
        source = NOT_FOUND if unavailable is None else "squeue"
        for job_id in missing:
            found[job_id] = JobInfo(job_id=job_id, state=JobState.UNKNOWN, source=source, reason=reason)
        return {job_id: found[job_id] for job_id in ids}

    def _squeue(self, ids: list[str]) -> _Lookup:
        result = self._run(parse.squeue_argv(ids))
        if result.ok:
            return _Lookup(parse.parse_squeue(result.stdout))
        text = result.stderr or result.stdout
        kind = parse.classify_error(text)
        if kind == "invalid_job":
            if len(ids) == 1:
                return _Lookup()
            # Some Slurm versions refuse the whole list when one id is unknown: ask for every job instead.
            result = self._run(parse.squeue_argv(everyone=True))
            if result.ok:
                return _Lookup(parse.parse_squeue(result.stdout))
            text = result.stderr or result.stdout
            kind = parse.classify_error(text)
        if kind == "transient":
            return _Lookup(unavailable=parse.slurm_message(text))
        raise SlurmError(f"squeue failed on {self._transport.description}: {parse.slurm_message(text)}")

    def _scontrol(self, ids: list[str]) -> _Lookup:
        if len(ids) > SCONTROL_PER_ID_LIMIT:
            argvs = [parse.scontrol_argv()]
        else:
            argvs = [parse.scontrol_argv(job_id) for job_id in ids]
        lookup = _Lookup()
        for argv in argvs:
            result = self._run(argv)
            if result.ok:
                lookup.records += parse.parse_scontrol_jobs(result.stdout)
                continue
            text = result.stderr or result.stdout
            kind = parse.classify_error(text)
            if kind == "transient":
                lookup.unavailable = parse.slurm_message(text)
                break
            if kind != "invalid_job":
                log.warning("scontrol failed: %s", parse.slurm_message(text))
        return lookup

    def _sacct(self, ids: list[str]) -> _Lookup:
        result = self._run(parse.sacct_argv(ids))
        text = result.stderr or result.stdout
        if result.ok:
            self.accounting = True
            return _Lookup(parse.parse_sacct(result.stdout))
        if parse.accounting_disabled(text):
            self.accounting = False  # a cluster without slurmdbd: skip sacct silently from now on
            return _Lookup()
        if parse.classify_error(text) == "transient":
            return _Lookup(unavailable=parse.slurm_message(text))
        # sacct is the last resort; its other failures (not installed, no permission) leave ids unknown.
        log.warning("sacct failed: %s", parse.slurm_message(text))
        return _Lookup()

    def info(self, job_id: str) -> JobInfo:
        """The current info of one job (UNKNOWN when no source knows it)."""
        return self.states([job_id])[str(job_id).strip()]

    def output_path(self, job_id: str) -> str:
        """The job's StdOut as scontrol reports it (``%j``, ``%x``... already expanded by Slurm)."""
        job_id = str(job_id).strip()
        result = self._run(parse.scontrol_argv(job_id))
        if result.ok:
            for record in _match([job_id], parse.parse_scontrol_jobs(result.stdout)).values():
                if record.stdout_path:
                    return record.stdout_path
        # Purged from the controller: squeue may still have it, with a pattern we can expand.
        info = self.info(job_id)
        if info.stdout_path:
            return info.stdout_path
        raise SlurmError(
            f"cannot tell where job {job_id} writes its output: {info.reason or 'Slurm does not say'}",
            hint="give the job an absolute --output path",
        )

    def jobs(self, name_prefix: str | None = None, user: str | None = None) -> list[JobInfo]:
        """The user's jobs (``--me``, or ``--user``) that Slurm still holds, in one squeue call."""
        result = self._run(parse.squeue_argv(user=user))
        if not result.ok:
            text = result.stderr or result.stdout
            if parse.classify_error(text) == "transient":
                raise SlurmUnavailable(
                    f"the Slurm controller did not answer squeue: {parse.slurm_message(text)}"
                )
            raise SlurmError(f"squeue failed on {self._transport.description}: {parse.slurm_message(text)}")
        jobs = parse.parse_squeue(result.stdout)
        if name_prefix is not None:
            jobs = [job for job in jobs if (job.name or "").startswith(name_prefix)]
        return jobs

    def tool_steps(self, job_id: str) -> list[str]:
        result = self._run(parse.steps_argv(job_id))
        if not result.ok:
            text = result.stderr or result.stdout
            raise SlurmError(f"squeue --steps failed for job {job_id}: {parse.slurm_message(text)}")
        return parse.parse_tool_steps(result.stdout, job_id)

    # -- acting on jobs --------------------------------------------------------------------------------

    def cancel(self, job_id: str, *, signal: str | None = None, batch_only: bool = False) -> None:
        """``scancel`` a job, or only send it ``signal``; a job that already ended is not an error, one
        that Slurm does not know at all is (JobNotFound)."""
        job_id = str(job_id).strip()
        if not parse.is_job_id(job_id):
            raise SlurmError(f"not a Slurm job id: {job_id!r}")
        # Without --verbose, scancel of an id it does not know prints nothing and exits 0.
        argv = ["scancel", "--verbose"]
        if signal is not None:
            if not _SIGNAL.match(str(signal).upper()):
                raise SlurmError(f"not a signal name or number: {signal!r}")
            argv.append(f"--signal={str(signal).upper()}")
        if batch_only:
            argv.append("--batch")
        argv.append(job_id)
        result = self._run(argv)
        text = result.stderr or result.stdout
        if parse.already_finished(text):
            return
        if parse.classify_error(text) == "invalid_job":
            raise JobNotFound(
                f"no job {job_id} is known to Slurm",
                hint="check the id with `hpclaunch status`; Slurm forgets a job some minutes after it ends",
            )
        if result.ok:
            return
        if parse.classify_error(text) == "transient":
            raise SlurmUnavailable(
                f"could not cancel job {job_id}: {parse.slurm_message(text)}",
                hint="the job may still be running; try again",
            )
        raise SlurmError(f"could not cancel job {job_id}: {parse.slurm_message(text)}")

    def wait(
        self,
        job_ids: Iterable[str],
        *,
        timeout: float | None = None,
        poll: float | None = None,
        max_poll: float | None = None,
        on_update: UpdateCallback | None = None,
        unknown_grace: float | None = 120.0,
    ) -> dict[str, JobInfo]:
        """Poll all ids with one batched query per round until every job has ended (or is pending for
        a reason that cannot clear), backing off within the profile's polling budget.

        Raises WaitTimeout at ``timeout``; raises JobNotFound when an id stays unknown to every source
        for ``unknown_grace`` seconds (a typo, or a job purged before we looked), instead of hanging.
        """
        return wait_for(
            self.states,
            job_ids,
            timeout=timeout,
            backoff=self.poll_budget.backoff(poll, max_poll),
            on_update=on_update,
            sleep=self._sleep,
            clock=self._clock,
            rng=self._rng,
            unknown_grace=unknown_grace,
        )


# -- matching records to the ids asked for -------------------------------------------------------------


def _match(ids: Sequence[str], records: Sequence[JobInfo]) -> dict[str, JobInfo]:
    """Pick, for each requested id, the record that answers it.

    ``123_4`` and a task's unique id match that task; a plain array job id (``123``) gets one summary
    of all its tasks; ``123_7`` matches the pending remainder ``123_[6-9]`` when 7 is in it.
    """
    out: dict[str, JobInfo] = {}
    for job_id in ids:
        base, task = parse.split_job_id(job_id)
        if task is None:
            tasks = [r for r in records if r.array_job_id == base]
            if tasks:
                out[job_id] = dataclasses.replace(
                    _summarise(tasks), job_id=job_id, raw_job_id=base, array_task_id=None
                )
                continue
            direct = [r for r in records if r.job_id == job_id or r.raw_job_id == job_id]
        else:
            direct = [r for r in records if r.job_id == job_id]
            if not direct and task.isdigit():
                direct = [
                    dataclasses.replace(r, job_id=job_id, array_task_id=task)
                    for r in records
                    if r.array_job_id == base
                    and r.array_task_id is not None
                    and not r.array_task_id.isdigit()
                    and int(task) in parse.expand_task_range(r.array_task_id)
                ]
        if direct:
            out[job_id] = direct[0]
    return out


def _summarise(tasks: Sequence[JobInfo]) -> JobInfo:
    """One state for a whole array: running while any task runs, pending while any waits, else the
    first failure, else done."""
    for phase in (Phase.RUNNING, Phase.PENDING, Phase.UNKNOWN, Phase.FAILED, Phase.DONE):
        for record in tasks:
            if record.state.phase is phase:
                return record
    return tasks[0]
