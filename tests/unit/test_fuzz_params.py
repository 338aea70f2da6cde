"""Property-based fuzz of every job parameter through the renderer.

Each value is either refused with a one-line ParameterError, or it renders inert:

- bash accepts the script (``bash -n``) and running it (as sbatch would, ``#SBATCH`` lines being comments to
  bash) succeeds, hands the value verbatim to the command and to ``module``/``conda``/``source`` (stubbed),
  and no canary file appears;
- every ``#SBATCH`` line reads back, through a model of sbatch's own tokenizer (Slurm 22.05
  ``src/sbatch/opt.c: _get_argument``), as exactly the option that was meant, and so it does through the
  ``local`` scheduler's reader.

``setup`` is shell code by design: only its refusal of control characters is checked.
The real-Slurm counterpart is ``tests/cluster/test_fuzz_slurm.py``.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hpclaunch.cluster import Cluster
from hpclaunch.config import Profile
from hpclaunch.errors import ParameterError
from hpclaunch.params import JOB_PARAMS, PARAMS_BY_NAME, reject_control_chars, sbatch_directives
from hpclaunch.slurm.request import sbatch_header_args

CANARY = "CANARY"
FUZZ = settings(
    max_examples=int(os.environ.get("HPCLAUNCH_FUZZ_EXAMPLES", "200")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

#: Pieces that mean something to bash, sbatch, Jinja, Slurm or a terminal.
FRAGMENTS = [
    f"$(touch {CANARY})",
    f"`touch {CANARY}`",
    f"; touch {CANARY}",
    f"| touch {CANARY}",
    f"&& touch {CANARY}",
    f"& touch {CANARY} &",
    f"' ; touch {CANARY} ; '",
    f'" ; touch {CANARY} ; "',
    f'\\"; touch {CANARY}; \\"',
    f"\ntouch {CANARY}\n",
    f"\rtouch {CANARY}",
    f"${{IFS}}touch${{IFS}}{CANARY}",
    f"<(touch {CANARY})",
    f"$'\\x3b' touch {CANARY}",
    "'",
    '"',
    "\\",
    "\\\\",
    "#",
    " #SBATCH --wrap=x",
    "#SBATCH",
    ";",
    "|",
    "&",
    "$",
    "${HOME}",
    "$HOME",
    "~",
    "~/",
    "*",
    "?",
    "[a]",
    "!",
    "!!",
    "{{ 7*7 }}",
    "{% raw %}",
    "%j",
    "%",
    "=",
    ",",
    ":",
    "-",
    "--",
    " ",
    "\t",
    "\x00",
    "\x1b[31m",
    "\x7f",
    "\x85",
    "\u00a0",
    "\u2028",
    "\u3000",
    "é",
    "日本",
    "🚀",
    "\u202e",
    "\udcff",
    "hetjob",
    "packjob",
    "12",
    "0",
    "-1",
    "G",
    "M",
    "h",
    "1-",
    "a100",
    "gpu",
    "/",
    "..",
]

#: The same nasty values for every parameter, always tried (hypothesis adds random ones).
FIXED_VALUES = [
    f"$(touch {CANARY})",
    f"`touch {CANARY}`",
    f"a b; touch {CANARY}",
    f"x' ; touch {CANARY} ; '",
    f'x" ; touch {CANARY} ; "',
    f'a\\"b $(touch {CANARY}) # c',
    f"x\ntouch {CANARY}",
    "name # comment",
    "é 日本 🚀",
    "\\",
    "'",
    '"',
    "#SBATCH --wrap=x",
    "~/venv",
    "16G",
    "2h",
    "3",
    "a100",
    "",
    "   ",
]

text_values = st.one_of(
    st.text(max_size=30),
    st.lists(
        st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=4)),
        min_size=1,
        max_size=6,
    ).map("".join),
)
other_values = st.one_of(
    st.integers(min_value=-5, max_value=10**7),
    st.booleans(),
    st.floats(allow_nan=True),
    st.lists(st.text(max_size=5), max_size=2),
    st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=1),
)
any_values = st.one_of(text_values, text_values, other_values)
option_values = st.one_of(text_values, text_values.map(lambda v: "--comment=" + v))


# --- a model of sbatch's #SBATCH reader (Slurm 22.05, src/sbatch/opt.c) ------------------------------


def sbatch_tokens(rest: str) -> list[str]:
    """Split what follows ``#SBATCH`` as sbatch does: blanks separate, "..." and '...' group, backslash
    escapes the next character (inside quotes too), an unquoted # starts a comment."""
    out: list[str] = []
    data = rest.encode("utf-8")
    i = 0
    while True:
        while i < len(data) and chr(data[i]) in " \t\n\v\f\r":
            i += 1
        if i >= len(data):
            return out
        assert data[i] != ord(":"), f"sbatch: Unexpected `:` in [{rest}]"
        arg = bytearray()
        quote: int | None = None
        escape = False
        while i < len(data) and (quote is not None or chr(data[i]) not in " \t\n\v\f\r"):
            c = data[i]
            if escape:
                escape = False
            elif c == ord("\\"):
                escape = True
                i += 1
                continue
            elif quote is not None:
                if c == quote:
                    quote = None
                    i += 1
                    continue
            elif c in (ord('"'), ord("'")):
                quote = c
                i += 1
                continue
            elif c == ord("#"):
                i = len(data)
                break
            arg += bytes([c])
            i += 1
        assert quote is None, f"sbatch: Unmatched quote in [{rest}]"
        if arg:
            out.append(arg.decode("utf-8"))


