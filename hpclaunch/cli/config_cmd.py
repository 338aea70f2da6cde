"""``hpclaunch config``: where the config lives and what a profile resolves to."""

from __future__ import annotations

import json
from typing import Any

import click

from .. import config as config_mod
from .context import AppContext


@click.group("config")
def command() -> None:
    """Inspect the configuration."""


@command.command("show")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def show(app: AppContext, as_json: bool) -> None:
    """Print the resolved profile (flags and environment variables applied)."""
    profile = app.cluster().profile
    data: dict[str, Any] = {"profile": profile.name, "source": profile.source, **profile.as_dict()}
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"# profile {profile.name!r} from {profile.source}")
    for key, value in data.items():
        if key in ("profile", "source") or value in (None, (), []):
            continue
        click.echo(f"{key} = {json.dumps(value)}")


@command.command("path")
@click.pass_obj
def path(app: AppContext) -> None:
    """Print the config file's path (whether or not it exists)."""
    chosen = app.options.get("config_path")
    click.echo(str(config_mod.default_config_path() if not chosen else chosen))
