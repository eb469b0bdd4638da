"""The replay report: ``DIR/report.md``, ``DIR/report.html`` and their PNG plots, and the
summary table for the terminal (rich).

Both documents are rendered from one list of blocks (headings, paragraphs, tables, images), so
they always hold the same content: the run, the guarantee checks, quality against the recorded
ground truth (overall, per model version, over time), latency percentiles and CDF, throughput
over time, dead letters by reason, duplicates, evictions and restores, model swaps, and the
injected faults (``--fault``; also written to ``DIR/faults.json``).

Example::

    paths = write_report(Path("runs/replay"), analysis, title="replay of events.jsonl")
    Console(stderr=True).print(summary_table(analysis))
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.table import Table

from stream_rnn.replay import plots
from stream_rnn.replay.analysis import Analysis, Quality
from stream_rnn.replay.result import FaultRecord

PNGS = ("latency_cdf.png", "throughput.png", "quality.png")


def latency_stats(values: list[float]) -> dict[str, float]:
    """p50, p95, p99, max and mean of ``values`` (seconds); empty: nothing."""
    finite = plots.finite(values)
    if not finite:
        return {}
    arr = np.asarray(finite)
    stats = {f"p{q}": float(np.percentile(arr, q)) for q in (50, 95, 99)}
    return {**stats, "max": float(arr.max()), "mean": float(arr.mean())}


def tokens_per_s(analysis: Analysis) -> float | None:
    """Tokens per second over the run: processed (in process) or sent (Kafka)."""
    if analysis.processed:
        end = max(t for t, _ in analysis.processed)
        total = sum(n for _, n in analysis.processed)
    else:
        end, total = analysis.elapsed_s, analysis.counts["tokens"]
    return total / end if end > 0 else None


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    return f"{seconds * 1000:.3g} ms" if seconds < 1.0 else f"{seconds:.3g} s"


def _num(value: float | None, fmt: str = ".4f") -> str:
    return "–" if value is None or not math.isfinite(value) else format(value, fmt)


def _quality_row(name: str, q: Quality) -> list[str]:
    return [name, f"{q.n:,}", _num(q.accuracy), _num(q.perplexity, ".3f")]


@dataclass
class _Block:
    kind: str  # h, p, table, img
    text: str = ""  # heading, paragraph, image alt text
    name: str = ""  # image file
    header: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)


@dataclass
class _Doc:
    """Blocks rendered both as Markdown and as HTML."""

    blocks: list[_Block] = field(default_factory=list)

    def h(self, text: str) -> None:
        self.blocks.append(_Block("h", text))

    def p(self, text: str) -> None:
        self.blocks.append(_Block("p", text))

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self.blocks.append(_Block("table", header=header, rows=rows))

    def img(self, name: str, alt: str) -> None:
        self.blocks.append(_Block("img", alt, name=name))

    def markdown(self, title: str) -> str:
        out = [f"# {title}", ""]
        for b in self.blocks:
            if b.kind == "h":
                out += [f"## {b.text}", ""]
            elif b.kind == "p":
                out += [b.text, ""]
            elif b.kind == "img":
                out += [f"![{b.text}]({b.name})", ""]
            else:
                out.append("| " + " | ".join(b.header) + " |")
                out.append("|" + "---|" * len(b.header))
                out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in b.rows]
                out.append("")
        return "\n".join(out)

    def html(self, title: str) -> str:
        e = html.escape
        out = [
            "<!doctype html><html><head><meta charset='utf-8'>",
            f"<title>{e(title)}</title><style>body{{font-family:sans-serif;max-width:1000px;"
            "margin:2em auto;padding:0 1em}table{border-collapse:collapse;margin:0.5em 0 1em}"
            "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#f3f3f3}"
            "img{max-width:100%}</style></head><body>",
            f"<h1>{e(title)}</h1>",
        ]
        for b in self.blocks:
            if b.kind == "h":
                out.append(f"<h2>{e(b.text)}</h2>")
            elif b.kind == "p":
                out.append(f"<p>{e(b.text)}</p>")
            elif b.kind == "img":
                out.append(f"<p><img src='{e(b.name)}' alt='{e(b.text)}'></p>")
            else:
                out.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in b.header) + "</tr>")
                out += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in b.rows]
                out.append("</table>")
        out.append("</body></html>")
        return "\n".join(out)


def write_report(
    directory: Path,
    analysis: Analysis,
    *,
    title: str = "Replay report",
    faults: Sequence[FaultRecord] = (),
) -> list[Path]:
    """Write ``report.md``, ``report.html`` and the PNGs into ``directory`` (and
    ``faults.json`` when ``faults`` were injected); returns the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    end = max([analysis.elapsed_s, *analysis.answered_at, *plots.finite(analysis.offered_at)])
    made = [
        plots.latency_cdf(directory / PNGS[0], analysis.latencies, analysis.worker_latencies),
        plots.throughput(
            directory / PNGS[1],
            offered=plots.finite(analysis.offered_at if analysis.processed else analysis.sent_at),
            offered_label=(
                "tokens sent / s (schedule)" if analysis.processed else "messages sent / s"
            ),
            processed=analysis.processed,
            answered=analysis.answered_at,
            end=end,
            markers=analysis.markers,
        ),
    ]
    if analysis.quality_points:
        made.append(
            plots.quality_over_time(
                directory / PNGS[2],
                analysis.quality_points,
                end=end,
                task=analysis.task,
                markers=analysis.markers,
            )
        )
    doc = _document(analysis, {p.name for p in made}, faults)
    md, page = directory / "report.md", directory / "report.html"
    md.write_text(doc.markdown(title), encoding="utf-8")
    page.write_text(doc.html(title), encoding="utf-8")
    if faults:
        path = directory / "faults.json"
        rows = [r.to_dict() for r in faults]
        path.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
        made.append(path)
    return [md, page, *made]