def read_header(script: str) -> list[str]:
    """The options sbatch takes from the script: #SBATCH lines up to the first command line."""
    options: list[str] = []
    for line in script.split("\n"):
        if line.startswith("#SBATCH"):
            options += sbatch_tokens(line[len("#SBATCH") :])
        elif line.strip() and not line.lstrip().startswith("#"):
            break
    return options


# --- running a rendered script as the job would ---------------------------------------------------

STUBS = """\
module() { printf 'module:%s\\0' "$@" >> "$HPCLAUNCH_TRACE"; }
conda() { printf 'conda:%s\\0' "$@" >> "$HPCLAUNCH_TRACE"; }
source() { printf 'source:%s\\0' "$@" >> "$HPCLAUNCH_TRACE"; }
"""
MARK = "HPCLAUNCH-ARGV"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with tempfile.TemporaryDirectory(prefix="hpclaunch-fuzz-") as work:
        yield Cluster(Profile(name="fuzz", scheduler="local", workdir=work))


def one_line(err: ParameterError) -> None:
    text = err.one_line()
    assert text and "\n" not in text and "\r" not in text and "\x1b" not in text, repr(text)


def run_inert(script: str, *, argv_value: str | None, trace: str = "") -> None:
    """bash -n, then run it in an empty directory (HOME there too): exit 0, no canary, value intact."""
    with tempfile.TemporaryDirectory(prefix="hpclaunch-fuzz-run-") as tmp:
        path = Path(tmp) / "job.sbatch"
        path.write_text(script, encoding="utf-8")
        (Path(tmp) / "stubs.sh").write_text(STUBS)
        env = {
            "PATH": os.environ["PATH"],
            "HOME": tmp,
            "LANG": "C.UTF-8",
            "BASH_ENV": str(Path(tmp) / "stubs.sh"),
            "HPCLAUNCH_TRACE": str(Path(tmp) / "trace"),
        }
        syntax = subprocess.run(["bash", "-n", str(path)], capture_output=True, timeout=10, check=False)
        assert syntax.returncode == 0, syntax.stderr.decode(errors="replace") + script
        result = subprocess.run(
            ["bash", str(path)], cwd=tmp, env=env, capture_output=True, timeout=20, check=False
        )
        canaries = sorted(str(p) for p in Path(tmp).rglob(f"*{CANARY}*"))
        assert not canaries, f"canary created: {canaries}\n{script}"
        assert result.returncode == 0, result.stderr.decode(errors="replace") + script
        if argv_value is not None:
            assert result.stdout.split(MARK.encode() + b"\0", 1)[1] == argv_value.encode() + b"\0"
        written = (Path(tmp) / "trace").read_bytes().decode() if (Path(tmp) / "trace").exists() else ""
        assert written == trace, script


def command_for(value: Any) -> list[str]:
    """printf hands the value back verbatim (when it can go into a script at all)."""
    return ["printf", "%s\\0", MARK, value]


