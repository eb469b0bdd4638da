"""The settings table: generated from `Settings`, kept in README.md, printed by the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from stream_rnn.ops.cli import cli
from stream_rnn.ops.exceptions import OpsError
from stream_rnn.ops.settings import Settings
from stream_rnn.ops.settings_doc import (
    END,
    README,
    REGENERATE,
    START,
    env_name,
    main,
    replace_table,
    settings_table,
)


def test_readme_holds_the_generated_table() -> None:
    text = README.read_text(encoding="utf-8")
    assert START in text and END in text, f"README.md lacks the {START} / {END} markers"
    current = text[text.index(START) + len(START) : text.index(END)].strip()
    assert current == settings_table().strip(), (
        f"README.md's settings table differs from stream_rnn/ops/settings.py; regenerate it "
        f"with `{REGENERATE}`"
    )


def test_every_setting_has_one_row_with_a_description() -> None:
    rows = [line for line in settings_table().splitlines() if line.startswith("| `STREAM_RNN_")]
    assert len(rows) == len(Settings.model_fields)
    for name, info in Settings.model_fields.items():
        assert info.description, f"Settings.{name} needs a description for the table"
        row = next(r for r in rows if r.startswith(f"| `{env_name(name)}` |"))
        assert row.count(" | ") == 3, f"a stray pipe in the row of {name}: {row}"


def test_the_table_is_the_same_on_every_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    table = settings_table()
    assert str(Path.home()) not in table.replace("~", "")
    assert "`~/.local/state/stream-rnn/kafka`" in table  # the home directory, spelled portably
    assert "`$TMPDIR/stream-rnn-worker`" in table
    # the process's own environment never leaks into the reference table
    monkeypatch.setenv("STREAM_RNN_DEVICE", "cuda:3")
    assert settings_table() == table


def test_types_constraints_and_defaults_are_readable() -> None:
    lines = [line.split(" | ") for line in settings_table().splitlines() if line.startswith("| `")]
    rows = {cells[0].strip("| `"): cells for cells in lines}
    assert rows["STREAM_RNN_SESSION_TIMEOUT_S"][1:3] == ["float ≥ 6, ≤ 300", "`10.0`"]
    assert rows["STREAM_RNN_SWAP_POLICY"][1:3] == ["`keep`, `reset`, `rewarm` or unset", "*unset*"]
    assert rows["STREAM_RNN_RUNNING_ESTIMATE"][1:3] == ["bool", "`false`"]
    assert "\\<unk>" in rows["STREAM_RNN_UNKNOWN_TOKEN"][3]  # not swallowed as an HTML tag


def test_replace_table_rewrites_only_between_the_markers() -> None:
    text = f"# title\n\nintro\n\n{START}\nold table\n{END}\n\nafter\n"
    once = replace_table(text, "| new |")
    assert once == f"# title\n\nintro\n\n{START}\n| new |\n{END}\n\nafter\n"
    assert replace_table(once, "| new |") == once
    for broken in ("no markers", f"{END}\n{START}", f"{START}\n{START}\n{END}"):
        with pytest.raises(OpsError, match="settings table belongs"):
            replace_table(broken, "| new |")


def test_module_regenerates_and_checks_a_readme(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{START}\nstale\n{END}\n", encoding="utf-8")
    assert main(["--check", str(readme)]) == 1
    assert "stale" in readme.read_text(encoding="utf-8")
    assert main([str(readme)]) == 0
    assert settings_table() in readme.read_text(encoding="utf-8")
    assert main(["--check", str(readme)]) == 0
    assert main(["--check", str(tmp_path / "missing.md")]) == 2


def test_cli_prints_the_table_and_the_effective_values() -> None:
    runner = CliRunner()
    reference = runner.invoke(cli, ["settings"])
    assert reference.exit_code == 0, reference.output
    assert reference.output.strip() == settings_table().strip()
    effective = runner.invoke(
        cli,
        ["settings", "--effective"],
        env={"STREAM_RNN_GROUP": "g-from-env", "STREAM_RNN_DEVICE": None},
    )
    assert effective.exit_code == 0, effective.output
    assert "| `STREAM_RNN_GROUP` | `g-from-env` | environment |" in effective.output
    assert "| `STREAM_RNN_DEVICE` | `cpu` | default |" in effective.output
