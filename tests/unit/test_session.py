"""Session: URL and OpenSSH line of the mode it really uses, a bounded serve loop, waits that name
their real cause, and nothing left behind when a notebook cannot even be rendered."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hpclaunch.cluster import Cluster
from hpclaunch.config import Profile
from hpclaunch.errors import ConnectionFailed, JupyterError, ParameterError, TransportError
from hpclaunch.job import Job
from hpclaunch.jupyter import session as jsession
from hpclaunch.jupyter.banner import ServerLocation
from hpclaunch.jupyter.session import JupyterOptions, Session
from hpclaunch.states import JobInfo, JobState

LOCATION = ServerLocation("node7", 40123, "/", None, "marker")
PROFILE = Profile(name="hpc", host="login.example.edu", user="alice")


class Host:
    """A job's cluster side, scripted: ``infos`` (or an exception) answered in turn."""

    def __init__(self, *answers: JobInfo | BaseException, files: Any = None) -> None:
        self.answers = list(answers)
        self.cancelled: list[str] = []
        self.profile = PROFILE
        self.scheduler = self
        self.transport = files

    def info(self, job_id: str) -> JobInfo:
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def cancel(self, job_id: str) -> None:
        self.cancelled.append(job_id)


def session(host: Host, **options: Any) -> Session:
    job = Job(host, "42", output="/home/alice/run/slurm-42.out")  # type: ignore[arg-type]
    opts = JupyterOptions(**options).resolved(PROFILE)
    return Session(host, job, LOCATION, "s3cret", 8888, opts)  # type: ignore[arg-type]


@pytest.mark.parametrize(("app", "path"), [("lab", "/lab"), ("notebook", "/tree"), ("server", "/")])
def test_url_opens_the_chosen_front_end(app: str, path: str) -> None:
    # First landing: always .../lab, also for --app notebook and --app server.
    assert session(Host(), app=app).url == f"http://127.0.0.1:8888{path}?token=s3cret"


def test_ssh_line_follows_the_tunnel_option_not_only_the_profile() -> None:
    # First landing: the profile said direct, --tunnel node was given, and the line pointed at node7:40123.
    direct = session(Host()).ssh_command
    assert direct == "ssh -N -L 8888:node7:40123 alice@login.example.edu"
    node = session(Host(), tunnel="node").ssh_command
    assert node == "ssh -N -J alice@login.example.edu -L 8888:127.0.0.1:40123 node7"


def test_options_are_checked_like_job_parameters() -> None:
    with pytest.raises(ParameterError, match="startup_timeout"):
        JupyterOptions(startup_timeout="120; rm -rf ~")  # type: ignore[arg-type]
    with pytest.raises(ParameterError, match="app must be one of"):
        JupyterOptions(app="vscode")
    with pytest.raises(Exception, match="tunnel must be one of"):
        JupyterOptions(tunnel="sideways")


def test_serve_gives_up_on_a_connection_lost_for_good(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # First landing: retried silently forever.
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    lost = ConnectionFailed("cannot connect to login.example.edu:22: Connection refused")
    host = Host(lost)
    with pytest.raises(JupyterError) as caught:
        session(host).serve(check_every=0.01, give_up_after=0.2)
    assert "lost the connection to the cluster" in caught.value.message
    assert "Connection refused" in caught.value.message  # the real cause, in the one line
    assert "hpclaunch stop 42" in (caught.value.hint or "")


def test_serve_ends_with_the_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    running = JobInfo("42", JobState.RUNNING, "squeue", node_list="node7")
    timeout = JobInfo("42", JobState.TIMEOUT, "squeue")

    class Log:
        def read_text(self, path: str) -> str:
            return "started\ns3cret in a line\n"

    host = Host(running, running, timeout, files=Log())
    with pytest.raises(JupyterError) as caught:
        session(host).serve(check_every=0.01)
    assert "ended" in caught.value.message and "TIMEOUT" in caught.value.message
    assert "s3cret" not in (caught.value.details or "") and "***" in (caught.value.details or "")
    assert host.cancelled == []  # it had ended by itself
    assert '"42"' not in (tmp_path / "hpclaunch" / "sessions.json").read_text()


def test_waiting_for_the_server_names_a_real_read_error() -> None:
    # First landing: every TransportError reading the log meant "not written yet", until the timeout.
    class Unreadable:
        def read_bytes(self, path: str, *, offset: int = 0, limit: int | None = None) -> bytes:
            raise TransportError(f"cannot read {path}: Permission denied")

    running = JobInfo("42", JobState.RUNNING, "squeue", node_list="node7")
    job = Job(Host(running, files=Unreadable()), "42", output="/home/alice/run/slurm-42.out")  # type: ignore[arg-type]
    with pytest.raises(TransportError, match="Permission denied"):
        jsession.wait_for_server(job, JupyterOptions(server_timeout=30), status=lambda _m: None)


def test_a_notebook_that_cannot_be_rendered_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # First landing: the run directory and the token file were written before the template context.
    cluster = Cluster(Profile(name="t", scheduler="local", workdir=str(tmp_path / "runs")))

    def broken(*_args: object) -> dict[str, object]:
        raise ParameterError("root_dir: cannot expand")

    monkeypatch.setattr(jsession, "template_context", broken)
    with pytest.raises(ParameterError, match="cannot expand"):
        cluster.jupyter()
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
