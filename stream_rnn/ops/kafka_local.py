"""A real single-node Apache Kafka broker (KRaft) for development, tests and CI, without Docker.

The official broker jars are resolved once from Maven Central with ``mvn`` (driven by
``deploy/kafka/pom.xml``) into a cache outside the repository, and the broker runs as a detached
``java`` process. Everything a broker owns lives in one data directory::

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

import base64
import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess  # noqa: S404 - we run java and mvn, always as argument lists
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from stream_rnn.ops.exceptions import (
    KafkaDataDirError,
    KafkaJarsError,
    KafkaStartError,
    KafkaStopError,
    OpsError,
    ToolNotFoundError,
)

__all__ = [
    "DEFAULT_KAFKA_VERSION",
    "KAFKA_HOME_ENV",
    "KAFKA_VERSION_ENV",
    "BrokerInfo",
    "BrokerStatus",
    "LocalKafka",
    "broker_properties",
    "default_kafka_version",
    "ensure_jars",
    "find_free_port",
    "find_java",
    "jars_dir",
    "jars_ready",
    "kafka_home",
    "new_cluster_id",
    "parse_java_major",
    "render_properties",
]

DEFAULT_KAFKA_VERSION = "4.4.0"
"""Broker version verified against kafka-python, aiokafka and faust-streaming (see README)."""
KAFKA_VERSION_ENV = "STREAM_RNN_KAFKA_VERSION"
KAFKA_HOME_ENV = "STREAM_RNN_KAFKA_HOME"
DEFAULT_KAFKA_HOME = Path("~/.cache/stream-rnn/kafka")
HOST = "127.0.0.1"
DEFAULT_HEAP = "512m"

JARS_TIMEOUT_S = 600.0
FORMAT_TIMEOUT_S = 120.0
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0
KILL_TIMEOUT_S = 10.0

DEPLOY_DIR = Path(__file__).resolve().parents[2] / "deploy" / "kafka"
_JARS_MARKER = ".stream-rnn-complete"
_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")
# Marker on the java command line: lets us tell our broker from an unrelated process that
# inherited a stale pid.
_DATA_DIR_PROP = "-Dstream_rnn.kafka.data_dir="

_log = logging.getLogger(__name__)
# Brokers started by this process, so that their exit status is reaped (no zombies that would
# still look alive to kill(pid, 0)).
_children: dict[int, subprocess.Popen[bytes]] = {}


# --------------------------------------------------------------------------- jars and java


def default_kafka_version() -> str:
    """Kafka version for new data dirs: ``$STREAM_RNN_KAFKA_VERSION`` or the tested default."""
    return os.environ.get(KAFKA_VERSION_ENV) or DEFAULT_KAFKA_VERSION


def kafka_home() -> Path:
    """Root of the jar cache: ``$STREAM_RNN_KAFKA_HOME`` or ``~/.cache/stream-rnn/kafka``."""
    return Path(os.environ.get(KAFKA_HOME_ENV) or DEFAULT_KAFKA_HOME).expanduser()


def jars_dir(version: str, home: Path | None = None) -> Path:
    """Directory that holds (or will hold) the broker jars of ``version``."""
    _check_version(version)
    return (home or kafka_home()) / version / "lib"


def jars_ready(version: str, home: Path | None = None) -> bool:
    """Whether :func:`ensure_jars` would return at once, without running Maven."""
    return (jars_dir(version, home) / _JARS_MARKER).is_file()


def parse_java_major(version_output: str) -> int | None:
    """Major Java version from ``java -version`` output (``1.8.0_x`` -> 8, ``17.0.2`` -> 17)."""
    match = re.search(r'version "(\d+)(?:\.(\d+))?', version_output)
    if match is None:
        return None
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


def _required_java(version: str) -> int:
    # Kafka 4 brokers need Java 17 (KIP-1013); 3.x brokers still run on Java 11.
    return 17 if int(version.split(".")[0]) >= 4 else 11


def find_java(version: str | None = None) -> str:
    """Path of a ``java`` able to run the broker of ``version``, from ``$JAVA_HOME`` or PATH.

    Raises:
        ToolNotFoundError: no java, or one older than the broker needs.
    """
    needed = _required_java(version or default_kafka_version())
    java_home = os.environ.get("JAVA_HOME")
    from_home = Path(java_home, "bin", "java") if java_home else None
    java = str(from_home) if from_home and from_home.is_file() else shutil.which("java")
    if java is None:
        raise ToolNotFoundError(
            f"java was not found (checked $JAVA_HOME and PATH); the local Kafka broker needs a "
            f"Java {needed}+ runtime. Install one (Debian/Ubuntu: `sudo apt-get install "
            f"openjdk-{needed}-jre-headless`, macOS: `brew install openjdk@{needed}`) or set "
            f"JAVA_HOME."
        )
    try:
        probe = subprocess.run(  # noqa: S603
            [java, "-version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise ToolNotFoundError(
            f"could not run `{java} -version`: {error}; fix or reinstall Java."
        ) from error
    major = parse_java_major(probe.stderr + probe.stdout)
    if major is None or major < needed:
        found = "an unrecognised version" if major is None else f"Java {major}"
        raise ToolNotFoundError(
            f"{java} is {found}, but Kafka {version or default_kafka_version()} needs Java "
            f"{needed}+. Install a newer JDK (Debian/Ubuntu: `sudo apt-get install "
            f"openjdk-{needed}-jre-headless`) and put it first on PATH or in JAVA_HOME."
        )
    return java


def _check_version(version: str) -> None:
    if not _VERSION_RE.match(version):
        raise KafkaJarsError(
            f"Kafka version {version!r} is not of the form MAJOR.MINOR.PATCH; pass e.g. "
            f"{DEFAULT_KAFKA_VERSION!r}."
        )
    if tuple(int(part) for part in version.split(".")[:2]) < (3, 9):
        raise KafkaJarsError(
            f"Kafka {version} is too old: the local broker formats its storage with "
            f"`--standalone` (KIP-853), which needs Kafka 3.9 or newer."
        )


def ensure_jars(
    version: str | None = None, *, home: Path | None = None, timeout: float = JARS_TIMEOUT_S
) -> Path:
    """Resolve the broker jars of ``version`` into the cache once and return their directory.

    The first call runs Maven (about 10-60 s, depending on the network); later calls return at
    once. Concurrent callers are serialised by a lock file, and a half-finished download is
    never mistaken for a complete one.

    Raises:
        ToolNotFoundError: java or mvn missing.
        KafkaJarsError: Maven failed or timed out.
    """
    version = version or default_kafka_version()
    lib = jars_dir(version, home)
    if jars_ready(version, home):
        return lib
    find_java(version)  # Maven itself needs Java; fail with the clearer message first.
    mvn = shutil.which("mvn")
    if mvn is None:
        raise ToolNotFoundError(
            f"mvn (Apache Maven) was not found on PATH; it is needed once to download the "
            f"Kafka {version} broker jars from Maven Central into {lib}. Install it "
            f"(Debian/Ubuntu: `sudo apt-get install maven`, macOS: `brew install maven`)."
        )
    pom = DEPLOY_DIR / "pom.xml"
    if not pom.is_file():
        raise KafkaJarsError(
            f"{pom} is missing; the local broker can only be set up from a source checkout of "
            f"stream_rnn (it carries deploy/kafka/)."
        )
    deadline = time.monotonic() + timeout
    lib.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(lib.parent / ".lock", deadline, KafkaJarsError):
        if jars_ready(version, home):  # another process finished it while we waited
            return lib
        partial = lib.parent / f"lib.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        command = [
            mvn, "-q", "-B", "-f", str(pom), "dependency:copy-dependencies",
            f"-Dkafka.version={version}", "-DincludeScope=runtime",
            f"-DoutputDirectory={partial}",
        ]  # fmt: skip
        _log.info("resolving Kafka %s jars into %s", version, lib)
        try:
            result = subprocess.run(  # noqa: S603
                command,
                capture_output=True,
                text=True,
                timeout=max(1.0, deadline - time.monotonic()),
                check=False,
            )
        except subprocess.TimeoutExpired as error:
            shutil.rmtree(partial, ignore_errors=True)
            raise KafkaJarsError(
                f"mvn did not finish resolving Kafka {version} within {timeout:.0f}s; check "
                f"that Maven Central is reachable (proxies go in ~/.m2/settings.xml) and retry."
            ) from error
        if result.returncode != 0 or not (partial / f"kafka_2.13-{version}.jar").is_file():
            shutil.rmtree(partial, ignore_errors=True)
            raise KafkaJarsError(
                f"mvn failed (exit {result.returncode}) to resolve "
                f"org.apache.kafka:kafka_2.13:{version}. Check that the version exists on Maven "
                f"Central and that it is reachable (proxies go in ~/.m2/settings.xml). "
                f"Command: {' '.join(command)}\n{_tail(result.stdout + result.stderr)}"
            )
        (partial / _JARS_MARKER).write_text(f"{version}\n")
        shutil.rmtree(lib, ignore_errors=True)
        partial.rename(lib)
    return lib


# --------------------------------------------------------------------------- pure helpers


def new_cluster_id() -> str:
    """A random cluster id in Kafka's format: 16 random bytes, URL-safe base64, no padding.

    Like Kafka's ``Uuid.randomUuid()`` it never starts with ``-``, which command lines would
    take for an option.
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode("ascii").rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def find_free_port(exclude: frozenset[int] = frozenset()) -> int:
    """A TCP port on 127.0.0.1 that is free right now (the OS picks; ``exclude`` is skipped)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port = int(sock.getsockname()[1])
        if port not in exclude:
            return port
    raise KafkaStartError("the OS kept handing out excluded ports; free some loopback ports.")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Java binds with SO_REUSEADDR, so sockets in TIME_WAIT do not block it; mirror that.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _port_open(port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def broker_properties(*, port: int, controller_port: int, kraft_dir: Path) -> dict[str, str]:
    """``server.properties`` of a single-node KRaft broker+controller bound to 127.0.0.1."""
    return {
        "process.roles": "broker,controller",
        "node.id": "1",
        "listeners": f"PLAINTEXT://{HOST}:{port},CONTROLLER://{HOST}:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://{HOST}:{port},CONTROLLER://{HOST}:{controller_port}",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        # Dynamic quorum (KIP-853), formatted with --standalone: the only voter is this node.
        "controller.quorum.bootstrap.servers": f"{HOST}:{controller_port}",
        "log.dirs": str(kraft_dir),
        "num.partitions": "1",
        "auto.create.topics.enable": "true",
        # One node: every internal topic must make do with one replica.
        "offsets.topic.replication.factor": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        # Fewer internal partitions and threads than production defaults (50 partitions, 8 I/O
        # threads): group coordinators load in a blink and the broker stays light on a 2-core
        # dev machine. Behaviour seen by clients is unchanged.
        "offsets.topic.num.partitions": "8",
        "transaction.state.log.num.partitions": "8",
        "num.network.threads": "2",
        "num.io.threads": "4",
        "num.recovery.threads.per.data.dir": "1",
        "group.initial.rebalance.delay.ms": "0",
        # The log cleaner looks for work every second instead of every 15 s: compacted topics
        # (the state topic) shed old records and tombstones promptly on a dev machine.
        "log.cleaner.backoff.ms": "1000",
        # After a crash (kill()), the restarted broker cannot register until the controller has
        # fenced its previous incarnation, i.e. one session timeout (default 9 s). Shorter
        # sessions keep chaos tests quick; heartbeats stay well inside them.
        "broker.heartbeat.interval.ms": "1000",
        "broker.session.timeout.ms": "4000",
    }


def render_properties(properties: dict[str, str]) -> str:
    """Java ``.properties`` text for ``properties`` (backslashes escaped, one key per line)."""
    lines = ["# Generated by stream_rnn.ops.kafka_local on every start; edits are overwritten."]
    lines += [f"{key}={value.replace(chr(92), chr(92) * 2)}" for key, value in properties.items()]
    return "\n".join(lines) + "\n"


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _file_tail(path: Path, lines: int = 20) -> str:
    try:
        return _tail(path.read_text(errors="replace"), lines)
    except OSError:
        return f"({path} does not exist)"


@contextlib.contextmanager
def _file_lock(path: Path, deadline: float, error: type[OpsError]) -> Iterator[None]:
    with open(path, "a") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise error(
                        f"{path} stayed locked by another stream-rnn process; wait for it to "
                        f"finish (or stop it) and retry."
                    ) from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _pid_alive(pid: int) -> bool:
    child = _children.get(pid)
    if child is not None:
        if child.poll() is None:
            return True
        del _children[pid]
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie still answers kill(pid, 0); /proc tells the truth on Linux
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def _wait_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _probe_cluster_id(port: int, timeout: float) -> str:
    """Cluster id reported by a metadata request to 127.0.0.1:port (raises if unanswered)."""
    if not _port_open(port, timeout=min(timeout, 1.0)):
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
        with _file_lock(self.data_dir / ".lock", deadline, KafkaStartError):
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
            accepting=pid is not None and state is not None and _port_open(state.port),
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
                f"{_tail(result.stdout + result.stderr)}"
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
            if not _port_free(port):
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
                    f"Last lines of {self.log_file}:\n{_file_tail(self.log_file)}\n"
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
                    f"{_file_tail(self.log_file)}"
                )
            time.sleep(0.25)

    def _signal_and_wait(self, pid: int, signum: signal.Signals, timeout: float) -> bool:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
        if _wait_exit(pid, timeout):
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
