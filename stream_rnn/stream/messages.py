"""Wire schemas of the stream topics and the shipped JSON Schemas.

Every message is one UTF-8 JSON object; the Kafka key is the sequence key (UTF-8 bytes).

* input topic: `TokenEvent` (one token), `TokensEvent` (a chunk of a key's tokens, in order)
  or a control event (`EndEvent`, `ResetEvent`, `GenerateEvent`), told apart by ``type``;
  ``v`` (schema version, always 1) is required on the wire.
* output topic: a prediction, one of the ``*Prediction`` structs, told apart by ``type``. A
  chunk's per-token outputs come in one ``*_chunk`` prediction: its payload fields are those of
  the per-token type, each a list with one entry per token (`CHUNK_TYPES`).
* dead-letter topic: `DeadLetter`, the original bytes base64-encoded, with a `Reason` code
  (`stream_rnn.stream.reasons`).

The structs are msgspec Structs: `stream_rnn.stream.codec` decodes straight into them and
validates while it parses, and `build_schema` derives the JSON Schemas (draft 2020-12) from
them, so code and ``stream_rnn/schemas/*.json`` cannot drift apart (a test compares them;
regenerate with ``python -m stream_rnn.stream.messages``).

>>> TokenEvent("a", ts=1.7e9)
TokenEvent(token='a', ts=1700000000.0, v=1)
>>> TokensEvent(["h", "i", 17]).tokens
['h', 'i', 17]
>>> GenerateEvent(n=20).temperature
1.0
>>> sorted(load_schema("token_event")["$defs"]["TokenEvent"]["required"])
['token', 'type', 'v']
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import msgspec
import orjson
from msgspec import Meta, Struct

# chunk prediction type -> (its per-token type, its payload fields: per-token lists)
from stream_rnn.engine.events import CHUNK_TYPES as CHUNK_TYPES
from stream_rnn.stream.exceptions import StreamError
from stream_rnn.stream.reasons import Reason

SCHEMA_VERSION = 1
MAX_GENERATE = 1000
DEFAULT_MAX_CHUNK_TOKENS = 256  # a worker's default limit on the tokens of one chunk
MAX_LABEL_CHARS = 128
_MAX_FLOAT = sys.float_info.max  # a `le` bound that rejects inf; NaN fails every bound

EVENT_TYPES = ("token", "tokens", "end", "reset", "generate")
FIELD_DOCS: dict[str, str] = {
    "v": "the schema version, 1",
    "type": "one of 'token', 'tokens', 'end', 'reset', 'generate'",
    "token": "a string token (looked up in the vocabulary) or an integer token id",
    "tokens": "an array of 1 to max_chunk_tokens (a worker setting, default "
    f"{DEFAULT_MAX_CHUNK_TOKENS}) tokens of the key, in order, each a string token (looked up in "
    "the vocabulary) or an integer token id",
    "ts": "a finite number >= 0 (producer send time, seconds since the epoch) or null",
    "n": f"an integer from 1 to {MAX_GENERATE} (how many tokens to generate)",
    "temperature": "a finite number > 0 (sampling temperature, default 1.0)",
    "top_k": "an integer >= 0 (sample among the k most likely tokens; 0 = all, the default)",
    "greedy": "true or false (take the most likely token instead of sampling; default false)",
    "seed": "an integer from 0 to 2**63-1, or null (random generator seed; default null)",
    "label": f"a string of 1 to {MAX_LABEL_CHARS} characters, or null (the sequence's true "
    "label, for training: classify tasks record it with the sequence; the worker ignores it)",
}

# Aliases keep the field declarations short; the descriptions end up in the JSON Schemas.
_Ts = Annotated[float, Meta(ge=0.0, le=_MAX_FLOAT, description=FIELD_DOCS["ts"])] | None
_V = Annotated[Literal[1], Meta(description=FIELD_DOCS["v"])]
_Token = Annotated[str | int, Meta(description=FIELD_DOCS["token"])]


# Docstrings of the structs become the schemas' descriptions, so usage examples live in the
# module docstring. gc=False: events hold only scalars (no cycles), and skipping the garbage
# collector's tracking makes millions of short-lived events cheaper.
class _Strict(Struct, tag_field="type", forbid_unknown_fields=True, frozen=True, gc=False):
    """Options shared by the input events (msgspec passes them on to subclasses)."""


class TokenEvent(_Strict, tag="token", frozen=True):  # frozen again: for mypy
    """Advance the key's state by one token."""

    token: _Token
    ts: _Ts = None
    v: _V = 1


