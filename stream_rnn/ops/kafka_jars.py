"""The Kafka broker jars and the Java that runs them, for `stream_rnn.ops.kafka_local`.

The official broker jars are resolved once from Maven Central with ``mvn`` (driven by
``deploy/kafka/pom.xml``) into a cache outside the repository
(``$STREAM_RNN_KAFKA_HOME/<version>/lib``, by default ``~/.cache/stream-rnn/kafka``); a marker
file tells a complete download from a half-finished one.

Example::

    from stream_rnn.ops.kafka_jars import ensure_jars, find_java

    lib = ensure_jars("4.4.0")  # runs Maven the first time only
    java = find_java("4.4.0")   # a Java 17+ runtime, or a ToolNotFoundError saying what to install
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess  # noqa: S404 - we run java and mvn, always as argument lists
import time
from pathlib import Path

from stream_rnn.ops.exceptions import KafkaJarsError, ToolNotFoundError
from stream_rnn.ops.processes import file_lock, text_tail

__all__ = [
    "DEFAULT_KAFKA_HOME",
    "DEFAULT_KAFKA_VERSION",
    "DEPLOY_DIR",
    "JARS_TIMEOUT_S",
    "KAFKA_HOME_ENV",
    "KAFKA_VERSION_ENV",
    "default_kafka_version",
    "ensure_jars",
    "find_java",
    "jars_dir",
    "jars_ready",
    "kafka_home",
    "parse_java_major",
]

DEFAULT_KAFKA_VERSION = "4.4.0"
"""Broker version verified against kafka-python, aiokafka and faust-streaming (see README)."""
KAFKA_VERSION_ENV = "STREAM_RNN_KAFKA_VERSION"
KAFKA_HOME_ENV = "STREAM_RNN_KAFKA_HOME"
DEFAULT_KAFKA_HOME = Path("~/.cache/stream-rnn/kafka")
JARS_TIMEOUT_S = 600.0

DEPLOY_DIR = Path(__file__).resolve().parents[2] / "deploy" / "kafka"
_JARS_MARKER = ".stream-rnn-complete"
_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")

_log = logging.getLogger(__name__)


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
    with file_lock(lib.parent / ".lock", deadline, KafkaJarsError):
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
                f"Command: {' '.join(command)}\n{text_tail(result.stdout + result.stderr)}"
            )
        (partial / _JARS_MARKER).write_text(f"{version}\n")
        shutil.rmtree(lib, ignore_errors=True)
        partial.rename(lib)
    return lib
