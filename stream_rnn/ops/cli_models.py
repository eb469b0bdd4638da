"""``stream-rnn models``: the model registry and its announcements to running workers.

``publish`` registers a checkpoint as an immutable version, makes it production and announces
it on the compacted model-updates topic (signed with ``--update-key-file``); ``promote`` and
``rollback`` move the production pointer and announce the result; ``list`` and ``show``
inspect the registry. Defaults come from the settings (``$STREAM_RNN_REGISTRY``,
``$STREAM_RNN_BOOTSTRAP``, ``$STREAM_RNN_UPDATE_KEY_FILE``, ``$STREAM_RNN_MODEL_UPDATES_TOPIC``).

Example::

    stream-rnn models publish runs/lang-v2 --update-key-file ~/.config/stream-rnn/update.key
    stream-rnn models list
    stream-rnn models rollback --update-key-file ~/.config/stream-rnn/update.key
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from stream_rnn.ops.settings import get_settings
from stream_rnn.registry.versions import Registry, VersionInfo

if TYPE_CHECKING:
    from stream_rnn.registry.updates import Policy

console = Console(soft_wrap=True)


def _say(text: str) -> None:
    # paths, versions and metrics are data: never rich markup
    console.print(text, markup=False, highlight=False)


POLICY_CHOICE = click.Choice(["keep", "reset", "rewarm"])


def _registry_option(fn: Any) -> Any:
    return click.option(
        "--registry",
        "registry_dir",
        default=None,
        type=click.Path(file_okay=False, path_type=Path),
        help="registry directory (default: $STREAM_RNN_REGISTRY or runs/registry)",
    )(fn)


def _announce_options(fn: Any) -> Any:
    options = [
        click.option(
            "--bootstrap",
            default=None,
            metavar="HOST:PORT",
            help="Kafka bootstrap address (default: $STREAM_RNN_BOOTSTRAP or 127.0.0.1:9092)",
        ),
        click.option(
            "--topic",
            default=None,
            help="model-updates topic (default: $STREAM_RNN_MODEL_UPDATES_TOPIC or "
            "stream-rnn.model-updates)",
        ),
        click.option(
            "--policy",
            type=POLICY_CHOICE,
            default="rewarm",
            show_default=True,
            help="what workers do with live states: keep them (only for the same architecture "
            "and vocabulary, else rewarm), reset them, or rewarm them with the new model",
        ),
        click.option(
            "--update-key-file",
            default=None,
            type=click.Path(dir_okay=False, path_type=Path),
            help="HMAC key that signs the announcement, chmod 600 (default: "
            "$STREAM_RNN_UPDATE_KEY_FILE; none: unsigned)",
        ),
        click.option(
            "--no-announce",
            is_flag=True,
            help="only change the registry; workers are not told",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _open(registry_dir: Path | None) -> Registry:
    return Registry(registry_dir or get_settings().registry)


@dataclass(frozen=True)
class _Announcer:
    """Where and how to announce; built (key read, topic reachable) before the registry changes."""

    bootstrap: str
    topic: str
    policy: str
    key: bytes | None
    replication: int

    def announce(self, registry: Registry, version: str) -> None:
        from stream_rnn.registry.exceptions import AnnouncementError
        from stream_rnn.registry.updates import build_update, publish_update, sign

        update = build_update(registry.path(version), policy=cast("Policy", self.policy))
        if self.key is not None:
            update = sign(update, self.key)
        try:
            offset = publish_update(
                self.bootstrap, update, self.topic, replication=self.replication
            )
        except AnnouncementError as err:
            raise AnnouncementError(
                f"{err}. Production in {registry.root} is {version} already, but running "
                f"workers were not told: announce it again with `stream-rnn models promote "
                f"{version}`"
            ) from err
        signed = "signed" if self.key is not None else "UNSIGNED"
        _say(
            f"announced {version} on {self.topic} at {self.bootstrap} (offset {offset}, "
            f"{signed}, policy {self.policy})"
        )
        if self.key is None:
            _say(
                "warning: the announcement is unsigned; workers configured with an update key "
                "refuse it (pass --update-key-file)"
            )


def _announcer(
    bootstrap: str | None,
    topic: str | None,
    policy: str,
    update_key_file: Path | None,
    no_announce: bool,
) -> _Announcer | None:
    """None for --no-announce; else check the key file and the broker (creating the topic),
    so that a bad key or an unreachable broker fails before the registry changes."""
    from stream_rnn.registry.updates import ensure_updates_topic, load_update_key

    if no_announce:
        return None
    settings = get_settings()
    key_path = update_key_file or settings.update_key_file
    announcer = _Announcer(
        bootstrap=bootstrap or settings.bootstrap,
        topic=topic or settings.model_updates_topic,
        policy=policy,
        key=load_update_key(key_path) if key_path is not None else None,
        replication=settings.replication,
    )
    ensure_updates_topic(announcer.bootstrap, announcer.topic, replication=announcer.replication)
    return announcer


def _announce(announcer: _Announcer | None, registry: Registry, version: str) -> None:
    if announcer is None:
        _say("not announced (--no-announce): running workers keep their version")
    else:
        announcer.announce(registry, version)


@click.group("models")
def models_group() -> None:
    """Model registry: publish, list, show, promote, roll back (announced to workers)."""


@models_group.command("publish")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@_registry_option
@_announce_options
def publish_cmd(
    model_dir: Path,
    registry_dir: Path | None,
    bootstrap: str | None,
    topic: str | None,
    policy: str,
    update_key_file: Path | None,
    no_announce: bool,
) -> None:
    """Register the checkpoint MODEL_DIR, make it production and announce it to workers.

    The checkpoint is verified (sha256, tensors, finite values) and copied in unchanged;
    publishing the same weights twice is harmless.
    """
    announcer = _announcer(bootstrap, topic, policy, update_key_file, no_announce)
    registry = _open(registry_dir)
    manifest = registry.add(model_dir)
    previous = registry.promote(manifest.version)
    _say(f"registered {manifest.version} in {registry.root}")
    _say(f"production: {previous or 'none'} -> {manifest.version}")
    _announce(announcer, registry, manifest.version)


@models_group.command("promote")
@click.argument("version")
@_registry_option
@_announce_options
def promote_cmd(
    version: str,
    registry_dir: Path | None,
    bootstrap: str | None,
    topic: str | None,
    policy: str,
    update_key_file: Path | None,
    no_announce: bool,
) -> None:
    """Make the registered VERSION production and announce it (again, if it already is)."""
    announcer = _announcer(bootstrap, topic, policy, update_key_file, no_announce)
    registry = _open(registry_dir)
    previous = registry.promote(version)
    if previous == version:
        _say(f"{version} is already production")
    else:
        _say(f"production: {previous or 'none'} -> {version}")
    _announce(announcer, registry, version)


@models_group.command("rollback")
@_registry_option
@_announce_options
def rollback_cmd(
    registry_dir: Path | None,
    bootstrap: str | None,
    topic: str | None,
    policy: str,
    update_key_file: Path | None,
    no_announce: bool,
) -> None:
    """Make the previous production version production again and announce it."""
    announcer = _announcer(bootstrap, topic, policy, update_key_file, no_announce)
    registry = _open(registry_dir)
    current = registry.production()
    target = registry.rollback()
    _say(f"rolled back: production {current} -> {target}")
    _announce(announcer, registry, target)


@models_group.command("list")
@_registry_option
def list_cmd(registry_dir: Path | None) -> None:
    """Every registered version, oldest first; production is marked with *."""
    registry = _open(registry_dir)
    infos = registry.list()
    if not infos:
        _say(f"no versions in {registry.root}; add one with `stream-rnn models publish MODEL_DIR`")
        return
    table = Table(title=Text(f"model registry {registry.root}"))
    table.add_column("", no_wrap=True)
    table.add_column("version", no_wrap=True)
    table.add_column("created", no_wrap=True)
    table.add_column("parent", no_wrap=True)
    table.add_column("metrics", overflow="fold")
    for info in infos:
        cells = (
            "*" if info.is_production else "",
            info.version,
            _when(info.created_at),
            info.parent or "-",
            _metrics(info.metrics),
        )
        table.add_row(*(Text(cell) for cell in cells))
    console.print(table)


@models_group.command("show")
@click.argument("version")
@_registry_option
@click.option("--json", "as_json", is_flag=True, help="the whole record as one JSON object")
def show_cmd(version: str, registry_dir: Path | None, as_json: bool) -> None:
    """Manifest, metrics, data window and lineage of VERSION."""
    registry = _open(registry_dir)
    info = registry.show(version)
    lineage = registry.lineage(version)
    if as_json:
        click.echo(json.dumps(_record(info, lineage), indent=2))
        return
    cfg = info.manifest.model_config
    vocab = info.manifest.vocab
    rows = [
        ("version", info.version + ("  (production)" if info.is_production else "")),
        ("path", str(info.path)),
        ("created", _when(info.created_at)),
        ("added", _when(info.added_at)),
        ("lineage", " <- ".join(lineage)),
        ("model", ", ".join(f"{k}={v}" for k, v in cfg.items())),
        ("vocabulary", f"{len(vocab.get('itos', []))} tokens, level {vocab.get('level')}"),
        ("labels", ", ".join(info.manifest.labels) if info.manifest.labels else "-"),
        ("weights sha256", info.manifest.weights_sha256),
        ("data window", json.dumps(info.data_window) if info.data_window else "-"),
        ("metrics", _metrics(info.metrics) or "-"),
        ("training", json.dumps(info.manifest.training) if info.manifest.training else "-"),
    ]
    for name, value in rows:
        console.print(f"[bold]{name:>15}[/bold]  {escape(value)}", highlight=False)


def _record(info: VersionInfo, lineage: list[str]) -> dict[str, Any]:
    return {
        "version": info.version,
        "path": str(info.path),
        "is_production": info.is_production,
        "created_at": info.created_at,
        "added_at": info.added_at,
        "parent": info.parent,
        "lineage": lineage,
        "data_window": info.data_window,
        "metrics": info.metrics,
        "manifest": info.manifest.to_dict(),
    }


def _when(stamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp)) if stamp else "-"


def _metrics(metrics: dict[str, Any]) -> str:
    def fmt(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else json.dumps(value)

    return " ".join(f"{k}={fmt(v)}" for k, v in sorted(metrics.items()))