class TokensEvent(_Strict, tag="tokens", frozen=True):  # frozen again: for mypy
    """Advance the key's state by several tokens, in order (a chunk: one message, one offset).

    ``ts`` is the producer's send time of the chunk's first token.
    """

    tokens: Annotated[list[_Token], Meta(min_length=1, description=FIELD_DOCS["tokens"])]
    ts: _Ts = None
    v: _V = 1


class EndEvent(_Strict, tag="end", frozen=True):  # frozen again: for mypy
    """Close the key's sequence: emit sequence-level outputs, then start a new sequence.

    ``label`` optionally carries the sequence's ground truth (``stream-rnn record`` keeps it
    with the recorded sequence, for retraining); serving does not use it.
    """

    ts: _Ts = None
    v: _V = 1
    label: (
        Annotated[
            str, Meta(min_length=1, max_length=MAX_LABEL_CHARS, description=FIELD_DOCS["label"])
        ]
        | None
    ) = None


class ResetEvent(_Strict, tag="reset", frozen=True):  # frozen again: for mypy
    """Discard the key's open sequence and start a new one from the initial state."""

    ts: _Ts = None
    v: _V = 1


class GenerateEvent(_Strict, tag="generate", frozen=True):  # frozen again: for mypy
    """Generate a continuation of the key's sequence without changing its state."""

    n: Annotated[int, Meta(ge=1, le=MAX_GENERATE, description=FIELD_DOCS["n"])]
    temperature: Annotated[
        float, Meta(gt=0.0, le=_MAX_FLOAT, description=FIELD_DOCS["temperature"])
    ] = 1.0
    top_k: Annotated[int, Meta(ge=0, le=2**63 - 1, description=FIELD_DOCS["top_k"])] = 0
    greedy: Annotated[bool, Meta(description=FIELD_DOCS["greedy"])] = False
    seed: Annotated[int, Meta(ge=0, le=2**63 - 1, description=FIELD_DOCS["seed"])] | None = None
    ts: _Ts = None
    v: _V = 1


ControlEvent = EndEvent | ResetEvent | GenerateEvent
Event = TokenEvent | TokensEvent | EndEvent | ResetEvent | GenerateEvent
EVENT_FIELDS: dict[str, tuple[str, ...]] = {
    tag: ("type", *cls.__struct_fields__)
    for tag, cls in zip(EVENT_TYPES, get_args(Event), strict=True)
}

PredictionType = Literal[
    "next",
    "estimate",
    "tag",
    "next_chunk",
    "estimate_chunk",
    "tag_chunk",
    "label",
    "translation",
    "generated",
    "end",
    "reset",
]


class TopK(Struct, forbid_unknown_fields=True, frozen=True, gc=False):
    """The k most likely next tokens, most likely first."""

    tokens: list[str]
    probs: list[float]


# Not kw_only: the stream encoder builds predictions positionally, in bulk (map over columns).
class _PredictionBase(Struct, tag_field="type", forbid_unknown_fields=True, gc=False):
    """Fields every prediction carries."""

    v: _V
    key: Annotated[str, Meta(min_length=1, description="the sequence key")]
    id: Annotated[
        str,
        Meta(
            pattern=r"^[0-9]+:[0-9]+$",
            description="'<partition>:<offset>' of the event that caused it; drop duplicates by it",
        ),
    ]
    seq: Annotated[int, Meta(ge=0, description="sequence number of the key: +1 per end/reset")]
    pos: Annotated[
        Annotated[int, Meta(ge=0)] | None,
        Meta(description="0-based index of the token in the sequence; null for controls"),
    ]
    model_version: str
    latency_s: Annotated[float | None, Meta(description="emit time - ts of the event, or null")]
    ts: Annotated[float, Meta(description="emit time, seconds since the epoch")]


class NextPrediction(_PredictionBase, tag="next"):
    """Top-k candidates for the token after position ``pos``."""

    next: TopK


class EstimatePrediction(_PredictionBase, tag="estimate"):
    """Running estimate of the sequence label after the token at ``pos``."""

    label: str
    probs: dict[str, float]


class _ChunkBase(_PredictionBase):
    """Fields of every prediction for a ``tokens`` chunk."""

    pos: Annotated[int, Meta(ge=0, description="0-based index of the chunk's first token")]
    pos_to: Annotated[
        int,
        Meta(
            ge=0,
            description="index of the chunk's last token: the per-token lists have "
            "pos_to - pos + 1 entries, for positions pos..pos_to in order",
        ),
    ]


class NextChunkPrediction(_ChunkBase, tag="next_chunk"):
    """Top-k candidates after each token of a chunk: ``next[i]`` is for position pos + i."""

    next: list[TopK]


class EstimateChunkPrediction(_ChunkBase, tag="estimate_chunk"):
    """Running estimates of the sequence label after each token of a chunk."""

    label: list[str]
    probs: list[dict[str, float]]


