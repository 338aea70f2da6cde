"""``hpclaunch templates``: the templates available to render and submit."""

from __future__ import annotations

import click

from ..render import Renderer
from .context import AppContext


@click.command("templates")
@click.pass_obj
def command(app: AppContext) -> None:
    """List template names, with the file each comes from."""
    renderer = Renderer(app.options.get("template_dir") or _profile_dir(app))
    for name in renderer.names():
        click.echo(f"{name:12s} {renderer.source_of(name)}")


def _profile_dir(app: AppContext) -> str | None:
    return app.cluster().profile.template_dir
