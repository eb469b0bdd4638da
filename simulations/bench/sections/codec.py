"""Input decoding: the worker's msgspec decoder against orjson + hand validation and json +
jsonschema, on `simulations.codec_bench`'s mix (94 % tokens, 5 % controls, 1 % malformed).

Every decoder must reject the same messages; best of ``repeats`` passes each.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from simulations.bench.results import Section
from simulations.bench.runner import Context
from simulations.codec_bench import _loop, hand_decode, jsonschema_decoder, make_mix
from stream_rnn.stream.codec import Rejected, decode_batch
from stream_rnn.stream.messages import Event

FULL = {"n": 20_000, "repeats": 3}
QUICK = {"n": 2_000, "repeats": 1}
Decoder = Callable[[list[bytes]], list[Event | Rejected]]


def _rate(run: Decoder, values: list[bytes], repeats: int, reference: list[bool]) -> float:
    verdicts = [isinstance(x, Rejected) for x in run(values)]
    if verdicts != reference:
        bad = sum(a != b for a, b in zip(verdicts, reference, strict=True))
        raise RuntimeError(f"a decoder disagrees with decode_batch on {bad} messages")
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        run(values)
        best = min(best, time.perf_counter() - started)
    return len(values) / best


def run(ctx: Context, section: Section) -> None:
    cfg = QUICK if ctx.quick else FULL
    section.config = dict(cfg)
    values = make_mix(cfg["n"])
    reference = [isinstance(x, Rejected) for x in decode_batch(values)]
    msgspec = _rate(decode_batch, values, cfg["repeats"], reference)
    hand = _rate(_loop(hand_decode), values, cfg["repeats"], reference)
    what = "msgspec typed decode_batch (the worker's)"
    section.add("codec.vs_orjson", what, msgspec, "msgs/s",
                ref="orjson + hand validation, same checks", ref_value=hand)  # fmt: skip
    schema = jsonschema_decoder()
    if schema is None:
        section.notes.append("jsonschema is not installed: json + jsonschema not measured")
    else:
        floor = _rate(_loop(schema), values, cfg["repeats"], reference)
        section.add("codec.vs_jsonschema", what, msgspec, "msgs/s",
                    ref="json + jsonschema (the shipped schemas)", ref_value=floor)  # fmt: skip
    section.data = {"rejected": sum(reference), "messages": len(values)}
