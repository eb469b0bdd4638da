"""Dead-letter reason codes: why an input message went to the dead-letter topic.

`Reason` is the type of a code, `REASONS` maps each code to what it means. Both the errors
(`stream_rnn.stream.exceptions.Rejected`) and the wire schemas (`stream_rnn.stream.messages`)
use them, so they live apart from either.

>>> REASONS["bad_version"]
"'v' is not 1, the only schema version this worker understands"
"""

from __future__ import annotations

from typing import Literal

__all__ = ["REASONS", "Reason"]

Reason = Literal[
    "not_json",
    "not_object",
    "missing_field",
    "extra_field",
    "wrong_type",
    "bad_version",
    "missing_key",
    "unknown_token",
    "token_out_of_range",
    "oversized",
    "unknown_key",
    "bad_value",
]
REASONS: dict[Reason, str] = {
    "not_json": "the value is not UTF-8 JSON (or is empty, truncated, or a tombstone)",
    "not_object": "the value is JSON but not an object (an array, string, number, ...)",
    "missing_field": "a required field is absent (v, type, token, n)",
    "extra_field": "the object has a field its event type does not define",
    "wrong_type": "a field has the wrong JSON type (true is not an integer, 1.0 is not a token id)",
    "bad_version": "'v' is not 1, the only schema version this worker understands",
    "missing_key": "the Kafka message has no key (or an empty or non-UTF-8 one)",
    "unknown_token": "a string token is not in the model's vocabulary (and unknowns are rejected); "
    "in a chunk, the detail names the token's index",
    "token_out_of_range": "an integer token is not a valid input id 1..len(vocab)-1; in a chunk, "
    "the detail names the token's index",
    "oversized": "the value is longer than the worker's max_bytes (it was not parsed), or a "
    "'tokens' chunk holds more tokens than the worker's max_chunk_tokens",
    "unknown_key": "a control event for a key that has no state (decided by the engine)",
    "bad_value": "a field has the right type but a value out of range, or 'type' is unknown",
}
