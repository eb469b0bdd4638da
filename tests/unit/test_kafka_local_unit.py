"""Pure parts of the local broker: properties, ports, ids, tool checks, data-dir bookkeeping.

None of these start Java or Maven; fake ``java``/``mvn`` scripts stand in where a program must
be found on PATH.
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from stream_rnn.ops.exceptions import (
    KafkaDataDirError,
    KafkaJarsError,
    KafkaStartError,
    ToolNotFoundError,
)
from stream_rnn.ops.kafka_cli import EXIT_NOT_RUNNING, kafka_group
from stream_rnn.ops.kafka_config import broker_properties, new_cluster_id, render_properties
from stream_rnn.ops.kafka_jars import (
    DEFAULT_KAFKA_VERSION,
    KAFKA_VERSION_ENV,
    ensure_jars,
    find_java,
    jars_dir,
    parse_java_major,
)
from stream_rnn.ops.kafka_local import LocalKafka
from stream_rnn.ops.processes import find_free_port


def _fake_program(directory: Path, name: str, script: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def bare_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty directory as the whole PATH, with JAVA_HOME unset: no java, no mvn."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.delenv(KAFKA_VERSION_ENV, raising=False)
    return bin_dir


@pytest.fixture
def cached_jars(tmp_path: Path) -> Iterator[Path]:
    """A jar cache that looks complete, so nothing needs Maven."""
    home = tmp_path / "kafka-home"
    lib = jars_dir(DEFAULT_KAFKA_VERSION, home)
    lib.mkdir(parents=True)
    (lib / ".stream-rnn-complete").write_text(DEFAULT_KAFKA_VERSION)
    yield home


def _parse_properties(text: str) -> dict[str, str]:
    pairs = [line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#")]
    return {key: value for key, value in pairs}


def test_properties_describe_a_single_node_kraft_broker_on_loopback(tmp_path: Path) -> None:
    props = broker_properties(port=19092, controller_port=19093, kraft_dir=tmp_path / "kraft")
    assert props["process.roles"] == "broker,controller"
    assert props["node.id"] == "1"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093"
    assert props["controller.quorum.bootstrap.servers"] == "127.0.0.1:19093"
    assert props["log.dirs"] == str(tmp_path / "kraft")
    for key in (
        "offsets.topic.replication.factor",
        "transaction.state.log.replication.factor",
        "transaction.state.log.min.isr",
        "num.partitions",
    ):
        assert props[key] == "1", key
    assert props["group.initial.rebalance.delay.ms"] == "0"
    assert props["auto.create.topics.enable"] == "true"
    # Nothing may listen beyond loopback.
    hosts = re.findall(r"//([^:]+):", props["listeners"] + props["advertised.listeners"])
    assert set(hosts) == {"127.0.0.1"}
    # Heartbeats must fit inside the session, or the broker fences itself.
    assert int(props["broker.heartbeat.interval.ms"]) * 2 <= int(props["broker.session.timeout.ms"])


def test_rendered_properties_parse_back_and_escape_backslashes() -> None:
    props = {"a.b": "1", "log.dirs": r"C:\kafka\data"}
    text = render_properties(props)
    assert text.startswith("#")
    parsed = _parse_properties(text)
    assert parsed["a.b"] == "1"
    assert parsed["log.dirs"] == r"C:\\kafka\\data"


def test_free_ports_are_bindable_and_honour_exclusions() -> None:
    first = find_free_port()
    second = find_free_port(exclude=frozenset({first}))
    assert first != second
    for port in (first, second):
        assert 1024 <= port <= 65535
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_cluster_ids_match_kafkas_uuid_format() -> None:
    ids = {new_cluster_id() for _ in range(500)}
    assert len(ids) == 500
    for cluster_id in ids:
        assert re.fullmatch(r"[A-Za-z0-9_-]{22}", cluster_id)
        assert not cluster_id.startswith("-")
        raw = base64.urlsafe_b64decode(cluster_id + "==")
        assert len(raw) == 16
        assert raw[6] >> 4 == 4  # a version-4 (random) UUID, as Kafka's Uuid.randomUuid()


@pytest.mark.parametrize(
    ("output", "major"),
    [
        ('openjdk version "17.0.15" 2025-04-15', 17),
        ('openjdk version "21" 2023-09-19', 21),
        ('java version "1.8.0_292"', 8),
        ('openjdk version "11.0.2" 2019-01-15', 11),
        ("something else entirely", None),
    ],
)
def test_java_versions_are_parsed(output: str, major: int | None) -> None:
    assert parse_java_major(output) == major


def test_missing_java_says_what_to_install(bare_path: Path) -> None:
    with pytest.raises(ToolNotFoundError) as error:
        find_java()
    message = str(error.value)
    assert "java was not found" in message
    assert "openjdk-17" in message and "JAVA_HOME" in message


def test_too_old_java_is_refused_with_the_needed_version(bare_path: Path) -> None:
    _fake_program(bare_path, "java", "echo 'openjdk version \"11.0.2\" 2019-01-15' >&2")
    with pytest.raises(ToolNotFoundError, match=r"Java 11.*needs Java 17\+"):
        find_java("4.4.0")


def test_java_home_wins_over_path(
    bare_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_program(bare_path, "java", "echo 'openjdk version \"11.0.2\"' >&2")
    home_java = _fake_program(tmp_path / "jdk" / "bin", "java", "echo 'openjdk version \"21\"' >&2")
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "jdk"))
    assert find_java() == str(home_java)


def test_missing_maven_says_what_to_install(bare_path: Path, tmp_path: Path) -> None:
    _fake_program(bare_path, "java", "echo 'openjdk version \"17.0.15\"' >&2")
    with pytest.raises(
        ToolNotFoundError, match=r"mvn \(Apache Maven\) was not found.*apt-get install maven"
    ):
        ensure_jars(DEFAULT_KAFKA_VERSION, home=tmp_path / "empty-home")


def test_failing_maven_is_reported_with_its_output(bare_path: Path, tmp_path: Path) -> None:
    _fake_program(bare_path, "java", "echo 'openjdk version \"17.0.15\"' >&2")
    _fake_program(bare_path, "mvn", "echo '[ERROR] Could not resolve dependencies'; exit 1")
    home = tmp_path / "home"
    with pytest.raises(KafkaJarsError, match=r"exit 1(.|\n)*Could not resolve dependencies"):
        ensure_jars("4.4.0", home=home)
    assert not jars_dir("4.4.0", home).exists(), "a failed download must not look cached"
    assert not list((home / "4.4.0").glob("lib.partial-*"))


def test_cached_jars_need_neither_java_nor_maven(bare_path: Path, cached_jars: Path) -> None:
    assert ensure_jars(DEFAULT_KAFKA_VERSION, home=cached_jars) == jars_dir(
        DEFAULT_KAFKA_VERSION, cached_jars
    )


@pytest.mark.parametrize("version", ["4.4", "latest", "4.4.0; rm -rf /", "3.8.1"])
def test_bad_or_unsupported_versions_are_refused(version: str, tmp_path: Path) -> None:
    with pytest.raises(KafkaJarsError, match=re.escape(version)):
        ensure_jars(version, home=tmp_path)


def test_busy_client_port_is_reported_before_anything_starts(
    bare_path: Path, cached_jars: Path, tmp_path: Path
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        kafka = LocalKafka(tmp_path / "data", home=cached_jars)
        with pytest.raises(
            KafkaStartError, match=rf"127\.0\.0\.1:{port} .* already in use.*--port"
        ):
            kafka.start(port=port, timeout=5)
    assert not (tmp_path / "data" / "broker.json").exists()


def test_empty_data_dir_status(tmp_path: Path) -> None:
    status = LocalKafka(tmp_path / "nothing-here").status()
    assert (status.formatted, status.running, status.accepting) == (False, False, False)
    assert status.pid is None and status.bootstrap is None


def _record_state(data_dir: Path, version: str = "4.4.0", port: int = 19092) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    state = {
        "version": version,
        "cluster_id": new_cluster_id(),
        "port": port,
        "controller_port": port + 1,
    }
    (data_dir / "broker.json").write_text(json.dumps(state))


def _exited_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait(timeout=10)
    return process.pid


@pytest.mark.parametrize(
    "pid_source", [_exited_pid, os.getpid], ids=["exited-process", "alive-but-not-a-broker"]
)
def test_stale_pid_file_is_not_a_running_broker(
    tmp_path: Path, pid_source: Callable[[], int]
) -> None:
    data_dir = tmp_path / "data"
    _record_state(data_dir)
    (data_dir / "broker.pid").write_text(f"{pid_source()}\n")
    kafka = LocalKafka(data_dir)
    status = kafka.status()
    assert status.formatted and not status.running
    assert status.bootstrap == "127.0.0.1:19092"
    assert kafka.stop() is False  # and, above all, it signalled nobody
    assert not (data_dir / "broker.pid").exists()


def test_other_version_on_a_formatted_dir_is_refused(
    bare_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "data"
    _record_state(data_dir, version="4.3.1")
    home = tmp_path / "home"
    for version in ("4.3.1", "4.4.0"):
        lib = jars_dir(version, home)
        lib.mkdir(parents=True)
        (lib / ".stream-rnn-complete").write_text(version)
    with pytest.raises(KafkaDataDirError, match=r"holds a Kafka 4\.3\.1 broker, not 4\.4\.0"):
        LocalKafka(data_dir, version="4.4.0", home=home).start(timeout=5)


def test_formatted_dir_without_our_record_is_refused(
    bare_path: Path, cached_jars: Path, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    (data_dir / "kraft").mkdir(parents=True)
    (data_dir / "kraft" / "meta.properties").write_text("node.id=1\n")
    with pytest.raises(KafkaDataDirError, match=r"broker\.json is missing.*remove"):
        LocalKafka(data_dir, home=cached_jars).start(timeout=5)


def test_corrupt_record_is_reported(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "broker.json").write_text("{not json")
    with pytest.raises(KafkaDataDirError, match="unreadable"):
        LocalKafka(data_dir).status()


def test_cli_status_and_down_on_an_empty_dir(tmp_path: Path) -> None:
    runner = CliRunner()
    status = runner.invoke(kafka_group, ["status", "--data-dir", str(tmp_path / "d")])
    assert status.exit_code == EXIT_NOT_RUNNING
    assert "not formatted, not running" in status.output
    down = runner.invoke(kafka_group, ["down", "--data-dir", str(tmp_path / "d")])
    assert down.exit_code == 0
    assert "was not running" in down.output


def test_cli_up_turns_errors_into_a_clean_message(bare_path: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        kafka_group, ["up", "--data-dir", str(tmp_path / "d"), "--version", "not-a-version"]
    )
    assert result.exit_code == 1
    assert (
        "Error: Kafka version 'not-a-version' is not of the form MAJOR.MINOR.PATCH" in result.output
    )
    assert "Traceback" not in result.output
