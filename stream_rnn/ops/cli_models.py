"""``stream-rnn models``: the model registry and its announcements to running workers.

``publish`` registers a checkpoint as an immutable version, makes it production and announces
it on the compacted model-updates topic (signed with ``--update-key-file``); ``promote`` and
``rollback`` move the production pointer and announce the result (pointer and announcement
under the registry's lock); ``keygen`` makes keys; ``list`` and ``show``
inspect the registry. Defaults come from the settings (``$STREAM_RNN_REGISTRY``,
``$STREAM_RNN_BOOTSTRAP``, ``$STREAM_RNN_UPDATE_KEY_FILE``, ``$STREAM_RNN_MODEL_UPDATES_TOPIC``).

Example::

    stream-rnn models keygen --out ~/.config/stream-rnn      # update.key + update.pub
    stream-rnn models publish runs/lang-v2 --update-key-file ~/.config/stream-rnn/update.key
    stream-rnn models list
    stream-rnn models rollback --update-key-file ~/.config/stream-rnn/update.key
"""

from __future__ import annotations

import json
import time
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
    from stream_rnn.registry.updates import Announced, Announcer, Policy

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
            help="key that signs the announcement: Ed25519 private key (models keygen) or HMAC "
            "secret, chmod 600 (default: $STREAM_RNN_UPDATE_KEY_FILE; none: unsigned)",
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


def _announcer(
    bootstrap: str | None,
    topic: str | None,
    update_key_file: Path | None,
    no_announce: bool,
) -> Announcer | None:
    """None for --no-announce; else check the key file and the broker (creating the topic),
    so that a bad key or an unreachable broker fails before the registry changes."""
    from stream_rnn.registry.updates import Announcer, ensure_updates_topic, load_update_key

    if no_announce:
        return None
    settings = get_settings()
    key_path = update_key_file or settings.update_key_file
    announcer = Announcer(
        bootstrap=bootstrap or settings.bootstrap,
        topic=topic or settings.model_updates_topic,
        key=load_update_key(key_path) if key_path is not None else None,
        replication=settings.replication,
    )
    ensure_updates_topic(announcer.bootstrap, announcer.topic, replication=announcer.replication)
    return announcer


def move_production(
    registry: Registry, announcer: Announcer | None, policy: str, version: str | None
) -> str:
    """Promote ``version`` (None: roll back) and announce the result, under the registry's
    lock (`announce_production`); say what happened; return the production version."""
    from stream_rnn.registry.updates import announce_production

    def change(reg: Registry) -> str:
        previous = reg.production()
        if version is None:
            target = reg.rollback(policy=policy)
            _say(f"rolled back: production {previous} -> {target}")
        else:
            target = version
            reg.promote(version, policy=policy)
            if previous == version:
                _say(f"{version} is already production")
            else:
                _say(f"production: {previous or 'none'} -> {version}")
        return target

    done = announce_production(registry, change, policy=cast("Policy", policy), announcer=announcer)
    report_announced(done, announcer, policy)
    return done.version


def report_announced(done: Announced, announcer: Announcer | None, policy: str) -> None:
    """Say what `announce_production` did (or that nothing was announced)."""
    if announcer is None or done.update is None:
        _say("not announced (--no-announce): running workers keep their version")
        return
    signed = f"signed {done.update.alg}" if done.update.alg else "UNSIGNED"
    _say(
        f"announced {done.version} on {announcer.topic} at {announcer.bootstrap} (offset "
        f"{done.offset}, sequence number {done.update.seq}, {signed}, policy {policy})"
    )
    if announcer.key is None:
        _say(
            "warning: the announcement is unsigned; workers refuse it unless they run with "
            "--allow-unsigned-updates (pass --update-key-file)"
        )


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
    announcer = _announcer(bootstrap, topic, update_key_file, no_announce)
    registry = _open(registry_dir)
    manifest = registry.add(model_dir)
    _say(f"registered {manifest.version} in {registry.root}")
    move_production(registry, announcer, policy, manifest.version)


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
    announcer = _announcer(bootstrap, topic, update_key_file, no_announce)
    move_production(_open(registry_dir), announcer, policy, version)


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
    announcer = _announcer(bootstrap, topic, update_key_file, no_announce)
    move_production(_open(registry_dir), announcer, policy, None)


@models_group.command("keygen")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="directory for update.key (private, 0600) and update.pub (public)")  # fmt: skip
@click.option("--hmac", "hmac_secret", is_flag=True,
              help="write one shared HMAC secret (update.secret, 0600) instead of a key pair")  # fmt: skip
def keygen_cmd(out: Path, hmac_secret: bool) -> None:
    """Make announcement keys: an Ed25519 pair (publisher: update.key; workers: update.pub).

    Ed25519 suits workers on many machines or pods (a compromised worker cannot sign); an
    HMAC secret suits one trust domain (every holder can sign).
    """
    import base64
    import os
    import secrets

    from stream_rnn.registry.keys import generate_ed25519

    if hmac_secret:
        out.mkdir(parents=True, exist_ok=True)
        target = out / "update.secret"
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(base64.b64encode(secrets.token_bytes(32)).decode() + "\n")
        target.chmod(0o600)
        _say(f"wrote {target} (HMAC secret, 0600): give it to the publisher and every worker")
        return
    private, public = generate_ed25519(out)
    _say(f"wrote {private} (private, 0600): for `models publish/promote/rollback` and `retrain`")
    _say(f"wrote {public} (public): for workers, `stream-rnn worker --update-key-file {public}`")


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