def _at(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds:.2f} s"


def _faults(doc: _Doc, faults: Sequence[FaultRecord]) -> None:
    doc.h("Faults injected")
    doc.table(
        ["fault", "result", "started at", "done at", "what happened"],
        [[r.spec, r.status, _at(r.at), _at(r.done_at), r.detail] for r in faults],
    )
    doc.p(
        "Times on the replay's clock (seconds after its start, as on the plots, where each "
        "fault's moments are marked); faults run one after another in the order given."
    )


def _document(a: Analysis, pngs: set[str], faults: Sequence[FaultRecord] = ()) -> _Doc:
    doc = _Doc()
    c = a.counts
    rate = tokens_per_s(a)
    doc.p(
        f"Mode {a.mode}; {a.timing}; {a.task} model; {c['messages']:,} messages "
        f"({c['tokens']:,} tokens, {c['sequences']:,} sequences, {c['keys']:,} keys) in "
        f"{a.elapsed_s:.2f} s" + (f", {rate:,.0f} tokens/s." if rate else ".")
    )
    verdict = "all passed" if a.passed else "SOME FAILED"
    doc.h(f"Guarantee checks: {verdict}")
    mark = {True: "pass", False: "FAIL", None: "n/a"}
    doc.table(["check", "result", "found"], [[k.name, mark[k.passed], k.detail] for k in a.checks])
    doc.h("Quality against the recorded ground truth")
    rows = [_quality_row("all", a.quality)]
    rows += [_quality_row(v, q) for v, q in a.quality_by_version.items()]
    doc.table(["model version", "scored predictions", "accuracy", "perplexity"], rows)
    doc.p(
        "next-token: top-1 = the token that came next, perplexity from the full distribution "
        "of the version that made each prediction (over the whole sequence, also for one that "
        "crossed a swap); classify: the label at end against the "
        "recorded label, perplexity = exp(mean −log p(true label))."
    )
    if "quality.png" in pngs:
        doc.img("quality.png", "accuracy and perplexity over time")
    lat = latency_stats(a.latencies)
    doc.h("Latency")
    doc.p(
        "From each message's scheduled send time to its prediction"
        + (
            " being emitted by the engine."
            if a.mode == "inproc"
            else " seen by a read_committed reader."
        )
    )
    rows = [["answer", *(_ms(lat.get(k)) for k in ("p50", "p95", "p99", "max", "mean"))]]
    if a.worker_latencies:
        w = latency_stats(a.worker_latencies)
        rows.append(["worker emit", *(_ms(w.get(k)) for k in ("p50", "p95", "p99", "max", "mean"))])
    doc.table(["latency", "p50", "p95", "p99", "max", "mean"], rows)
    doc.img("latency_cdf.png", "latency CDF")
    doc.h("Throughput")
    doc.img("throughput.png", "throughput over time")
    if faults:
        _faults(doc, faults)
    doc.h("Dead letters by reason")
    reasons = sorted(set(a.dead_letters) | set(a.expected_dead_letters))
    doc.table(
        ["reason", "dead letters", "expected"],
        [[r, str(a.dead_letters[r]), str(a.expected_dead_letters[r])] for r in reasons]
        or [["(none)", "0", "0"]],
    )
    doc.h("Delivery and duplicates")
    doc.table(["count", "value"], [[k, f"{v:,}"] for k, v in c.items()])
    doc.h("State pool: evictions and restores")
    if a.pool is not None:
        doc.table(["pool counter", "value"], [[k, f"{v:,}"] for k, v in a.pool.items()])
        doc.p(
            "evictions: keys moved out of memory for room (capacity); expirations: idle longer "
            "than the TTL; restores: states brought back exactly; deletions: ends."
        )
    else:
        doc.p("Counted by the workers: their status endpoint and Prometheus metrics.")
    doc.h("Model versions and swaps")
    doc.table(
        ["model version", "first prediction at", "predictions"],
        [[v, f"{at:.2f} s", f"{n:,}"] for v, at, n in a.versions] or [["(none)", "–", "0"]],
    )
    if a.markers:
        doc.table(["marker on the plots", "at"], [[label, f"{t:.2f} s"] for t, label in a.markers])
    if a.notes:
        doc.h("Notes")
        for note in a.notes:
            doc.p(note)
    return doc


