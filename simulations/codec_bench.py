"""Micro-benchmark: decode + validate input events, three ways, on a realistic message mix.

Mix: 94% token events (str and int tokens, with ``ts``), 5% control events (end, reset,
generate) and 1% malformed values (one per dead-letter reason the decoder can produce).

* msgspec typed structs: ``stream_rnn.stream.codec`` (per message and ``decode_batch``)
* orjson + hand validation: an equally strict validator written here, same output structs
* json + jsonschema: the shipped draft 2020-12 schemas (skipped if jsonschema is missing)

Run: ``.venv/bin/python simulations/codec_bench.py [--n 20000] [--repeats 3]`` (a few
seconds). All decoders must agree on which messages are rejected; the script checks that.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Callable
from typing import Any

import orjson

from stream_rnn.stream.codec import Rejected, decode_batch, decode_event
from stream_rnn.stream.messages import (
    EVENT_FIELDS,
    EndEvent,
    Event,
    GenerateEvent,
    ResetEvent,
    TokenEvent,
    load_schema,
)

MALFORMED = [
    b"not json at all",
    b'["v", 1]',
    b'{"v": 1, "type": "token"}',
    b'{"v": 1, "type": "token", "token": "a", "colour": "red"}',
    b'{"v": 1, "type": "token", "token": true}',
    b'{"v": 2, "type": "token", "token": "a"}',
    b'{"v": 1, "type": "generate", "n": 0}',
    b'{"v": 1, "type": "token", "token": "\xff\xfe"}',
    b'{"v": 1, "type": "token", "token": "' + b"x" * 5000 + b'"}',
]


def make_mix(n: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "é", "日本"]
    out = []
    for i in range(n):
        ts = 1.7e9 + i * 1e-3
        r = rng.random()
        if r < 0.01:
            out.append(rng.choice(MALFORMED))
            continue
        if r < 0.06:
            control: dict[str, Any] = rng.choice(
                [{"type": "end"}, {"type": "reset"}, {"type": "generate", "n": 20, "top_k": 5}]
            )
            out.append(orjson.dumps({"v": 1, **control, "ts": ts}))
            continue
        token: str | int = rng.choice(words) if rng.random() < 0.7 else rng.randrange(4, 50_000)
        out.append(orjson.dumps({"v": 1, "type": "token", "token": token, "ts": ts}))
    return out


# --- (b) orjson + hand validation ---------------------------------------------------------

_INT_FIELDS = {"n": (1, 1000), "top_k": (0, 2**63 - 1), "seed": (0, 2**63 - 1)}


def _number(x: object) -> bool:
    return (type(x) is float and math.isfinite(x)) or type(x) is int


def hand_decode(value: bytes, max_bytes: int = 4096) -> Event:
    if len(value) > max_bytes:
        raise Rejected("oversized", f"{len(value)} bytes")
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError as e:
        raise Rejected("not_json", str(e)) from None
    if type(obj) is not dict:
        raise Rejected("not_object", type(obj).__name__)
    typ = obj.get("type")
    allowed = EVENT_FIELDS.get(typ) if type(typ) is str else None
    if allowed is None:
        raise Rejected("missing_field" if typ is None else "bad_value", f"type {typ!r}")
    extra = obj.keys() - allowed
    if extra:
        raise Rejected("extra_field", f"{sorted(extra)}")
    if "v" not in obj:
        raise Rejected("missing_field", "v")
    if obj["v"] != 1 or type(obj["v"]) is not int:
        raise Rejected("bad_version", f"{obj['v']!r}")
    ts = obj.get("ts")
    if ts is not None and (not _number(ts) or ts < 0):
        raise Rejected("wrong_type" if not _number(ts) else "bad_value", "ts")
    if typ == "token":
        if "token" not in obj:
            raise Rejected("missing_field", "token")
        token = obj["token"]
        if type(token) is not str and type(token) is not int:
            raise Rejected("wrong_type", "token")
        return TokenEvent(token, ts)
    if typ == "end":
        return EndEvent(ts)
    if typ == "reset":
        return ResetEvent(ts)
    if "n" not in obj:
        raise Rejected("missing_field", "n")
    for name, (lo, hi) in _INT_FIELDS.items():
        x = obj.get(name, 0 if name == "top_k" else 1)
        if name == "seed" and x is None:
            continue
        if type(x) is not int:
            raise Rejected("wrong_type", name)
        if not lo <= x <= hi:
            raise Rejected("bad_value", name)
    temperature = obj.get("temperature", 1.0)
    if not _number(temperature):
        raise Rejected("wrong_type", "temperature")
    if temperature <= 0:
        raise Rejected("bad_value", "temperature")
    greedy = obj.get("greedy", False)
    if type(greedy) is not bool:
        raise Rejected("wrong_type", "greedy")
    return GenerateEvent(
        obj["n"], float(temperature), obj.get("top_k", 0), greedy, obj.get("seed"), ts
    )


# --- (c) json + jsonschema -----------------------------------------------------------------


def jsonschema_decoder() -> Callable[[bytes], Event] | None:
    try:
        import jsonschema
    except ImportError:
        return None
    token_v = jsonschema.Draft202012Validator(load_schema("token_event"))
    control_v = jsonschema.Draft202012Validator(load_schema("control_event"))
    build = {"token": TokenEvent, "end": EndEvent, "reset": ResetEvent, "generate": GenerateEvent}

    def decode(value: bytes) -> Event:
        if len(value) > 4096:
            raise Rejected("oversized", f"{len(value)} bytes")
        try:
            obj = json.loads(value.decode("utf-8"))
        except ValueError as e:
            raise Rejected("not_json", str(e)) from None
        typ = obj.get("type") if isinstance(obj, dict) else None
        validator = token_v if typ == "token" else control_v
        error = jsonschema.exceptions.best_match(validator.iter_errors(obj))
        if error is not None:
            raise Rejected("bad_value", error.message)
        fields = {k: v for k, v in obj.items() if k != "type"}
        event: Event = build[str(typ)](**fields)
        return event

    return decode


def _loop(decode: Callable[[bytes], Event]) -> Callable[[list[bytes]], list[Event | Rejected]]:
    def run(values: list[bytes]) -> list[Event | Rejected]:
        out: list[Event | Rejected] = []
        for value in values:
            try:
                out.append(decode(value))
            except Rejected as err:
                out.append(err)
        return out

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="messages in the mix")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many passes")
    args = parser.parse_args()
    values = make_mix(args.n)
    runs: dict[str, Callable[[list[bytes]], list[Event | Rejected]]] = {
        "msgspec typed, decode_event": _loop(decode_event),
        "msgspec typed, decode_batch": decode_batch,
        "orjson + hand validation": _loop(hand_decode),
    }
    schema_decode = jsonschema_decoder()
    if schema_decode is None:
        print("jsonschema not installed: skipping json + jsonschema")
    else:
        runs["json + jsonschema"] = _loop(schema_decode)
    reference = [isinstance(x, Rejected) for x in decode_batch(values)]
    rates: dict[str, float] = {}
    for name, run in runs.items():
        verdicts = [isinstance(x, Rejected) for x in run(values)]
        if verdicts != reference:
            bad = sum(a != b for a, b in zip(verdicts, reference, strict=True))
            raise SystemExit(f"{name} disagrees with decode_event on {bad} messages")
        best = math.inf
        for _ in range(args.repeats):
            started = time.perf_counter()
            run(values)
            best = min(best, time.perf_counter() - started)
        rates[name] = len(values) / best
    top = max(rates.values())
    print(f"{len(values)} messages, {sum(reference)} rejected; best of {args.repeats}")
    print(f"{'decoder':<30} {'msgs/s':>12} {'vs fastest':>10}")
    for name, rate in sorted(rates.items(), key=lambda kv: -kv[1]):
        print(f"{name:<30} {rate:>12,.0f} {rate / top:>10.2f}")


if __name__ == "__main__":
    main()
