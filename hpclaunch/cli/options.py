"""Click options built from the one list of job parameters (:data:`hpclaunch.params.JOB_PARAMS`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import click

from ..errors import ParameterError
from ..params import JOB_PARAMS, Param, reject_control_chars

F = TypeVar("F", bound=Callable[..., Any])


def job_options(params: Iterable[Param] = JOB_PARAMS) -> Callable[[F], F]:
    """Add one option per job parameter. Values stay raw text here: validation happens once, in params."""

    def decorate(func: F) -> F:
        for param in reversed(tuple(params)):
            func = click.option(
                param.flag,
                param.name,
                metavar=param.metavar,
                multiple=param.multiple,
                default=None,
                envvar=param.envvar,
                show_envvar=True,
                show_default=False,
                help=param.help
                + (f" [default: {param.default}]" if param.default not in (None, (), 0) else ""),
            )(func)
        return func

    return decorate


def given(values: Mapping[str, Any], params: Iterable[Param] = JOB_PARAMS) -> dict[str, Any]:
    """Only the job parameters the user actually gave (flag or environment variable)."""
    out: dict[str, Any] = {}
    for param in params:
        value = values.get(param.name)
        if value is None or value == ():
            continue
        out[param.name] = list(value) if isinstance(value, tuple) else value
    return out


def set_option(func: F) -> F:
    return click.option(
        "--set",
        "variables",
        metavar="KEY=VALUE",
        multiple=True,
        help="A variable for the template, available as vars.KEY (repeatable).",
    )(func)


def parse_sets(pairs: Iterable[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise ParameterError(f"--set {pair!r}: expected KEY=VALUE with KEY a plain name")
        out[key] = reject_control_chars(f"--set {key}", value)
    return out


def idle_timeout_option(what: str) -> Callable[[F], F]:
    """``--idle-timeout SECONDS`` (0 = never), one environment variable for every command that has it;
    ``what`` says what idle means there."""
    return click.option(
        "--idle-timeout",
        type=click.IntRange(0),
        default=0,
        envvar="HPCLAUNCH_IDLE_TIMEOUT",
        show_envvar=True,
        help=f"{what}; 0 = never.",
    )


def preflight_option(func: F) -> F:
    return click.option(
        "--preflight/--no-preflight",
        default=True,
        envvar="HPCLAUNCH_PREFLIGHT",
        show_envvar=True,
        help="Ask Slurm first (sbatch --test-only and the partition's limits): a request that can never "
        "run is refused at once, a feasible one shows its estimated start.",
    )(func)


def use_preflight(cluster: Any, enabled: bool) -> None:
    """Check every submission of this command first, reporting the estimated start on stderr."""
    from ..console import say

    cluster.preflight = (lambda verdict: say(f"preflight: {verdict.describe()}")) if enabled else None
