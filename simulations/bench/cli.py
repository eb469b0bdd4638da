"""``python -m simulations.bench``: run the benchmarks, write the JSON, the report, the plots,
and (``--readme``) the README's generated block.

Usage::

    python -m simulations.bench                          # everything (~17 min on 2 cores)
    python -m simulations.bench --only engine,memory     # some sections
    python -m simulations.bench --quick                  # tiny sizes, every path (a test)
    python -m simulations.bench --from-json docs/perf/bench.json --readme README.md
    python -m simulations.bench --from-json docs/perf/bench.json --only swap   # rerun one
    python -m simulations.bench --list                   # sections and their time

Writes ``OUT/bench.json`` (every number, the machine), ``OUT/bench.md`` (the report) and the
plots; OUT is ``docs/perf`` (``runs/bench-quick`` with ``--quick``). ``--from-json`` without
``--only`` runs nothing; with ``--only`` it reruns those sections into the saved run. A saved
``broker_bench.py --out`` file is read as the broker and exactly-once sections. A run in which
a section failed exits 1 and leaves the README alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from simulations.bench.machine import REPO, machine_info
from simulations.bench.plots import write_plots
from simulations.bench.report import render, write_block
from simulations.bench.results import BenchRun, Section
from simulations.bench.runner import Context, SectionSpec, run_sections
from simulations.bench.sections import BY_NAME, SECTIONS
from simulations.bench.sections.broker import fill_broker, fill_eo

DEFAULT_OUT = REPO / "docs" / "perf"
DEFAULT_QUICK_OUT = REPO / "runs" / "bench-quick"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.bench",
        description="Every benchmark of stream_rnn in one run, each row against its reference.",
    )
    parser.add_argument("--only", default=None,
                        help="comma-separated sections (default: all; see --list)")  # fmt: skip
    parser.add_argument("--skip", default=None, help="comma-separated sections to leave out")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes: every path in a few minutes, numbers meaningless")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None,
                        help="where bench.json, bench.md and the plots go (default docs/perf; "
                        "runs/bench-quick with --quick)")  # fmt: skip
    parser.add_argument("--readme", type=Path, default=None,
                        help="rewrite this README's block between <!-- bench:start --> and "
                        "<!-- bench:end -->")  # fmt: skip
    parser.add_argument("--from-json", type=Path, default=None,
                        help="a saved bench.json (or broker_bench.py JSON): report it; with "
                        "--only, rerun those sections into it")  # fmt: skip
    parser.add_argument("--bootstrap", default=None,
                        help="use this Kafka broker (default: start a local one)")  # fmt: skip
    parser.add_argument("--workdir", type=Path, default=None,
                        help="scratch directory, kept (default: a temporary one)")  # fmt: skip
    parser.add_argument("--list", action="store_true", help="list the sections and exit")
    return parser.parse_args(argv)


def choose(only: str | None, skip: str | None) -> list[SectionSpec]:
    """The sections named by ``--only`` minus ``--skip``, in run order."""

    def names(text: str | None) -> set[str]:
        got = {n.strip() for n in (text or "").split(",") if n.strip()}
        unknown = got - set(BY_NAME)
        if unknown:
            raise SystemExit(
                f"unknown section(s) {', '.join(sorted(unknown))}; the sections are "
                f"{', '.join(BY_NAME)}"
            )
        return got

    wanted = names(only) or set(BY_NAME)
    return [s for s in SECTIONS if s.name in wanted - names(skip)]


def load_run(path: Path) -> BenchRun:
    """A saved bench.json, or a broker_bench.py results file as its two sections."""
    data = json.loads(path.read_text())
    if "schema" in data:
        return BenchRun.from_dict(data)
    if not {"rows", "curve", "ratios"} <= set(data):
        raise SystemExit(f"{path} is neither a bench.json nor a broker_bench.py --out file")
    broker = Section("broker", BY_NAME["broker"].title, seconds=data.get("seconds", 0.0))
    fill_broker(broker, data)
    broker.loadavg = [data["loadavg_start"][0], data["loadavg_end"][0]]
    eo = Section("eo", BY_NAME["eo"].title)
    fill_eo(eo, data)
    eo.notes.append("from the broker section's drains (same run)")
    machine = {
        "note": f"a broker_bench.py run ({path.name}): its broker and exactly-once rows only",
        "loadavg_start": data["loadavg_start"],
        "loadavg_end": data["loadavg_end"],
    }
    return BenchRun(machine=machine, sections={"broker": broker, "eo": eo},
                    seconds=data.get("seconds", 0.0))  # fmt: skip


def estimate(specs: list[SectionSpec], quick: bool) -> float:
    return sum(s.estimate_quick_s if quick else s.estimate_s for s in specs)


def print_list() -> None:
    print(f"{'section':<11} {'full':>7} {'quick':>6}  what")
    for s in SECTIONS:
        print(f"{s.name:<11} {s.estimate_s:>6.0f}s {s.estimate_quick_s:>5.0f}s  {s.title}"
              f"{'' if s.broker else ' (no broker)'}")  # fmt: skip
    print(f"{'all':<11} {estimate(SECTIONS, False):>6.0f}s {estimate(SECTIONS, True):>5.0f}s"
          "  (+ ~15 s to start the broker)")  # fmt: skip


def execute(args: argparse.Namespace, specs: list[SectionSpec], base: BenchRun | None) -> BenchRun:
    """Run ``specs`` (into ``base``, when rerunning sections of a saved run)."""
    log = lambda line: print(line, flush=True)  # noqa: E731 - one-line logger
    run = base or BenchRun(machine=machine_info(), quick=args.quick)
    if base is None:
        run.started_at = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")  # noqa: UP017
    elif base.quick != args.quick:
        raise SystemExit(
            f"the saved run is {'quick' if base.quick else 'full'}: rerun its sections "
            f"{'with' if base.quick else 'without'} --quick"
        )
    log(f"running {', '.join(s.name for s in specs)} ({'quick' if args.quick else 'full'}); "
        f"estimated {estimate(specs, args.quick) / 60:.1f} min on 2 shared cores")  # fmt: skip
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        ctx = Context(workdir, quick=args.quick, log=log, given_bootstrap=args.bootstrap)
        ctx.done.update(run.sections)
        try:
            done = run_sections(specs, ctx)
        finally:
            ctx.close()
    elapsed = time.monotonic() - started
    if base is None:
        run.sections = done
        run.seconds = elapsed
    else:  # reruns: in run order, replacing the saved ones
        merged = {**run.sections, **done}
        run.sections = {s.name: merged[s.name] for s in SECTIONS if s.name in merged}
        run.seconds = sum(s.seconds for s in run.sections.values())
        reruns = run.machine.setdefault("reruns", [])
        reruns.append({"sections": [s.name for s in specs], "seconds": elapsed,
                       "at": datetime.now(timezone.utc).isoformat(timespec="minutes"),  # noqa: UP017
                       "commit": machine_info().get("commit")})  # fmt: skip
    run.machine["loadavg_end"] = list(os.getloadavg())
    return run


def write_outputs(run: BenchRun, out: Path, readme: Path | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(run.to_dict(), indent=2) + "\n")
    images = write_plots(run, out)
    names = [s.name for s in SECTIONS]
    (out / "bench.md").write_text(
        render(run, images={k: p.name for k, p in images.items()}, level=2, every_section=names)
    )
    print(f"wrote {out / 'bench.json'}, {out / 'bench.md'} and {len(images)} plots", flush=True)
    if readme is None:
        return
    if run.failed():
        print(f"{readme} left as it was: section(s) {', '.join(run.failed())} failed", flush=True)
        return
    base = readme.resolve().parent
    links = {k: os.path.relpath(p.resolve(), base) for k, p in images.items()}
    write_block(readme, render(run, images=links, level=4, title=False, every_section=names))
    print(f"{readme}: generated block rewritten", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        print_list()
        return 0
    base = load_run(args.from_json) if args.from_json is not None else None
    if base is not None and args.only is None and args.skip is None:
        run = base  # report only
    else:
        run = execute(args, choose(args.only, args.skip), base)
    out = args.out or (DEFAULT_QUICK_OUT if run.quick else DEFAULT_OUT)
    print(render(run, level=2), flush=True)
    write_outputs(run, out, args.readme)
    failed = run.failed()
    if failed:
        print(f"FAILED sections: {', '.join(failed)}", file=sys.stderr, flush=True)
        return 1
    return 0
