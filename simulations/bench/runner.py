"""Running sections: the shared context (one broker for every section), timing, failures.

A section is a function that fills a `Section` from a `Context`; `SectionSpec` names it, says
whether it needs the broker, and how long it takes in a full and a quick run on the reference
machine (2 shared cores). `run_sections` runs the chosen ones in order, each timed with the
load average before and after it; one that raises is recorded with its error and the others
still run (the run then exits non-zero and leaves the README alone).
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from simulations.bench.machine import loadavg
from simulations.bench.results import Section
from stream_rnn.ops.kafka_local import LocalKafka


@dataclass
class Context:
    """What every section gets: a scratch directory, the run's mode, a logger, the broker.

    ``bootstrap()`` starts a local broker (``LocalKafka`` in the scratch directory) the first
    time a section needs one, unless the run was given one; ``close()`` stops it.
    ``done`` holds the sections finished before this one (the exactly-once section reads the
    broker section's drains instead of running its own pair).
    """

    workdir: Path
    quick: bool = False
    log: Callable[[str], None] = print
    given_bootstrap: str | None = None
    done: dict[str, Section] = field(default_factory=dict)
    _kafka: LocalKafka | None = None
    _bootstrap: str | None = None

    def bootstrap(self) -> str:
        if self._bootstrap is None:
            if self.given_bootstrap:
                self._bootstrap = self.given_bootstrap
            else:
                started = time.monotonic()
                self._kafka = LocalKafka(self.workdir / "kafka")
                self._bootstrap = self._kafka.start().bootstrap
                self.log(
                    f"local broker at {self._bootstrap} "
                    f"(started in {time.monotonic() - started:.0f} s)"
                )
        return self._bootstrap

    def scratch(self, name: str) -> Path:
        """A fresh directory of the scratch area for ``name``."""
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def close(self) -> None:
        if self._kafka is not None:
            self._kafka.stop()
            self._kafka = None
            self._bootstrap = None


@dataclass(frozen=True)
class SectionSpec:
    """One benchmark section: ``run(ctx, section)`` fills ``section``."""

    name: str
    title: str
    run: Callable[[Context, Section], None]
    broker: bool
    estimate_s: float  # a full run on the reference machine
    estimate_quick_s: float


def run_section(spec: SectionSpec, ctx: Context) -> Section:
    """Run one section, timed; an exception is recorded in ``section.error``, not raised."""
    section = Section(spec.name, spec.title)
    before = loadavg()
    started = time.monotonic()
    ctx.log(f"== {spec.name}: {spec.title}")
    try:
        spec.run(ctx, section)
    except KeyboardInterrupt:
        raise
    except Exception as err:  # noqa: BLE001 - one failed section must not lose the others
        section.error = f"{type(err).__name__}: {err}"[:2000]
        ctx.log(f"section {spec.name} FAILED:\n{traceback.format_exc()}")
    section.seconds = round(time.monotonic() - started, 1)
    section.loadavg = [before, loadavg()]
    ctx.log(
        f"== {spec.name}: {section.seconds:.0f} s (load {before:.1f} -> {section.loadavg[1]:.1f})"
    )
    return section


def run_sections(specs: Sequence[SectionSpec], ctx: Context) -> dict[str, Section]:
    """Run ``specs`` in order; every result, also of the failed ones."""
    out: dict[str, Section] = {}
    for spec in specs:
        out[spec.name] = ctx.done[spec.name] = run_section(spec, ctx)
    return out
