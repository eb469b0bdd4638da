"""The settings table: every ``STREAM_RNN_*`` variable with its type, default and meaning.

Generated from `Settings.model_fields`, so that README.md, ``stream-rnn settings`` and the
deployment files cannot drift from the code. ``python -m stream_rnn.ops.settings_doc``
rewrites the table in README.md between the marker comments; ``--check`` only compares
(exit status 1 when the table is stale), as ``tests/unit/test_settings_doc.py`` does.

Example::

    print(settings_table())                      # Markdown
    python -m stream_rnn.ops.settings_doc        # README.md's table, regenerated
    stream-rnn settings --effective              # what this process would use, and from where
"""

from __future__ import annotations

import enum
import sys
import tempfile
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import annotated_types
import click
from pydantic.fields import FieldInfo

from stream_rnn.ops.exceptions import OpsError
from stream_rnn.ops.settings import Settings

__all__ = [
    "START",
    "END",
    "REGENERATE",
    "env_name",
    "env_names",
    "settings_table",
    "replace_table",
    "settings_cmd",
]

START = "<!-- settings-table:start -->"
END = "<!-- settings-table:end -->"
REGENERATE = ".venv/bin/python -m stream_rnn.ops.settings_doc"
README = Path(__file__).resolve().parents[2] / "README.md"
NOTE = (
    "`~` is the home directory and `$TMPDIR` the system temporary directory (`/tmp` when "
    "unset) of the process. Booleans take `true`/`false` or `1`/`0`; *unset*: leave the variable "
    "out."
)


def env_name(field: str) -> str:
    """``device`` -> ``STREAM_RNN_DEVICE``."""
    return f"{Settings.model_config.get('env_prefix', '')}{field}".upper()


def env_names() -> dict[str, str]:
    """Every settings variable, mapped to its field name."""
    return {env_name(name): name for name in Settings.model_fields}


def _type(info: FieldInfo) -> str:
    annotation = info.annotation
    optional = False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        annotation = args[0] if len(args) == 1 else annotation
    if typing.get_origin(annotation) is typing.Literal:
        text = ", ".join(f"`{choice}`" for choice in typing.get_args(annotation))
    elif isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        text = ", ".join(f"`{member.value}`" for member in annotation)
    elif annotation is Path:
        text = "path"
    elif isinstance(annotation, type):
        text = annotation.__name__
    else:
        text = str(annotation)
    bounds = (
        (annotated_types.Ge, "ge", "≥"),
        (annotated_types.Gt, "gt", ">"),
        (annotated_types.Le, "le", "≤"),
        (annotated_types.Lt, "lt", "<"),
    )
    limits = [
        f"{sign} {_number(getattr(constraint, attribute))}"
        for constraint in info.metadata
        for kind, attribute, sign in bounds
        if isinstance(constraint, kind)
    ]
    if limits:
        text += " " + ", ".join(limits)
    return text + (" or unset" if optional else "")


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _portable(path: Path) -> str:
    """The default as every machine would show it: no home or temp directory of this one."""
    for base, shown in ((Path(tempfile.gettempdir()), "$TMPDIR"), (Path.home(), "~")):
        if path == base or base in path.parents:
            return f"{shown}/{path.relative_to(base).as_posix()}".rstrip("/")
    return path.as_posix()


def _default(value: Any) -> str:
    if value is None:
        return "*unset*"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, Path):
        return f"`{_portable(value)}`"
    if isinstance(value, enum.Enum):
        value = value.value
    return f"`{value}`"


def _cell(text: str) -> str:
    # GitHub tables: a pipe ends the cell; `<unk>` would be swallowed as an HTML tag
    return " ".join(text.split()).replace("|", "\\|").replace("<", "\\<")


def settings_table() -> str:
    """The Markdown table of every setting (variable, type, default, description) and a note."""
    lines = ["| variable | type | default | description |", "|---|---|---|---|"]
    for name, info in Settings.model_fields.items():
        default = info.get_default(call_default_factory=True)
        cells = (
            f"`{env_name(name)}`",
            _type(info),
            _default(default),
            _cell(info.description or ""),
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", NOTE])


def replace_table(text: str, table: str) -> str:
    """``text`` with everything between the START and END markers replaced by ``table``."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < 0 or end < start or text.count(START) != 1 or text.count(END) != 1:
        raise OpsError(
            f"expected one {START} line followed by one {END} line in the README; "
            "put them where the settings table belongs"
        )
    return text[: start + len(START)] + "\n" + table + "\n" + text[end:]


def _effective(settings: Settings) -> str:
    lines = ["| variable | value | from |", "|---|---|---|"]
    for name in Settings.model_fields:
        value = getattr(settings, name)
        shown = f"`{value}`" if isinstance(value, Path) else _default(value)  # this machine's
        source = "environment" if name in settings.model_fields_set else "default"
        lines.append(f"| `{env_name(name)}` | {shown} | {source} |")
    return "\n".join(lines)


@click.command("settings")
@click.option(
    "--effective",
    is_flag=True,
    help="the values this process would use (environment or default) instead of the reference",
)
def settings_cmd(effective: bool) -> None:
    """Every STREAM_RNN_* setting as a Markdown table: type, default and meaning.

    Flags of a command override these. With --effective: the value each one has in this
    environment (e.g. `kubectl exec POD -- stream-rnn settings --effective`).
    """
    # read now, not get_settings()'s cached copy: what a process started here would use
    click.echo(_effective(Settings()) if effective else settings_table())


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m stream_rnn.ops.settings_doc [--check] [README]``: regenerate or compare."""
    args = list(sys.argv[1:] if argv is None else argv)
    check = "--check" in args
    paths = [a for a in args if a != "--check"]
    if len(paths) > 1 or any(p.startswith("-") for p in paths):
        print("usage: python -m stream_rnn.ops.settings_doc [--check] [README.md]", file=sys.stderr)
        return 2
    readme = Path(paths[0]) if paths else README
    try:
        text = readme.read_text(encoding="utf-8")
        updated = replace_table(text, settings_table())
    except (OSError, OpsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if updated == text:
        print(f"{readme}: the settings table is up to date")
        return 0
    if check:
        print(f"{readme}: the settings table is stale; regenerate it with `{REGENERATE}`")
        return 1
    readme.write_text(updated, encoding="utf-8")
    print(f"{readme}: settings table rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
