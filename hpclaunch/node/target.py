"""Which node a running job is on, after checking that it runs and is the user's."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import HpclaunchError, JobNotFound, NodeAccessError
from ..polling import Backoff, Poller
from ..states import JobInfo, JobState, Phase

if TYPE_CHECKING:
    from ..submission import Submitter

_RANGE = re.compile(r"^([^\[,]*)\[([^\]]+)\](.*)$")


def first_node(node_list: str) -> str:
    """The first host of a Slurm host list (``gpu[03-05,09]`` -> ``gpu03``, ``a,b`` -> ``a``)."""
    text = node_list.strip()
    match = _RANGE.match(text)
    if match is None or "," in match.group(1):
        return text.split(",")[0]
    prefix, ranges, _ = match.groups()
    first = ranges.split(",")[0].split("-")[0]  # keeps zero padding: 03 stays 03
    return prefix + first


@dataclass(frozen=True)
class NodeTarget:
    """A running job of the user and the node its first task runs on."""

    job_id: str
    node: str
    user: str
    info: JobInfo


def running(cluster: Submitter, job_id: str) -> NodeTarget:
    """The job's first node; NodeAccessError (one line) when it is not running or not the user's."""
    job = cluster.job(job_id)
    try:
        info = job.info()
    except JobNotFound:
        raise NodeAccessError(
            f"job {job.id} is not known to Slurm", hint="it ended long ago, or the id is wrong"
        ) from None
    if info.is_terminal:
        raise NodeAccessError(f"job {info.describe()} has ended", hint="start a new one")
    if info.phase is not Phase.RUNNING or not info.node_list:
        raise NodeAccessError(
            f"job {job.id} is {info.state.value.lower()}, not running"
            + (f" ({info.reason})" if info.reason else ""),
            hint="wait until it runs: hpclaunch status " + job.id,
        )
    me = whoami(cluster)
    if info.user and info.user != me:
        raise NodeAccessError(
            f"job {job.id} belongs to {info.user}, not to {me}", hint="you can only reach your own jobs"
        )
    return NodeTarget(job_id=job.id, node=first_node(info.node_list), user=me, info=info)


def whoami(cluster: Submitter) -> str:
    """The user name commands run as on the cluster side."""
    return cluster.transport.run(["id", "-un"], timeout=30).stdout.strip()


def while_running(cluster: Submitter, job_id: str, *, every: float = 5.0) -> JobInfo:
    """Block while the job runs (Ctrl-C ends it sooner); returns its info once it has ended.

    A query that fails (the controller busy, the connection being replaced) means "keep watching".
    """
    job = cluster.job(job_id)
    for _ in Poller(Backoff(every, every, jitter=0.1)):
        try:
            info = job.info()
        except JobNotFound:
            return JobInfo(job_id=job.id, state=JobState.UNKNOWN, source="gone")
        except HpclaunchError:
            continue
        if info.is_terminal:
            return info
    raise AssertionError("unreachable: the poller has no deadline")