def printable_text(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    try:
        return reject_control_chars("x", value)
    except ParameterError:
        return None


def check_param(cluster: Cluster, name: str, raw: Any) -> None:
    param = PARAMS_BY_NAME[name]
    params: dict[str, Any] = {name: raw}
    if name == "gpu_type":
        params["gpus"] = 1  # the type shows only with a count
    text = printable_text(raw)
    run_dir = f"/tmp/run dir $(touch {CANARY}) 'x'"
    try:
        expected = param.check(raw)
    except ParameterError as err:
        one_line(err)
        with pytest.raises(ParameterError) as caught:
            cluster.render("run", command=["true"], run_dir=run_dir, **params)
        one_line(caught.value)
        return
    script = cluster.render(
        "run", command=command_for(text) if text is not None else ["true"], run_dir=run_dir, **params
    )

    # sbatch (and the local scheduler) read back exactly the options meant.
    header = read_header(script)
    assert header == sbatch_header_args(script), script
    assert len(header) == sum(line.startswith("#SBATCH") for line in script.split("\n")), script
    job = {**params, name: expected}
    for key in ("output", "error", "venv", "conda_env"):
        if key in job and str(job[key]).startswith("~"):
            job[key] = cluster.transport.expand(job[key])
    for directive in sbatch_directives(job):
        assert directive in header, (directive, header)

    trace = ""
    if name == "modules":
        trace = "".join(f"module:load\0module:{m}\0" for m in expected)
    elif name == "conda_env":
        trace = f"conda:activate\0conda:{job['conda_env']}\0"
    elif name == "venv":
        trace = f"source:{job['venv']}/bin/activate\0"
    run_inert(script, argv_value=text, trace=trace)


FUZZED = [p.name for p in JOB_PARAMS if not p.is_code]


def test_every_parameter_is_fuzzed_or_code() -> None:
    assert {p.name for p in JOB_PARAMS if p.is_code} == {"setup"}, "a new code parameter: fuzz it or justify"
    assert len(FUZZED) == len(JOB_PARAMS) - 1


@pytest.mark.parametrize("name", FUZZED)
@pytest.mark.parametrize("value", FIXED_VALUES, ids=range(len(FIXED_VALUES)))
def test_fixed_nasty_values(cluster: Cluster, name: str, value: str) -> None:
    raw: Any = [value] if PARAMS_BY_NAME[name].multiple else value
    check_param(cluster, name, raw)


@pytest.mark.parametrize("name", FUZZED)
@FUZZ
@given(data=st.data())
def test_fuzz_parameter(cluster: Cluster, name: str, data: st.DataObject) -> None:
    param = PARAMS_BY_NAME[name]
    if param.multiple:
        item = option_values if name == "sbatch_options" else text_values
        raw = data.draw(st.one_of(st.lists(item, max_size=3), item, other_values), label=name)
    else:
        raw = data.draw(any_values, label=name)
    check_param(cluster, name, raw)


@FUZZ
@given(args=st.lists(text_values, min_size=1, max_size=4))
def test_fuzz_command_arguments(cluster: Cluster, args: list[str]) -> None:
    """The run template's command: each argument reaches the program verbatim, or all are refused."""
    run_dir = "/tmp/run"
    if any(printable_text(a) is None for a in args):
        with pytest.raises(ParameterError) as caught:
            cluster.render("run", command=["printf", "%s\\0", *args], run_dir=run_dir)
        one_line(caught.value)
        return
    script = cluster.render("run", command=["printf", "%s\\0", MARK, "".join(args), *args], run_dir=run_dir)
    with tempfile.TemporaryDirectory(prefix="hpclaunch-fuzz-run-") as tmp:
        path = Path(tmp) / "job.sbatch"
        path.write_text(script, encoding="utf-8")
        result = subprocess.run(
            ["bash", str(path)],
            cwd=tmp,
            env={"PATH": os.environ["PATH"], "HOME": tmp},
            capture_output=True,
            timeout=20,
            check=False,
        )
        assert not list(Path(tmp).rglob(f"*{CANARY}*")), script
    assert result.returncode == 0, result.stderr
    got = result.stdout.split(MARK.encode() + b"\0", 1)[1].split(b"\0")[:-1]
    assert got == [a.encode() for a in ["".join(args), *args]]


def test_setup_is_code_but_still_one_line(cluster: Cluster) -> None:
    setup = PARAMS_BY_NAME["setup"]
    assert setup.is_code and setup.multiple
    script = cluster.render("run", command=["true"], run_dir="/tmp/r", setup=["export A='$(x)' # as written"])
    assert "\nexport A='$(x)' # as written\n" in script


@FUZZ
@given(line=text_values)
def test_fuzz_setup_control_characters_refused(cluster: Cluster, line: str) -> None:
    if printable_text(line) is None:
        with pytest.raises(ParameterError) as caught:
            cluster.render("run", command=["true"], run_dir="/tmp/r", setup=["true", line])
        one_line(caught.value)
    else:
        script = cluster.render("run", command=["true"], run_dir="/tmp/r", setup=[line])
        assert f"\n{line}\n" in script  # verbatim: it is the user's shell code
