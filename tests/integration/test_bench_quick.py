"""``python -m simulations.bench --quick`` on the session broker: the sweep, memory and engine
sections run for real at tiny sizes (numbers not judged), their JSON holds every row with
finite positive numbers, and ``--readme`` rewrites only the README's generated block.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.kafka, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
ROWS = {
    "engine": {"engine.vs_naive", "engine.vs_ceiling"},
    "memory": {"memory.gru2x128.1000", "memory.gru2x256.1000"},
    # 2 workers on 1 partition are skipped
    "sweep": {"sweep.p1.w1", "sweep.p2.w1", "sweep.p2.w2"},
}
README = f"""# A project

Prose before, with a number: 1.38x.

{START}
the old generated block
{END}

Prose after the block.
"""


def _positive(x: object) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


def test_quick_run_writes_every_row_and_only_the_readme_block(
    kafka_broker: str, tmp_path: Path
) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(README)
    out = tmp_path / "perf"
    argv = [
        sys.executable, "-m", "simulations.bench", "--quick", "--only", "sweep,memory,engine",
        "--bootstrap", kafka_broker, "--out", str(out), "--readme", str(readme),
        "--workdir", str(tmp_path / "work"),
    ]  # fmt: skip
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    run = json.loads((out / "bench.json").read_text())
    assert run["quick"] is True and run["schema"] == 1
    assert list(run["sections"]) == ["engine", "memory", "sweep"]  # run order
    machine = run["machine"]
    assert machine["cores"] >= 1 and machine["torch_threads"] >= 1
    assert len(machine["loadavg_start"]) == 3 and len(machine["loadavg_end"]) == 3
    assert machine["versions"]["torch"] and machine["versions"]["aiokafka"]
    for name, want in ROWS.items():
        section = run["sections"][name]
        assert section["error"] is None, section["error"]
        assert section["seconds"] > 0 and len(section["loadavg"]) == 2
        rows = {r["id"]: r for r in section["rows"]}
        assert set(rows) == want, (name, sorted(rows))
        for row in rows.values():
            for key in ("value", "ref_value", "ratio"):
                assert _positive(row[key]), (name, row)
            assert row["ref"] and row["unit"], row
    sweep = run["sections"]["sweep"]
    assert any("2 workers on 1 partition" in n for n in sweep["notes"])
    assert {(g["partitions"], g["workers"]) for g in sweep["data"]["grid"]} == {
        (1, 1), (2, 1), (2, 2),
    }  # fmt: skip
    memory = run["sections"]["memory"]
    assert [t["target"] for t in memory["targets"]] == ["<= 1.25", "<= 1.25"]
    assert len(run["sections"]["engine"]["targets"]) == 2

    report = (out / "bench.md").read_text()
    assert "Quick run" in report and "| sweep |" in report and "](sweep.png)" in report
    for png in ("sweep.png", "memory_per_key.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png

    text = readme.read_text()
    head, rest = text.split(START)
    block, tail = rest.split(END)
    assert head == README.split(START)[0]  # untouched before the block ...
    assert tail == README.split(END)[1]  # ... and after it
    assert "the old generated block" not in block
    assert "| engine |" in block and "| memory |" in block and "| sweep |" in block
    assert "](perf/sweep.png)" in block and "](perf/memory_per_key.png)" in block
