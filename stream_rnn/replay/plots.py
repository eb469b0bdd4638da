"""The report's PNG plots (matplotlib, Agg): latency CDF, throughput and quality over time.

Over-time plots mark ``(time, label)`` events (model swaps, injected faults) with a dashed
vertical line and the label along it.

Example::

    latency_cdf(Path("out/latency_cdf.png"), [0.002, 0.004, 0.009])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed (and none on a server)

import matplotlib.pyplot as plt  # noqa: E402 - after the backend choice
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402

Markers = Sequence[tuple[float, str]]
_SIZE = (9.0, 4.2)
_DPI = 110
_NICE = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0)


def bin_width(duration: float, bins: int = 60) -> float:
    """A round bin width giving about ``bins`` bins over ``duration`` seconds."""
    want = max(duration, 1e-3) / bins
    return next((w for w in _NICE if w >= want), _NICE[-1])


def rate_series(
    times: Sequence[float], weights: Sequence[float] | None, width: float, end: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per-second rate of ``times`` (weighted) in bins of ``width`` up to ``end``: (bin edges,
    rates); the last, partial bin is divided by the time it covers."""
    edges = np.arange(0.0, max(end, width) + width, width)
    edges[-1] = max(end, edges[-2] + 1e-9)
    counts, _ = np.histogram(np.asarray(times, dtype=float), bins=edges, weights=weights)
    return edges, counts / np.diff(edges)


def _mark(ax: Axes, markers: Markers) -> None:
    top = ax.get_ylim()[1]
    for t, label in markers:
        ax.axvline(t, color="tab:red", linestyle="--", linewidth=1.0, alpha=0.8)
        ax.text(t, top, f"{label} ", rotation=90, va="top", ha="right", fontsize=8,
                color="tab:red", bbox={"facecolor": "white", "alpha": 0.75, "edgecolor": "none",
                                       "pad": 1})  # fmt: skip


def _legend_below(ax: Axes) -> None:
    """The legend under the plot, where no marker label or data can hide behind it."""
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=2, fontsize=8, frameon=False)


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return path


def latency_cdf(
    path: Path, latencies: Sequence[float], worker: Sequence[float] | None = None
) -> Path:
    """CDF of prediction latencies (milliseconds, log axis) with p50/p95/p99 marked."""
    fig, ax = plt.subplots(figsize=_SIZE)
    curves = [("scheduled time → answer (the p50 / p95 / p99 lines)", latencies)]
    if worker:
        curves.append(("scheduled time → worker emit (latency_s)", worker))
    for (label, values), color in zip(curves, ("tab:blue", "tab:green"), strict=False):
        ms = np.sort(np.maximum(np.asarray(values, dtype=float) * 1000.0, 1e-3))
        if not len(ms):
            continue
        ax.step(ms, np.arange(1, len(ms) + 1) / len(ms), where="post", label=label, color=color)
    main = np.sort(np.asarray(latencies, dtype=float) * 1000.0)
    if len(main):
        for q, style in ((50, ":"), (95, "--"), (99, "-.")):
            v = max(float(np.percentile(main, q)), 1e-3)
            ax.axvline(v, color="grey", linestyle=style, linewidth=1)
            ax.text(v, 0.02, f" p{q} {v:.3g} ms", rotation=90, fontsize=8, va="bottom",
                    ha="right", color="dimgrey")  # fmt: skip
        ax.set_xscale("log")
    ax.set_xlabel("latency (ms, log scale)")
    ax.set_ylabel("fraction of predictions ≤ x")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"Latency CDF ({len(main):,} predictions)")
    ax.grid(True, which="both", alpha=0.3)
    _legend_below(ax)
    return _save(fig, path)


def throughput(
    path: Path,
    *,
    offered: Sequence[float],
    offered_label: str = "tokens sent / s (schedule)",
    processed: Sequence[tuple[float, int]],
    answered: Sequence[float],
    end: float,
    markers: Markers = (),
) -> Path:
    """Tokens sent per second against tokens processed (in process), or messages sent per
    second against answers per second (through Kafka: the stream shows only the answers)."""
    width = bin_width(end)
    fig, ax = plt.subplots(figsize=_SIZE)
    edges, rates = rate_series(offered, None, width, end)
    ax.stairs(rates, edges, label=offered_label, color="tab:orange",
              linewidth=2.5, alpha=0.6)  # fmt: skip
    if processed:
        times, counts = [t for t, _ in processed], [n for _, n in processed]
        edges, rates = rate_series(times, counts, width, end)
        ax.stairs(rates, edges, label="tokens processed / s (engine)", color="tab:blue")
    else:
        edges, rates = rate_series(answered, None, width, end)
        ax.stairs(rates, edges, label="answers / s (predictions + dead letters)", color="tab:blue")
    ax.set_xlabel(f"time since the start (s; bins of {width:g} s)")
    ax.set_ylabel("per second")
    ax.set_title("Throughput over time")
    ax.set_xlim(0, max(end, width))
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    _legend_below(ax)
    _mark(ax, markers)
    return _save(fig, path)


def quality_over_time(
    path: Path,
    points: Sequence[tuple[float, bool, float | None]],
    *,
    end: float,
    task: str,
    markers: Markers = (),
) -> Path:
    """Accuracy (and perplexity, when known) per time bin, against the recorded truth."""
    with_ppl = any(nll is not None for _, _, nll in points)
    rows = 2 if with_ppl else 1
    fig, axes = plt.subplots(rows, 1, figsize=(_SIZE[0], 2.6 * rows + 0.6), sharex=True)
    axs = list(np.atleast_1d(axes))
    width = bin_width(end, 30)
    times = np.asarray([t for t, _, _ in points], dtype=float)
    edges = np.arange(0.0, max(end, width) + width, width)
    n, _ = np.histogram(times, bins=edges)
    hits, _ = np.histogram(times, bins=edges, weights=[float(c) for _, c, _ in points])
    centers = edges[:-1] + width / 2
    # bins with a fifth of the typical count or less (a run's last moments) are noise
    floor = 0.2 * float(np.median(n[n > 0])) if (n > 0).any() else 0.0
    seen = n > floor
    axs[0].plot(centers[seen], hits[seen] / n[seen], marker="o", markersize=3, color="tab:blue")
    what = {"next-token": "top-1 next-token accuracy", "classify": "label accuracy"}
    axs[0].set_ylabel(what.get(task, "accuracy"))
    axs[0].set_ylim(0, 1.02)
    axs[0].set_title(f"Quality against the recorded ground truth (bins of {width:g} s; "
                     "sparse bins left out)")  # fmt: skip
    if with_ppl:
        known = [(t, nll) for t, _, nll in points if nll is not None]
        kt = np.asarray([t for t, _ in known], dtype=float)
        kn, _ = np.histogram(kt, bins=edges)
        total, _ = np.histogram(kt, bins=edges, weights=[v for _, v in known])
        ok = (kn > 0) & seen
        ppl = np.exp(total[ok] / kn[ok])
        axs[1].plot(centers[ok], ppl, marker="o", markersize=3, color="tab:purple")
        axs[1].set_ylabel("perplexity")
        if len(ppl):  # from 1, the least perplexity there is: no magnified wiggles
            axs[1].set_ylim(1.0, float(ppl.max()) * 1.15)
    axs[-1].set_xlabel("time since the start (s)")
    axs[-1].set_xlim(0, max(end, width))
    for ax in axs:
        ax.grid(True, alpha=0.3)
        _mark(ax, markers)
    return _save(fig, path)


def finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]
