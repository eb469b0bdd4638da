"""The run's plots (PNG): the scale sweep, memory per key, and broker_bench's latency curve.

Each is drawn only when its section has data; `write_plots` returns the files it wrote by
name (``sweep``, ``memory``, ``latency``), for the report to link.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after the backend is chosen

from simulations.bench.results import BenchRun, Section  # noqa: E402

FILES = {"sweep": "sweep.png", "memory": "memory_per_key.png", "latency": "latency_curve.png"}


def plot_sweep(section: Section, path: Path) -> None:
    """Drain rate by partitions, one line per worker count; the pipe dashed."""
    grid: list[dict[str, Any]] = section.data["grid"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for workers in sorted({g["workers"] for g in grid}):
        points = sorted((g["partitions"], g["rate"]) for g in grid if g["workers"] == workers)
        ax.plot(*zip(*points, strict=True), "o-",
                label=f"{workers} worker{'s' if workers > 1 else ''}")  # fmt: skip
    pipe = sorted((int(p), r) for p, r in section.data.get("pipe", {}).items())
    if pipe:
        ax.plot(*zip(*pipe, strict=True), "k--", label="pass-through pipe (1 process)")
    ax.set_xscale("log", base=2)
    parts = sorted({g["partitions"] for g in grid})
    ax.set_xticks(parts, [str(p) for p in parts])
    ax.set_xlabel("partitions of the tokens topic")
    ax.set_ylabel("tokens/s (drain of a backlog)")
    ax.set_ylim(bottom=0)
    ax.set_title("exactly-once workers of one group, GRU 2x128, per-token events")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_memory(section: Section, path: Path) -> None:
    """Resident bytes per key by keys, one line per model; raw sizes dotted, target dashed."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curve in section.data["curves"].items():
        keys = [p["keys"] for p in curve]
        (line,) = ax.plot(keys, [p["bytes_per_key"] for p in curve], "o-", label=name)
        raw = curve[0]["raw_per_key"]
        ax.axhline(raw, color=line.get_color(), linestyle=":", linewidth=1,
                   label=f"raw state {raw} B")  # fmt: skip
        ax.axhline(raw * 1.25, color=line.get_color(), linestyle="--", linewidth=0.8,
                   label=f"target 1.25x raw ({raw * 1.25:.0f} B)")  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("resident keys")
    ax.set_ylabel("resident bytes per key")
    ax.set_title("state pool memory per key (float16 states)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(run: BenchRun, out: Path) -> dict[str, Path]:
    """Every plot the run has data for, into ``out``; {name: file}."""
    written: dict[str, Path] = {}
    sweep, memory = run.sections.get("sweep"), run.sections.get("memory")
    if sweep is not None and sweep.data.get("grid"):
        plot_sweep(sweep, out / FILES["sweep"])
        written["sweep"] = out / FILES["sweep"]
    if memory is not None and memory.data.get("curves"):
        plot_memory(memory, out / FILES["memory"])
        written["memory"] = out / FILES["memory"]
    broker = run.sections.get("broker")
    if broker is not None and broker.data.get("results", {}).get("curve"):
        from simulations.broker_bench import plot_curve  # noqa: PLC0415 - only with a curve

        plot_curve(broker.data["results"], out / FILES["latency"])
        written["latency"] = out / FILES["latency"]
    return written
