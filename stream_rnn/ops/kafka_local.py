"""A real single-node Apache Kafka broker (KRaft) for development, tests and CI, without Docker.

The official broker jars are resolved once from Maven Central with ``mvn`` (driven by
``deploy/kafka/pom.xml``) into a cache outside the repository (`stream_rnn.ops.kafka_jars`), and
the broker runs as a detached ``java`` process with the configuration of
`stream_rnn.ops.kafka_config`. Everything a broker owns lives in one data directory::

    <data_dir>/broker.json         version, ports and cluster id chosen when it was formatted
    <data_dir>/server.properties   regenerated on every start (see broker_properties())
    <data_dir>/log4j2.xml          copied from deploy/kafka/ on every start
    <data_dir>/broker.pid          pid of the running broker
    <data_dir>/kraft/              Kafka's log.dirs (metadata log and topic data)
    <data_dir>/logs/server.log     the broker's own log; logs/stdout.log has JVM output

Only 127.0.0.1 is ever bound, and every wait is bounded.

Example::

    from pathlib import Path
    from stream_rnn.ops.kafka_local import LocalKafka

    kafka = LocalKafka(Path("/tmp/kafka-dev"))
    info = kafka.start()        # formats the directory on first use, reuses it afterwards
    print(info.bootstrap)       # "127.0.0.1:<port>"
    kafka.restart()             # same port, same data
    kafka.stop()
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess  # noqa: S404 - we run java, always as argument lists
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from stream_rnn.ops.exceptions import KafkaDataDirError, KafkaStartError, KafkaStopError
from stream_rnn.ops.kafka_config import HOST, broker_properties, new_cluster_id, render_properties
from stream_rnn.ops.kafka_jars import DEPLOY_DIR, default_kafka_version, ensure_jars, find_java
from stream_rnn.ops.processes import (
    file_lock,
    file_tail,
    find_free_port,
    pid_alive,
    port_free,
    port_open,
    text_tail,
    wait_exit,
)

__all__ = [
    "DEFAULT_HEAP",
    "FORMAT_TIMEOUT_S",
    "KILL_TIMEOUT_S",
    "START_TIMEOUT_S",
    "STOP_TIMEOUT_S",
    "BrokerInfo",
    "BrokerStatus",
    "LocalKafka",
]

DEFAULT_HEAP = "512m"

FORMAT_TIMEOUT_S = 120.0
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0
KILL_TIMEOUT_S = 10.0

# Marker on the java command line: lets us tell our broker from an unrelated process that
# inherited a stale pid.
_DATA_DIR_PROP = "-Dstream_rnn.kafka.data_dir="

_log = logging.getLogger(__name__)

# Brokers started by this process, so that their exit status is reaped (no zombies that would
# still look alive to kill(pid, 0)).
_children: dict[int, subprocess.Popen[bytes]] = {}


def _pid_alive(pid: int) -> bool:
    child = _children.get(pid)
    if child is not None:
        if child.poll() is None:
            return True
        del _children[pid]
        return False
    return pid_alive(pid)


def _probe_cluster_id(port: int, timeout: float) -> str:
    """Cluster id reported by a metadata request to 127.0.0.1:port (raises if unanswered)."""
    if not port_open(port, timeout=min(timeout, 1.0)):
        raise ConnectionRefusedError(f"nothing accepts connections on {HOST}:{port} yet")
    from kafka.admin import KafkaAdminClient  # heavy import, needed only here

    wanted = {
        "bootstrap_servers": f"{HOST}:{port}",
        "client_id": "stream-rnn-kafka-probe",
        "request_timeout_ms": int(timeout * 1000),
        "bootstrap_timeout_ms": int(timeout * 1000),  # kafka-python >= 2.1
        "api_version_auto_timeout_ms": int(timeout * 1000),  # kafka-python 2.0
    }
    accepted = KafkaAdminClient.DEFAULT_CONFIG
    admin = KafkaAdminClient(**{key: value for key, value in wanted.items() if key in accepted})
    try:
        return str(admin.describe_cluster()["cluster_id"])
    finally:
        admin.close()


# --------------------------------------------------------------------------- the broker


@dataclass(frozen=True)
class BrokerInfo:
    """A running local broker, as returned by :meth:`LocalKafka.start`.

    Example::

        info = LocalKafka(Path("/tmp/k")).start()
        producer = KafkaProducer(bootstrap_servers=info.bootstrap)
    """

    bootstrap: str
    port: int
    controller_port: int
    pid: int
    version: str
    cluster_id: str
    data_dir: Path
    log_file: Path
    already_running: bool = False


@dataclass(frozen=True)
class BrokerStatus:
    """What :meth:`LocalKafka.status` found in a data directory.

    Example::

        status = LocalKafka(Path("/tmp/k")).status()
        if status.running:
            print(status.bootstrap, status.pid)
    """

    data_dir: Path
    formatted: bool
    running: bool
    accepting: bool
    pid: int | None
    bootstrap: str | None
    version: str | None
    log_file: Path


@dataclass(frozen=True)
class _DataDirState:
    """What ``broker.json`` records when a data dir is formatted."""

    version: str
    cluster_id: str
    port: int
    controller_port: int


class LocalKafka:
    """A single-node KRaft broker living in ``data_dir``; see the module docstring for layout.

    ``version`` defaults to the one the data dir was formatted with, else
    :func:`default_kafka_version`. ``heap`` is the JVM ``-Xmx``.

    Example::

        kafka = LocalKafka(tmp_path / "kafka")
        bootstrap = kafka.start().bootstrap
        try:
            ...  # produce / consume against bootstrap
        finally:
            kafka.stop()
    """

    def __init__(
        self,
        data_dir: Path | str,
        *,
        version: str | None = None,
        heap: str = DEFAULT_HEAP,
        home: Path | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.heap = heap
        self.home = home
        self._requested_version = version
        self.log_file = self.data_dir / "logs" / "server.log"
        self._stdout_file = self.data_dir / "logs" / "stdout.log"
        self._state_file = self.data_dir / "broker.json"
        self._pid_file = self.data_dir / "broker.pid"
        self._properties_file = self.data_dir / "server.properties"
        self._kraft_dir = self.data_dir / "kraft"

    @property
    def version(self) -> str:
        """Kafka version this broker runs (or would run on its first start)."""
        state = self._read_state()
        if state is not None:
            return state.version
        return self._requested_version or default_kafka_version()

    # ----------------------------------------------------------------------- public API

    def start(self, port: int | None = None, *, timeout: float = START_TIMEOUT_S) -> BrokerInfo:
        """Start the broker (formatting the data dir on first use) and wait until it serves.

        ``port`` is the client port; ``None`` keeps the recorded one, or picks a free one for
        a new data dir. A broker already running on this data dir is reported (with
        ``already_running=True``), never started twice.

        Raises:
            KafkaStartError: format/launch failed or the broker did not answer in ``timeout``.
            KafkaDataDirError: the data dir belongs to another setup or version.
            ToolNotFoundError, KafkaJarsError: java/mvn missing or jars unavailable.
        """
        # The one-time jar download has its own (longer) timeout; ``timeout`` covers the rest.
        ensure_jars(self.version, home=self.home)
        deadline = time.monotonic() + timeout
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with file_lock(self.data_dir / ".lock", deadline, KafkaStartError):
            state = self._read_state()
            if state is not None:
                self._check_requested_version(state)
            pid = self._running_pid()
            if pid is not None and state is not None:
                if port is not None and port != state.port:
                    raise KafkaStartError(
                        f"the broker in {self.data_dir} is already running on port "
                        f"{state.port}, not {port}; stop it first (`stream-rnn kafka down "
                        f"--data-dir {self.data_dir}`) to change its port."
                    )
                self._wait_ready(state, pid, deadline)
                return self._info(state, pid, already_running=True)
            state = self._prepare(state, port, deadline)
            pid = self._launch(state)
            try:
                self._wait_ready(state, pid, deadline)
            except BaseException:
                self._signal_and_wait(pid, signal.SIGKILL, KILL_TIMEOUT_S)
                self._pid_file.unlink(missing_ok=True)
                raise
            return self._info(state, pid, already_running=False)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> bool:
        """Stop the broker: SIGTERM, wait up to ``timeout``, then SIGKILL.

        Returns ``False`` if no broker was running. Data is kept.

        Raises:
            KafkaStopError: the process survived SIGKILL.
        """
        pid = self._running_pid()
        if pid is None:
            self._pid_file.unlink(missing_ok=True)
            return False
        if not self._signal_and_wait(pid, signal.SIGTERM, timeout):
            _log.warning("Kafka pid %d ignored SIGTERM for %.0fs; sending SIGKILL", pid, timeout)
            self._signal_and_wait(pid, signal.SIGKILL, KILL_TIMEOUT_S)
        self._pid_file.unlink(missing_ok=True)
        return True

    def kill(self) -> bool:
        """SIGKILL the broker at once, as a crash would (for chaos tests). Data is kept.

        Returns ``False`` if no broker was running.
        """
        pid = self._running_pid()
        if pid is None:
            self._pid_file.unlink(missing_ok=True)
            return False
        self._signal_and_wait(pid, signal.SIGKILL, KILL_TIMEOUT_S)
        self._pid_file.unlink(missing_ok=True)
        return True

    def restart(
        self, *, stop_timeout: float = STOP_TIMEOUT_S, start_timeout: float = START_TIMEOUT_S
    ) -> BrokerInfo:
        """Stop (if running) and start again on the same ports, keeping all data."""
        self.stop(stop_timeout)
        return self.start(timeout=start_timeout)

    def status(self) -> BrokerStatus:
        """Formatted? running? accepting connections? Never starts or stops anything."""
        state = self._read_state()
        pid = self._running_pid()
        return BrokerStatus(
            data_dir=self.data_dir,
            formatted=state is not None,
            running=pid is not None,
            accepting=pid is not None and state is not None and port_open(state.port),
            pid=pid,
            bootstrap=f"{HOST}:{state.port}" if state else None,
            version=state.version if state else None,
            log_file=self.log_file,
        )

    # ----------------------------------------------------------------------- internals

    def _read_state(self) -> _DataDirState | None:
        try:
            raw = json.loads(self._state_file.read_text())
            return _DataDirState(**raw)
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as error:
            raise KafkaDataDirError(
                f"{self._state_file} is unreadable ({error}); remove {self.data_dir} to start "
                f"from an empty broker."
            ) from error

    def _write_state(self, state: _DataDirState) -> None:
        temporary = self._state_file.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(asdict(state), indent=2) + "\n")
        temporary.replace(self._state_file)

    def _running_pid(self) -> int | None:
        try:
            pid = int(self._pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        if not _pid_alive(pid):
            return None
        try:
            command_line = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            return pid  # no /proc (macOS): trust the pid file
        return pid if f"{_DATA_DIR_PROP}{self.data_dir}" in command_line else None

    def _prepare(
        self, state: _DataDirState | None, port: int | None, deadline: float
    ) -> _DataDirState:
        """Check (or create and format) the data dir; return the state to launch with."""
        if state is not None:
            if port is not None and port != state.port:
                state = replace(state, port=port)  # only the client port may move
                self._check_ports_free(state)
                self._write_state(state)
            else:
                self._check_ports_free(state)
            return state
        if (self._kraft_dir / "meta.properties").exists():
            raise KafkaDataDirError(
                f"{self._kraft_dir} is formatted but {self._state_file} is missing, so its "
                f"ports and version are unknown; remove {self.data_dir} to start afresh."
            )
        version = self._requested_version or default_kafka_version()
        port = port or find_free_port()
        state = _DataDirState(
            version=version,
            cluster_id=new_cluster_id(),
            port=port,
            controller_port=find_free_port(exclude=frozenset({port})),
        )
        self._check_ports_free(state)
        lib = ensure_jars(version, home=self.home)
        shutil.rmtree(self._kraft_dir, ignore_errors=True)  # leftovers of a failed format
        self._write_config(state)
        command = [
            *self._java_command(lib, heap="256m"), "kafka.tools.StorageTool", "format",
            "--standalone", "--cluster-id", state.cluster_id, "--config", str(self._properties_file),
        ]  # fmt: skip
        try:
            result = subprocess.run(  # noqa: S603
                command,
                capture_output=True,
                text=True,
                timeout=max(1.0, min(FORMAT_TIMEOUT_S, deadline - time.monotonic())),
                check=False,
            )
        except subprocess.TimeoutExpired as error:
            raise KafkaStartError(
                f"formatting {self._kraft_dir} did not finish in time; see {self.log_file}."
            ) from error
        if result.returncode != 0:
            raise KafkaStartError(
                f"formatting {self._kraft_dir} failed (exit {result.returncode}); remove "
                f"{self.data_dir} and retry, and see {self.log_file}.\n"
                f"{text_tail(result.stdout + result.stderr)}"
            )
        self._write_state(state)
        return state

    def _check_requested_version(self, state: _DataDirState) -> None:
        if self._requested_version and self._requested_version != state.version:
            raise KafkaDataDirError(
                f"{self.data_dir} holds a Kafka {state.version} broker, not "
                f"{self._requested_version}; omit --version to reuse it, or pick another "
                f"data dir (or remove this one) for Kafka {self._requested_version}."
            )

    def _check_ports_free(self, state: _DataDirState) -> None:
        for name, port in (("client", state.port), ("controller", state.controller_port)):
            if not port_free(port):
                raise KafkaStartError(
                    f"{HOST}:{port} (the broker's {name} port) is already in use by another "
                    f"process; stop that process"
                    + (", or pass another --port." if name == "client" else ".")
                    + f" Data dir: {self.data_dir}"
                )

    def _write_config(self, state: _DataDirState) -> None:
        (self.data_dir / "logs").mkdir(parents=True, exist_ok=True)
        properties = broker_properties(
            port=state.port, controller_port=state.controller_port, kraft_dir=self._kraft_dir
        )
        self._properties_file.write_text(render_properties(properties))
        shutil.copyfile(DEPLOY_DIR / "log4j2.xml", self.data_dir / "log4j2.xml")

    def _java_command(self, lib: Path, *, heap: str) -> list[str]:
        return [
            find_java(self.version),
            f"-Xmx{heap}",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true",
            f"-Dkafka.logs.dir={self.data_dir / 'logs'}",
            f"-Dlog4j2.configurationFile={self.data_dir / 'log4j2.xml'}",
            f"{_DATA_DIR_PROP}{self.data_dir}",
            "-cp",
            f"{lib}/*",
        ]

    def _launch(self, state: _DataDirState) -> int:
        lib = ensure_jars(state.version, home=self.home)
        self._write_config(state)
        command = [
            *self._java_command(lib, heap=self.heap),
            "kafka.Kafka",
            str(self._properties_file),
        ]
        with open(self._stdout_file, "ab") as stdout:
            # Own session: Ctrl-C in the terminal that ran `kafka up` must not kill the broker.
            process = subprocess.Popen(  # noqa: S603
                command,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                start_new_session=True,
            )
        _children[process.pid] = process
        self._pid_file.write_text(f"{process.pid}\n")
        return process.pid

    def _wait_ready(self, state: _DataDirState, pid: int, deadline: float) -> None:
        last_error = "no answer yet"
        while True:
            if not _pid_alive(pid):
                child = _children.get(pid)
                code = child.returncode if child is not None else "unknown"
                raise KafkaStartError(
                    f"the Kafka broker (pid {pid}) exited during startup (exit code {code}). "
                    f"Last lines of {self.log_file}:\n{file_tail(self.log_file)}\n"
                    f"JVM output is in {self._stdout_file}."
                )
            remaining = deadline - time.monotonic()
            try:
                cluster_id = _probe_cluster_id(state.port, timeout=max(0.5, min(5.0, remaining)))
                if cluster_id == state.cluster_id:
                    return
                last_error = f"{HOST}:{state.port} answers for cluster {cluster_id}, expected {state.cluster_id}"
            except Exception as error:  # any failure just means: not ready yet
                last_error = f"{type(error).__name__}: {error}"
            if time.monotonic() >= deadline:
                raise KafkaStartError(
                    f"the Kafka broker (pid {pid}) did not answer on {HOST}:{state.port} in time "
                    f"(last error: {last_error}); the machine may be overloaded (retry with a "
                    f"longer --timeout) or the broker is stuck. See {self.log_file}:\n"
                    f"{file_tail(self.log_file)}"
                )
            time.sleep(0.25)

    def _signal_and_wait(self, pid: int, signum: signal.Signals, timeout: float) -> bool:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
        if wait_exit(pid, timeout, alive=_pid_alive):
            return True
        if signum == signal.SIGKILL:
            raise KafkaStopError(
                f"Kafka pid {pid} is still alive {timeout:.0f}s after SIGKILL (stuck in the "
                f"kernel?); check `ps -o stat -p {pid}` and the disk holding {self.data_dir}."
            )
        return False

    def _info(self, state: _DataDirState, pid: int, *, already_running: bool) -> BrokerInfo:
        return BrokerInfo(
            bootstrap=f"{HOST}:{state.port}",
            port=state.port,
            controller_port=state.controller_port,
            pid=pid,
            version=state.version,
            cluster_id=state.cluster_id,
            data_dir=self.data_dir,
            log_file=self.log_file,
            already_running=already_running,
        )
