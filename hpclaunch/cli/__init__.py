"""The ``hpclaunch`` command: a lazy click group, one module per command.

Only click and the standard library are imported here, so ``hpclaunch --help`` stays fast;
each command imports what it needs when it runs.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
import warnings
from typing import Any, NoReturn

import click

from ..console import interrupt_once
from ..errors import HpclaunchError, HpclaunchWarning, Interrupted
from .context import AppContext

_COMMANDS: dict[str, tuple[str, str]] = {
    "render": ("render", "Print the job script a template renders to; submit nothing."),
    "submit": ("submit", "Submit a template or your own job script."),
    "check": ("check", "Would a request run, and when? Queues nothing."),
    "status": ("status", "Show the state of jobs (a table, or --json)."),
    "logs": ("logs", "Print a job's output; -f follows it while the job runs."),
    "cancel": ("cancel", "Cancel jobs."),
    "config": ("config_cmd", "Show the resolved profile and where the config file lives."),
    "templates": ("templates", "List the templates you can render and submit."),
    "jupyter": ("jupyter", "Start JupyterLab on a compute node and tunnel to it."),
    "attach": ("jupyter:attach", "Reopen the tunnel to a running notebook."),
    "sessions": ("sessions", "List your running notebooks and VS Code allocations."),
    "stop": ("sessions:stop", "End running notebooks or kept VS Code allocations."),
    "train": ("train", "Run a bundled training job or your own script on the allocated GPUs."),
    "fetch": ("train:fetch", "Copy a training run's metrics, plot and checkpoint back."),
    "clean": ("clean", "Remove the run directories of finished jobs (home quotas)."),
    "forward": ("forward", "Tunnel local ports to ports on a running job's node."),
    "shell": ("shell", "A shell, or a command, inside a running job."),
    "ssh-config": ("ssh_config", "Let ssh and VS Code reach a running job's node (Host hpclaunch-JOB)."),
    "code": ("code", "VS Code on a compute node: hold an allocation, reach it as Host hpclaunch-JOB."),
    "proxy": ("ssh_config:proxy", "The ProxyCommand of an ssh-config entry (relays to the job's sshd)."),
    "connect": ("connect", "Log in once (answering MFA) and keep the connection for later commands."),
    "disconnect": ("connect:disconnect", "End the connection kept for the profile."),
}


class LazyGroup(click.Group):
    """Imports a command's module only when that command runs or shows its help."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        entry = _COMMANDS.get(name)
        if entry is None:
            return None
        module_name, _, attr = entry[0].partition(":")
        module = importlib.import_module(f"{__name__}.{module_name}")
        command: click.Command = getattr(module, attr or "command")
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Short help from the table above, so listing commands imports none of them.
        rows = [(name, help_) for name, (_, help_) in sorted(_COMMANDS.items())]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(
    cls=LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"], "show_default": True},
    epilog="""\b
Examples:
  hpclaunch render run -- python train.py        # see the script, submit nothing
  hpclaunch submit run --gpus 1 --time 2h -- python train.py
  hpclaunch status --json
  hpclaunch logs -f 1234
  hpclaunch -p mycluster config show

Shell completion (bash): eval "$(_HPCLAUNCH_COMPLETE=bash_source hpclaunch)"
""",
)
@click.option(
    "-p", "--profile", envvar="HPCLAUNCH_PROFILE", show_envvar=True, help="Profile from the config file."
)
@click.option(
    "--config",
    "config_path",
    envvar="HPCLAUNCH_CONFIG",
    show_envvar=True,
    type=click.Path(dir_okay=False),
    help="Your config file (default: config.toml in the hpclaunch app directory); read after the site's "
    "/etc/hpclaunch/config.toml (HPCLAUNCH_SITE_CONFIG), which it overrides.",
)
@click.option(
    "--host",
    envvar="HPCLAUNCH_HOST",
    show_envvar=True,
    help="SSH host of the login node (an alias from ~/.ssh/config works).",
)
@click.option("--user", envvar="HPCLAUNCH_USER", show_envvar=True, help="SSH user name.")
@click.option("--port", envvar="HPCLAUNCH_PORT", show_envvar=True, type=int, help="SSH port.")
@click.option(
    "--template-dir",
    envvar="HPCLAUNCH_TEMPLATE_DIR",
    show_envvar=True,
    type=click.Path(file_okay=False),
    help="Directory whose templates override or add to the built-in ones.",
)
@click.option(
    "--transport",
    envvar="HPCLAUNCH_TRANSPORT",
    show_envvar=True,
    type=click.Choice(["auto", "openssh", "paramiko"]),
    default=None,
    help="SSH client: the system OpenSSH with a ControlMaster, or paramiko; auto = OpenSSH where its "
    "ssh supports ControlMaster (not Windows) [default: the profile's transport, else auto].",
)
@click.option(
    "--accept-new-host-key",
    is_flag=True,
    default=None,
    envvar="HPCLAUNCH_ACCEPT_NEW_HOST_KEY",
    show_envvar=True,
    help="Trust and record an unknown SSH host key (a changed key is always refused).",
)
@click.option("--debug", is_flag=True, envvar="HPCLAUNCH_DEBUG", show_envvar=True, help="Show tracebacks.")
@click.version_option(package_name="hpclaunch")
@click.pass_context
def cli(ctx: click.Context, /, debug: bool, **options: Any) -> None:
    """Launch JupyterLab and GPU training jobs on a Slurm cluster, from a login node or a laptop."""
    app = AppContext(debug=debug, **options)
    ctx.obj = app
    ctx.call_on_close(app.close)


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """Our warnings as one ``hpclaunch: warning: ...`` line; others the standard way."""
    if issubclass(category, HpclaunchWarning):
        sys.stderr.write(f"hpclaunch: warning: {' '.join(str(message).split())}\n")
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def debug_requested(args: list[str]) -> bool:
    """Whether ``--debug`` is one of hpclaunch's own options: they come before the command's name,
    so a ``--debug`` after it (or after ``--``, meant for the job) is not ours."""
    takes_value = {
        "-p",
        "--profile",
        "--config",
        "--host",
        "--user",
        "--port",
        "--template-dir",
        "--transport",
    }
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--debug":
            return True
        elif arg == "--" or arg in _COMMANDS:
            return False
        else:
            skip = arg in takes_value
    return False


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the CLI and turns errors into one line and an exit code."""
    with warnings.catch_warnings(), interrupt_once():
        warnings.simplefilter("once", HpclaunchWarning)  # once per run, wherever it comes from
        warnings.showwarning = _show_warning
        _main(argv)


def _interrupted(interrupt: BaseException | None) -> NoReturn:
    """Exit 130, saying what was cleaned up on the way out where that is known."""
    done = f"; {interrupt.done}" if isinstance(interrupt, Interrupted) else ""
    sys.stderr.write(f"\nhpclaunch: interrupted{done}\n")
    sys.exit(130)


def _main(argv: list[str] | None) -> None:
    args = sys.argv[1:] if argv is None else argv
    debug = debug_requested(args) or os.environ.get("HPCLAUNCH_DEBUG", "") not in ("", "0")
    prog = "hpclaunch"
    try:
        code = cli.main(args=args, prog_name=prog, standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except click.Abort as abort:  # click's form of a KeyboardInterrupt in a command
        _interrupted(abort.__cause__)
    except click.exceptions.NoArgsIsHelpError as err:  # bare `hpclaunch`: help is the answer, not an error
        click.echo(err.ctx.get_help())
    except click.ClickException as err:
        if debug:
            traceback.print_exc()
        where = err.ctx.command_path if isinstance(err, click.UsageError) and err.ctx else prog
        sys.stderr.write(f"{where}: error: {err.format_message()} (see '{where} --help')\n")
        sys.exit(err.exit_code)
    except HpclaunchError as err:
        if debug:
            traceback.print_exc()
        sys.stderr.write(f"hpclaunch: error: {err.one_line()}\n")
        if err.details:
            sys.stderr.write(err.details.rstrip("\n") + "\n")
        sys.exit(err.exit_code)
    except KeyboardInterrupt as interrupt:
        _interrupted(interrupt)
    except BrokenPipeError:
        sys.exit(0)
