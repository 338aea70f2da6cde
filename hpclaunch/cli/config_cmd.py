"""``hpclaunch config``: where the config files live and what a profile resolves to."""

from __future__ import annotations

import json
import textwrap
from typing import Any

import click

from .. import config as config_mod
from .context import AppContext


@click.group("config")
def command() -> None:
    """Inspect the configuration."""


SITE_HELP = (
    "An admin sets defaults for everyone in {site}: the same [clusters.NAME] sections and `default` as a "
    "user's file, readable by all, writable only by root. A user's own file ({user}) takes "
    "precedence, key by key within a profile of the same name; flags and HPCLAUNCH_* variables take "
    "precedence over both. {env} names another site file (empty: none)."
)


@command.command(
    "show",
    epilog="""\b
Site-wide defaults (for admins): write /etc/hpclaunch/config.toml, e.g.
  default = "cluster"
  [clusters.cluster]
  partition = "gpu"
  modules = ["cuda/12.4", "jupyterlab"]
A user's own file overrides it key by key; HPCLAUNCH_SITE_CONFIG names another file (empty: none).
""",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def show(app: AppContext, as_json: bool) -> None:
    """Print the resolved profile (flags and environment variables applied) and the files read."""
    profile = app.cluster().profile
    config = app.config()
    site = config.site_path
    data: dict[str, Any] = {
        "profile": profile.name,
        "source": profile.source,
        "files_read": [str(p) for p in config.files_read],
        "site_config": str(site) if site else None,
        "user_config": str(config.path),
        **profile.as_dict(),
        **_connection(app),
    }
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"# files read: {', '.join(data['files_read']) or 'none'}")
    help_text = SITE_HELP.format(
        site=site or "a site file (none: HPCLAUNCH_SITE_CONFIG is empty)",
        user=config.path,
        env=config_mod.SITE_CONFIG_ENV,
    )
    click.echo("\n".join("# " + line for line in textwrap.wrap(help_text, 100)))
    click.echo(f"# profile {profile.name!r} from {profile.source}")
    for key in ("client", "session"):
        if data.get(key):
            click.echo(f"# {key}: {data[key]}")
    for key, value in data.items():
        if key in (
            "profile",
            "source",
            "files_read",
            "site_config",
            "user_config",
            "client",
            "session",
        ) or value in (
            None,
            (),
            [],
        ):
            continue
        click.echo(f"{key} = {json.dumps(value)}")


def _connection(app: AppContext) -> dict[str, str]:
    """Which SSH client the profile gets here and why, and the state of its kept connection."""
    from ..transport.choice import choose
    from .connect import session_state

    cluster = app.cluster()
    profile = cluster.profile
    if not profile.host:
        return {}
    chosen = choose(profile.transport.value)
    return {
        "client": f"{chosen.name} ({chosen.why})",
        "session": session_state(cluster.transport, profile.session_idle),
    }


@command.command("path")
@click.option("--site", is_flag=True, help="The site-wide file instead of yours.")
@click.pass_obj
def path(app: AppContext, site: bool) -> None:
    """Print the config file's path (whether or not it exists)."""
    if site:
        click.echo(str(config_mod.site_config_path() or ""))
        return
    chosen = app.options.get("config_path")
    click.echo(str(config_mod.default_config_path() if not chosen else chosen))
