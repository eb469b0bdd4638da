"""What a benchmark run produces: rows against their references, targets, one result per section.

Every measurement is a `Row`: a value with its unit and, where there is one, the reference it
is judged against, measured in the same run (``ratio`` = value / reference). A `Target` is a
goal of an issue, met or missed. A `Section` holds one benchmark's rows, targets, notes (what
was skipped and why), the raw data its plots and detail tables are drawn from, its wall time
and the load average around it. `BenchRun` is the whole run with the machine it ran on; it
round-trips through JSON (NaN and infinities become ``null``: strict JSON has neither).

Example::

    section = Section("engine", "Engine in process")
    section.add("engine.naive", "engine / naive loop", 185_000, "tokens/s",
                ref="naive loop", ref_value=7_100)
    section.target("engine / naive loop", section.rows[0].ratio, ">= 25", met=True)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA = 1


@dataclass
class Row:
    """One measurement; ``ref``/``ref_value`` the reference it is compared with (same unit
    unless ``ref_unit`` says otherwise). ``ratio`` is value / reference unless ``given_ratio``
    says otherwise (a median of per-round ratios, say, rather than a ratio of medians)."""

    id: str
    what: str
    value: float
    unit: str
    ref: str | None = None
    ref_value: float | None = None
    ref_unit: str | None = None
    given_ratio: float | None = None

    @property
    def ratio(self) -> float | None:
        if self.given_ratio is not None:
            return self.given_ratio
        if self.ref_value is None or not self.ref_value or not math.isfinite(self.value):
            return None
        return self.value / self.ref_value

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Row:
        value = data.get("value")
        return cls(
            id=data["id"],
            what=data["what"],
            value=float("nan") if value is None else float(value),
            unit=data["unit"],
            ref=data.get("ref"),
            ref_value=data.get("ref_value"),
            ref_unit=data.get("ref_unit"),
            given_ratio=data.get("given_ratio"),
        )


@dataclass
class Target:
    """A goal: ``value`` measured, ``target`` as text (``">= 0.5"``), ``met`` or not."""

    what: str
    value: float
    target: str
    met: bool

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Target:
        value = data.get("value")
        return cls(
            data["what"], float("nan") if value is None else value, data["target"], data["met"]
        )


@dataclass
class Section:
    """The result of one benchmark section."""

    name: str
    title: str
    rows: list[Row] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    loadavg: list[float] = field(default_factory=list)  # 1-min load average before, after
    error: str | None = None

    def add(
        self,
        row_id: str,
        what: str,
        value: float,
        unit: str,
        *,
        ref: str | None = None,
        ref_value: float | None = None,
        ref_unit: str | None = None,
        ratio: float | None = None,
    ) -> Row:
        row = Row(row_id, what, float(value), unit, ref, ref_value, ref_unit, ratio)
        self.rows.append(row)
        return row

    def target(self, what: str, value: float | None, target: str, *, met: bool) -> None:
        self.targets.append(Target(what, float("nan") if value is None else value, target, met))

    def row(self, row_id: str) -> Row | None:
        return next((r for r in self.rows if r.id == row_id), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "seconds": self.seconds,
            "loadavg": self.loadavg,
            "error": self.error,
            "config": self.config,
            "rows": [r.to_dict() for r in self.rows],
            "targets": [asdict(t) for t in self.targets],
            "notes": self.notes,
            "data": self.data,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Section:
        return cls(
            name=data["name"],
            title=data["title"],
            rows=[Row.from_dict(r) for r in data.get("rows", [])],
            targets=[Target.from_dict(t) for t in data.get("targets", [])],
            notes=list(data.get("notes", [])),
            config=dict(data.get("config", {})),
            data=dict(data.get("data", {})),
            seconds=float(data.get("seconds", 0.0)),
            loadavg=list(data.get("loadavg", [])),
            error=data.get("error"),
        )


@dataclass
class BenchRun:
    """A whole run: its sections in run order and the machine they ran on."""

    machine: dict[str, Any] = field(default_factory=dict)
    sections: dict[str, Section] = field(default_factory=dict)
    quick: bool = False
    started_at: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return finite(
            {
                "schema": SCHEMA,
                "started_at": self.started_at,
                "quick": self.quick,
                "seconds": self.seconds,
                "machine": self.machine,
                "sections": {name: s.to_dict() for name, s in self.sections.items()},
            }
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BenchRun:
        if data.get("schema") != SCHEMA:
            raise ValueError(
                f"not a bench.json of schema {SCHEMA} (schema {data.get('schema')!r}); "
                "write one with `python -m simulations.bench --out DIR`"
            )
        return cls(
            machine=dict(data.get("machine", {})),
            sections={n: Section.from_dict(s) for n, s in data.get("sections", {}).items()},
            quick=bool(data.get("quick", False)),
            started_at=str(data.get("started_at", "")),
            seconds=float(data.get("seconds", 0.0)),
        )

    def failed(self) -> list[str]:
        return [name for name, s in self.sections.items() if s.error]


def finite(value: Any) -> Any:
    """``value`` with NaN and infinities as None, recursively (tuples become lists)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value
