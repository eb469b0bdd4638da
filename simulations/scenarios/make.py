"""Write a named replay scenario as an event log: ``python simulations/scenarios/make.py NAME
--out FILE --seed S [--task next-token|classify] [--sequences N] [--keys N] [--duration S]``.

``--list`` shows the scenarios. The file replays with ``stream-rnn replay --data FILE``; a model
trained on ``stream-rnn data synth --task TASK`` knows its tokens (and, for classify, labels).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from catalog import SCENARIOS, describe, generate, write


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", nargs="?", choices=sorted(SCENARIOS), help="scenario")
    parser.add_argument("--out", type=Path, help="event log to write (JSONL)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task", choices=["next-token", "classify"], default="next-token")
    parser.add_argument("--sequences", type=int, default=None)
    parser.add_argument("--keys", type=int, default=None)
    parser.add_argument("--duration", type=float, default=None, help="seconds the file spans")
    parser.add_argument("--malformed-share", type=float, default=None)
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    args = parser.parse_args(argv)
    if args.list or args.name is None:
        for name, sc in SCENARIOS.items():
            print(f"{name:<10} {sc.description}" + (f" ({sc.hint})" if sc.hint else ""))
        return 0 if args.list else 2
    if args.out is None:
        parser.error("--out FILE is required")
    overrides = {
        field: value
        for field, value in (
            ("sequences", args.sequences),
            ("keys", args.keys),
            ("duration_s", args.duration),
            ("malformed_share", args.malformed_share),
        )
        if value is not None
    }
    scenario = SCENARIOS[args.name]
    rows = generate(scenario, seed=args.seed, task=args.task, **overrides)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write(args.out, rows)
    print(
        json.dumps(
            {"scenario": args.name, "seed": args.seed, "out": str(args.out), **describe(rows)}
        )
    )
    if scenario.hint:
        print(scenario.hint, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