class TagChunkPrediction(_ChunkBase, tag="tag_chunk"):
    """Tags of the tokens of a chunk: ``tag[i]``, ``prob[i]`` for position pos + i."""

    tag: list[str]
    prob: list[float]


class LabelPrediction(_PredictionBase, tag="label"):
    """Final label of a sequence, emitted on its end event."""

    label: str
    probs: dict[str, float]


class TagPrediction(_PredictionBase, tag="tag"):
    """Tag of the token at ``pos``."""

    tag: str
    prob: float


class TranslationPrediction(_PredictionBase, tag="translation"):
    """Output sequence of a seq2seq model, emitted on the end event."""

    output: str
    output_tokens: list[str]


class GeneratedPrediction(_PredictionBase, tag="generated"):
    """Continuation produced for a generate event."""

    tokens: list[str]
    text: str


class EndPrediction(_PredictionBase, tag="end"):
    """Closes a sequence of a next-token or tag model (their outputs came per token)."""

    n_tokens: Annotated[int, Meta(ge=1, description="how many tokens the closed sequence had")]


class ResetPrediction(_PredictionBase, tag="reset"):
    """Acknowledges a reset event: the key starts sequence ``seq`` from the initial state."""


Prediction = (
    NextPrediction
    | EstimatePrediction
    | LabelPrediction
    | TagPrediction
    | NextChunkPrediction
    | EstimateChunkPrediction
    | TagChunkPrediction
    | TranslationPrediction
    | GeneratedPrediction
    | EndPrediction
    | ResetPrediction
)


class DeadLetter(Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """An input message the worker could not use, with why and where it came from."""

    v: _V
    reason: Reason
    detail: Annotated[str, Meta(description="what was wrong and what to do")]
    topic: str
    partition: Annotated[int, Meta(ge=0)]
    offset: Annotated[int, Meta(ge=0)]
    key_b64: Annotated[bytes | None, Meta(description="original Kafka key, base64")]
    value_b64: Annotated[bytes, Meta(description="original value bytes, base64")]
    ts: Annotated[float, Meta(description="when it was dead-lettered, seconds since the epoch")]


# name -> (type, title, description, whether `v` must be added to `required`)
_SCHEMAS: dict[str, tuple[Any, str, str, bool]] = {
    "token_event": (TokenEvent, "Token event", "One token of a keyed sequence.", True),
    "tokens_event": (
        TokensEvent,
        "Tokens event",
        "A chunk of tokens of a keyed sequence, applied in order as one message.",
        True,
    ),
    "control_event": (ControlEvent, "Control event", "end, reset or generate.", True),
    "prediction": (Prediction, "Prediction", "One output of a stream worker.", False),
    "dead_letter": (DeadLetter, "Dead letter", "A rejected input message.", False),
}
SCHEMA_NAMES: tuple[str, ...] = tuple(_SCHEMAS)
SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"


def _check_name(name: str) -> str:
    if name not in _SCHEMAS:
        raise StreamError(f"unknown schema {name!r}; the shipped schemas are {list(SCHEMA_NAMES)}")
    return name


def build_schema(name: str) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of ``name``, derived from the structs above."""
    typ, title, description, version_required = _SCHEMAS[_check_name(name)]
    body = msgspec.json.schema(typ)
    if version_required:
        # `v` has a default so that code can write TokenEvent("a"); on the wire the decoder
        # still requires it (see codec.decode_event), and the schema must say so.
        for definition in body["$defs"].values():
            definition["required"] = sorted({*definition.get("required", ()), "v"})
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": title,
        "description": f"{description} stream_rnn wire schema v{SCHEMA_VERSION}.",
        **body,
    }


def schema_path(name: str) -> Path:
    """Path of the shipped ``<name>.schema.json``, e.g. ``schema_path("dead_letter")``."""
    return SCHEMA_DIR / f"{_check_name(name)}.schema.json"


def load_schema(name: str) -> dict[str, Any]:
    """The shipped JSON Schema ``name`` (one of `SCHEMA_NAMES`) as a dict."""
    path = schema_path(name)
    try:
        loaded: dict[str, Any] = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        raise StreamError(
            f"{path} is missing; reinstall stream_rnn or run python -m stream_rnn.stream.messages"
        ) from None
    return loaded


def write_schemas(directory: Path = SCHEMA_DIR) -> list[Path]:
    """Write every schema to ``directory`` (the package's own by default); return the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in SCHEMA_NAMES:
        path = directory / f"{name}.schema.json"
        path.write_bytes(orjson.dumps(build_schema(name), option=orjson.OPT_INDENT_2) + b"\n")
        paths.append(path)
    return paths


if __name__ == "__main__":
    for written in write_schemas():
        print(written)
