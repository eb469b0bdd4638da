"""Publish a model while a replay (or the demo) streams: register it, make it production, and
announce it to the workers that follow the registry, as ``stream-rnn models publish`` does.

The model is either a checkpoint directory (added to the registry first) or a version already
in the registry (promoted). The announcement goes to the model-updates topic, signed when a key
is given; every worker that follows that topic hot-swaps the version.

Example::

    check_model_source(registry, "runs/v2")          # before the replay starts
    version = publish_model(registry, "runs/v2", bootstrap="127.0.0.1:9092",
                            topic="stream-rnn.model-updates", key=None, policy="keep")
"""

from __future__ import annotations

from pathlib import Path

from stream_rnn.registry.checkpoint import MANIFEST_FILE
from stream_rnn.registry.exceptions import RegistryError
from stream_rnn.registry.keys import UpdateKey, as_update_key
from stream_rnn.registry.updates import Announcer, Policy, announce_production
from stream_rnn.registry.versions import Registry, check_version_id
from stream_rnn.replay.exceptions import ReplayError


def _is_checkpoint(source: str) -> bool:
    return (Path(source) / MANIFEST_FILE).is_file()


def check_model_source(registry: Registry, source: str) -> None:
    """`ReplayError` unless ``source`` is a checkpoint directory or a version in ``registry``."""
    if _is_checkpoint(source):
        return
    try:
        check_version_id(source)
        registry.path(source)
    except RegistryError as err:
        raise ReplayError(
            f"publish:{source}: neither a checkpoint directory (no {MANIFEST_FILE} in it) nor "
            f"a version of the registry at {registry.root} ({err}); give a trained model's "
            "directory or a registered version"
        ) from None


def publish_model(
    registry: Registry,
    source: str,
    *,
    bootstrap: str,
    topic: str,
    key: UpdateKey | bytes | None,
    policy: Policy = "keep",
) -> str:
    """Register ``source`` (a checkpoint directory) or take it as a registered version, make it
    production and announce it on ``topic`` (signed with ``key`` if given); the version.

    Raises `RegistryError` (a bad checkpoint, an unknown version) or `AnnouncementError` (the
    broker did not take the announcement; production has changed all the same)."""
    if _is_checkpoint(source):
        version = registry.add(Path(source)).version
    else:
        version = check_version_id(source)
        registry.path(version)  # raises for an unknown version
    announcer = Announcer(bootstrap, topic, as_update_key(key) if key is not None else None)
    announce_production(
        registry, lambda reg: _promoted(reg, version, policy), policy=policy, announcer=announcer
    )
    return version


def _promoted(registry: Registry, version: str, policy: str) -> str:
    registry.promote(version, policy=policy)
    return version