def summary_table(a: Analysis, faults: Sequence[FaultRecord] = ()) -> Table:
    """The run in one rich table: counts, rate, latency, quality, faults, checks."""
    table = Table(title=f"replay ({a.mode}, {a.timing})", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    c = a.counts
    table.add_row("messages / tokens", f"{c['messages']:,} / {c['tokens']:,}")
    table.add_row("sequences / keys", f"{c['sequences']:,} / {c['keys']:,}")
    rate = tokens_per_s(a)
    table.add_row("elapsed", f"{a.elapsed_s:.2f} s" + (f" ({rate:,.0f} tokens/s)" if rate else ""))
    table.add_row("predictions / dead letters", f"{c['predictions']:,} / {c['dead letters']:,}")
    lat = latency_stats(a.latencies)
    table.add_row(
        "latency p50 / p95 / p99 / max",
        " / ".join(_ms(lat.get(k)) for k in ("p50", "p95", "p99", "max")),
    )
    q = a.quality
    table.add_row("accuracy / perplexity", f"{_num(q.accuracy)} / {_num(q.perplexity, '.3f')}")
    if a.dead_letters:
        table.add_row(
            "dead letters", ", ".join(f"{r} {n}" for r, n in sorted(a.dead_letters.items()))
        )
    if a.pool is not None:
        p = a.pool
        table.add_row(
            "evictions / expirations / restores",
            f"{p['evictions']:,} / {p['expirations']:,} / {p['restores']:,}",
        )
    table.add_row("model versions", ", ".join(f"{v[:14]} ({n:,})" for v, _, n in a.versions) or "–")
    for r in faults:
        when = f"{r.at:.1f}-{r.done_at:.1f} s" if r.at is not None and r.done_at is not None else ""
        table.add_row(f"fault {r.spec}", f"{r.status} {when}".strip())
    for check in a.checks:
        style = {True: "green", False: "bold red", None: "yellow"}[check.passed]
        word = {True: "pass", False: "FAIL", None: "n/a"}[check.passed]
        table.add_row(check.name, f"[{style}]{word}[/{style}]  {check.detail}")
    return table
