"""Render Slurm job scripts from Jinja templates.

Templates live in the top-level ``templates/`` directory (shipped in the wheel) and in an optional
user directory that overrides or adds templates. Rendering is strict: an undefined variable is an
error, every value written into shell goes through the ``q`` filter, and every value written into an
``#SBATCH`` line through the ``sbatch`` filter.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ParameterError, TemplateError
from .params import reject_control_chars

if TYPE_CHECKING:
    import jinja2

TEMPLATE_SUFFIX = ".sbatch.j2"
_PACKAGE_DIR = Path(__file__).resolve().parent


def data_dir(kind: str) -> Path:
    """``templates`` or ``jobs``: inside the installed wheel, or at the top of a source checkout."""
    installed = _PACKAGE_DIR / "_data" / kind
    if installed.is_dir():
        return installed
    return _PACKAGE_DIR.parent / kind


def shell_quote(value: Any) -> str:
    """Quote one value for bash; refuse control characters, which quoting cannot make safe."""
    text = reject_control_chars("template value", _scalar(value))
    return shlex.quote(text)


_SBATCH_PLAIN = re.compile(r"^[A-Za-z0-9_./%:@=,+\-\[\]|&!*()]+$")


def sbatch_quote(value: Any) -> str:
    """Quote a value for an ``#SBATCH`` line, which sbatch (not bash) tokenises.

    sbatch splits on blanks outside double quotes, drops the quotes, and treats backslash as an escape.
    """
    text = reject_control_chars("#SBATCH value", _scalar(value))
    if _SBATCH_PLAIN.match(text):
        return text
    return '"' + re.sub(r'(["\\])', r"\\\1", text) + '"'


def _scalar(value: Any) -> str:
    if type(value).__name__.endswith("Undefined"):
        str(value)  # a StrictUndefined raises its own clear UndefinedError here
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ParameterError(f"cannot write {type(value).__name__} {value!r} into a job script")


def _shell_join(values: Sequence[Any]) -> str:
    return " ".join(shell_quote(v) for v in values)


class Renderer:
    """A Jinja environment over the user's template directory (first) and the built-in one."""

    def __init__(self, user_dir: str | os.PathLike[str] | None = None) -> None:
        self.dirs: list[Path] = []
        if user_dir:
            path = Path(user_dir).expanduser()
            if not path.is_dir():
                raise TemplateError(
                    f"template directory {path} does not exist",
                    hint="fix template_dir in your profile or --template-dir",
                )
            self.dirs.append(path)
        self.dirs.append(data_dir("templates"))
        self._env: jinja2.Environment | None = None

    @property
    def env(self) -> jinja2.Environment:
        if self._env is None:
            import jinja2  # late: keeps `hpclaunch --help` fast

            env = jinja2.Environment(
                loader=jinja2.FileSystemLoader([str(d) for d in self.dirs]),
                undefined=jinja2.StrictUndefined,
                autoescape=False,  # noqa: S701 - renders shell scripts, not HTML; values go through |q
                keep_trailing_newline=True,
                trim_blocks=True,
                lstrip_blocks=True,
            )
            env.filters["q"] = shell_quote
            env.filters["sbatch"] = sbatch_quote
            env.filters["shell_join"] = _shell_join
            self._env = env
        return self._env

    def names(self) -> list[str]:
        """Template names a user can ask for (files not starting with ``_``)."""
        found: set[str] = set()
        for directory in self.dirs:
            for path in directory.glob("*" + TEMPLATE_SUFFIX):
                if not path.name.startswith("_"):
                    found.add(path.name[: -len(TEMPLATE_SUFFIX)])
        return sorted(found)

    def source_of(self, name: str) -> Path:
        filename = self._filename(name)
        for directory in self.dirs:
            if (directory / filename).is_file():
                return directory / filename
        raise TemplateError(
            f"unknown template {name!r}",
            hint="available: " + ", ".join(self.names()),
        )

    def uses(self, name: str, variable: str) -> bool:
        """Whether template ``name`` itself (not what it extends) reads ``variable``."""
        import jinja2
        from jinja2 import meta

        source = self.source_of(name).read_text(encoding="utf-8")
        try:
            return variable in meta.find_undeclared_variables(self.env.parse(source))
        except jinja2.TemplateSyntaxError:
            return True  # render() reports the syntax error with its line

    def render(self, name: str, context: Mapping[str, Any]) -> str:
        import jinja2

        self.source_of(name)  # a clear error for an unknown name
        try:
            template = self.env.get_template(self._filename(name))
            text = template.render(**context)
        except ParameterError:
            raise
        except jinja2.UndefinedError as err:
            raise TemplateError(
                f"template {name!r} uses an undefined variable: {err.message}",
                hint="pass it with --set KEY=VALUE",
            ) from None
        except jinja2.TemplateSyntaxError as err:
            raise TemplateError(
                f"template {err.filename or name}: line {err.lineno}: {err.message}"
            ) from None
        except jinja2.TemplateError as err:
            raise TemplateError(f"template {name!r}: {err}") from None
        return text

    @staticmethod
    def _filename(name: str) -> str:
        if "/" in name or "\\" in name or name.startswith("."):
            raise TemplateError(f"template name {name!r} must be a bare name such as 'run' or 'jupyter'")
        return name if name.endswith(TEMPLATE_SUFFIX) else name + TEMPLATE_SUFFIX
