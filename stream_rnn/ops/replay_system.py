"""What ``stream-rnn replay --to kafka`` acts on when it owns workers or injects faults.

`ReplaySystem` starts the replay's own exactly-once workers (``--workers N``: one consumer group
of this run, a `stream_rnn.ops.workers.WorkerGroup`, logs in ``DIR/logs``), knows the local
broker (``--kafka-data-dir``, a `LocalKafka` that ``stream-rnn kafka up`` started) and the
registry the workers follow, and carries out each fault of the plan
(`stream_rnn.replay.injector.FaultTarget`): SIGKILL, restart, add or remove a worker and wait
for the rebalance; stop the broker and start it again on the same port and data; publish and
announce a model and wait until every owned worker serves it. Every wait is bounded.

It supervises its workers as a deployment would: one that exits by itself (no fault stopped
it) is started again under its name, up to ``MAX_RESTARTS`` times, so that the rest of the
replay is still answered and checked; each such exit is kept (`Exit`) for the report, which
fails a check on it. Leaving the ``with`` block stops the owned workers (SIGTERM, then
SIGKILL); a broker it restarted keeps running, as the one it found did.

Example::

    with ReplaySystem(setup, say=print) as system:
        system.start_workers(2)
        injector = FaultInjector(faults, system)
        result = run_kafka(schedule, ..., faults=injector)
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from stream_rnn.ops.exceptions import OpsError
from stream_rnn.ops.kafka_local import LocalKafka
from stream_rnn.ops.settings import Settings
from stream_rnn.ops.workers import WorkerGroup, WorkerGroupError
from stream_rnn.registry.exceptions import RegistryError
from stream_rnn.registry.keys import UpdateKey
from stream_rnn.registry.versions import Registry
from stream_rnn.replay.exceptions import ReplayError
from stream_rnn.replay.faults import Fault, worker_names
from stream_rnn.replay.kafka import ReplayTopics
from stream_rnn.replay.publish import publish_model
from stream_rnn.stream.exceptions import StreamError
from stream_rnn.stream.topics import ensure_topics

START_TIMEOUT_S = 120.0  # a worker: python, torch, faust, the group join
TAKEOVER_TIMEOUT_S = 90.0  # session timeout, rebalance, state restore
SWAP_TIMEOUT_S = 60.0
POLL_S = 0.2
SUPERVISE_S = 0.5
MAX_RESTARTS = 3  # per worker name: a worker that keeps crashing is left down after these


def new_run_id() -> str:
    """A name for this replay's group and topics: ``replay-YYYYmmdd-HHMMSS-xxxx``."""
    return f"replay-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def local_broker(data_dir: Path, bootstrap: str | None) -> LocalKafka:
    """The `LocalKafka` in ``data_dir``, checked to run (at ``bootstrap`` when given), for a
    broker-restart fault; `ReplayError` says what to pass otherwise."""
    kafka = LocalKafka(data_dir)
    try:
        status = kafka.status()
    except OpsError as err:
        raise ReplayError(f"--kafka-data-dir {data_dir}: {err}") from None
    hint = (
        "broker-restart restarts a local broker of `stream-rnn kafka up`: pass its "
        "--kafka-data-dir DIR (default $STREAM_RNN_KAFKA_DATA_DIR)"
    )
    if not status.running:
        raise ReplayError(f"no local Kafka broker runs with data in {data_dir}; {hint}")
    if bootstrap is not None and status.bootstrap != bootstrap:
        raise ReplayError(
            f"the local broker in {data_dir} serves {status.bootstrap}, but the replay talks "
            f"to {bootstrap}; {hint} of the broker at --bootstrap, or leave --bootstrap out"
        )
    return kafka


@dataclass(frozen=True)
class SystemSetup:
    """What the replay's workers serve and where, and what the faults may act on."""

    bootstrap: str
    topics: ReplayTopics
    group: str
    base_dir: Path  # logs go to base_dir/logs
    model_dir: Path | None = None  # the workers serve this fixed checkpoint, or
    registry: Registry | None = None  # the registry's production version, following
    updates_topic: str = "stream-rnn.model-updates"  # its announcements here
    key_file: Path | None = None
    key: UpdateKey | bytes | None = None
    broker: LocalKafka | None = None
    history: int | None = None


@dataclass(frozen=True)
class Exit:
    """An owned worker that exited by itself: when (epoch seconds), with what, and its
    replacement's pid (None: restarted too often already, left down)."""

    wall: float
    name: str
    pid: int
    status: int | None
    log: Path
    new_pid: int | None

    def describe(self, wall0: float) -> str:
        then = f"restarted (pid {self.new_pid})" if self.new_pid else "left down"
        return (
            f"{self.name} (pid {self.pid}) exited by itself with status {self.status} at "
            f"{self.wall - wall0:.1f}s, {then}; see {self.log}"
        )


class ReplaySystem:
    """The replay's workers, broker and registry (see the module docstring)."""

    def __init__(self, setup: SystemSetup, *, say: Callable[[str], None]) -> None:
        self.setup = setup
        self.say = say
        self.logs = setup.base_dir / "logs"
        self._worker_dir = Path(tempfile.mkdtemp(prefix="stream-rnn-replay-workers-"))
        self.group = WorkerGroup(
            self.logs,
            env={
                "STREAM_RNN_WORKER_DIR": str(self._worker_dir),
                "STREAM_RNN_MODEL_UPDATES_TOPIC": setup.updates_topic,
            },
        )
        self.partitions = 0
        self.exits: list[Exit] = []
        self._halt = threading.Event()
        self._supervisor = threading.Thread(
            target=self._supervise, name="replay-supervisor", daemon=True
        )

    def __enter__(self) -> ReplaySystem:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ set-up
    def worker_args(self) -> list[str]:
        s = self.setup
        if s.model_dir is not None:
            serve = ["--model", str(s.model_dir)]
        elif s.registry is not None:
            serve = ["--registry", str(s.registry.root)]
            serve += (
                ["--update-key-file", str(s.key_file)]
                if s.key_file
                else ["--allow-unsigned-updates"]  # the operator published unsigned too
            )
        else:
            raise ReplayError("the replay's workers need --model DIR or --registry DIR")
        t = s.topics
        return [
            *serve, "--bootstrap", s.bootstrap, "--group", s.group,
            "--topic", t.tokens, "--predictions-topic", t.predictions,
            "--dead-letter-topic", t.dead_letters, "--partitions", str(self.partitions),
            "--guarantee", "exactly-once", "--swap-policy", "keep",
            *(["--history", str(s.history)] if s.history is not None else []),
        ]  # fmt: skip

    def ensure_topics(self, partitions: int) -> int:
        """Create the stream topics if missing (``partitions`` for new ones); their count."""
        t = self.setup.topics
        settings = Settings(
            tokens_topic=t.tokens,
            predictions_topic=t.predictions,
            dead_letter_topic=t.dead_letters,
            partitions=partitions,
        )
        try:
            layout = ensure_topics(self.setup.bootstrap, settings)
        except StreamError as err:
            raise ReplayError(str(err)) from err
        self.partitions = layout.partitions
        return self.partitions

    def start_workers(self, n: int, partitions: int) -> None:
        """Start worker-1 .. worker-N and wait until they own every partition together."""
        self.ensure_topics(partitions)
        names = worker_names(n)
        for name in names:
            self.group.start(name, self.worker_args())
        try:
            self.group.wait_assigned(names, partitions=self.partitions, timeout=START_TIMEOUT_S)
        except WorkerGroupError as err:
            raise ReplayError(f"the replay's workers did not start: {err}") from None
        self._supervisor.start()
        for name in names:
            w = self.group.workers[name]
            self.say(
                f"{name}: pid {w.pid}, partitions {sorted(self.group.assigned([name]))}, status "
                f"http://127.0.0.1:{w.handle.port}/, metrics :{w.metrics_port}/metrics, log "
                f"{w.handle.log_path}"
            )

    def _supervise(self) -> None:
        while not self._halt.wait(SUPERVISE_S):
            for old, new in self.group.replace_exited(self.worker_args(), limit=MAX_RESTARTS):
                code = old.handle.returncode
                gone = Exit(time.time(), old.name, old.pid, code, old.handle.log_path,
                            None if new is None else new.pid)  # fmt: skip
                self.exits.append(gone)
                self.say(f"{old.name} (pid {old.pid}) exited by itself with status {code}; " + (
                    f"started again (pid {new.pid}), as a supervisor would"
                    if new is not None else f"left down after {MAX_RESTARTS} restarts"
                ) + f"; see {old.handle.log_path}")  # fmt: skip

    def close(self) -> None:
        """Stop supervising, then stop the owned workers; the broker stays as it is."""
        self._halt.set()
        if self._supervisor.is_alive():
            self._supervisor.join(10.0)
        for worker in list(self.group.workers.values()):  # exited since the last look
            if not worker.handle.alive():
                self.exits.append(Exit(time.time(), worker.name, worker.pid,
                                       worker.handle.returncode, worker.handle.log_path, None))  # fmt: skip
        self.group.close(self.say)
        shutil.rmtree(self._worker_dir, ignore_errors=True)

    # ------------------------------------------------------------------ FaultTarget
    def apply(self, fault: Fault, mark: Callable[[str], None], halted: Callable[[], bool]) -> str:
        if fault.kind == "kill" and fault.worker:
            return self._kill(fault.worker, mark, halted)
        if fault.kind == "remove" and fault.worker:
            return self._remove(fault.worker, mark, halted)
        if fault.kind in ("restart", "add") and fault.worker:
            return self._start(fault.worker, fault.kind, mark, halted)
        if fault.kind == "broker-restart":
            return self._broker_restart(fault.down_s, mark, halted)
        if fault.kind == "publish" and fault.arg:
            return self._publish(fault.arg, mark, halted)
        raise ReplayError(f"--fault {fault.spec}: nothing here carries it out")

    def _kill(self, name: str, mark: Callable[[str], None], halted: Callable[[], bool]) -> str:
        before = sorted(self.group.assigned([name]))
        pid = self.group.kill(name)
        mark(f"{name} SIGKILL")
        return f"SIGKILL {name} (pid {pid}, partitions {before}); " + self._covered(
            mark, halted, "takeover"
        )

    def _remove(self, name: str, mark: Callable[[str], None], halted: Callable[[], bool]) -> str:
        before = sorted(self.group.assigned([name]))
        started = time.monotonic()
        code = self.group.stop(name)
        mark(f"{name} removed")
        return (
            f"stopped {name} gracefully (partitions {before}, exit status {code} after "
            f"{time.monotonic() - started:.1f}s); " + self._covered(mark, halted, "rebalanced")
        )

    def _covered(self, mark: Callable[[str], None], halted: Callable[[], bool], label: str) -> str:
        """Wait until the running workers own every partition again."""
        names = sorted(self.group.workers)
        if not names:
            return "no worker left to take the partitions over"
        started = time.monotonic()
        try:
            self.group.wait_assigned(
                names, partitions=self.partitions, timeout=TAKEOVER_TIMEOUT_S, halted=halted,
                fail_on_exit=False,
            )  # fmt: skip
        except WorkerGroupError as err:
            raise ReplayError(
                f"{', '.join(names)} did not take every partition over: {err}"
            ) from None
        mark(label)
        return (
            f"{', '.join(names)} {'owns' if len(names) == 1 else 'own'} all {self.partitions} "
            f"partitions after {time.monotonic() - started:.1f}s"
        )

    def _start(
        self, name: str, kind: str, mark: Callable[[str], None], halted: Callable[[], bool]
    ) -> str:
        worker = self.group.start(name, self.worker_args())
        mark(f"{name} {'restarted' if kind == 'restart' else 'added'}")
        started = time.monotonic()
        try:
            self.group.wait_assigned(
                [name], partitions=self.partitions, every=False, timeout=START_TIMEOUT_S,
                fail_on_exit=False,
            )  # fmt: skip
            self.group.wait_assigned(
                sorted(self.group.workers), partitions=self.partitions,
                timeout=TAKEOVER_TIMEOUT_S, halted=halted, fail_on_exit=False,
            )  # fmt: skip
        except WorkerGroupError as err:
            raise ReplayError(f"{name} did not join the group: {err}") from None
        mark(f"{name} joined")
        verb = "restarted" if kind == "restart" else "started"
        return (
            f"{verb} {name} (pid {worker.pid}); it owns partitions "
            f"{sorted(self.group.assigned([name]))} after {time.monotonic() - started:.1f}s"
        )

    def _broker_restart(
        self, down_s: float, mark: Callable[[str], None], halted: Callable[[], bool]
    ) -> str:
        broker = self.setup.broker
        if broker is None:
            raise ReplayError("no local broker known: pass --kafka-data-dir DIR")
        old = broker.status().pid
        started = time.monotonic()
        try:
            if not broker.stop():
                raise ReplayError(f"the local broker in {broker.data_dir} was not running")
            mark("broker down")
            stopped = time.monotonic()
            while time.monotonic() - stopped < down_s and not halted():
                time.sleep(min(POLL_S, down_s))
        finally:
            try:  # always start it again, also when halted or when stopping failed halfway
                info = broker.start()
            except OpsError as err:
                raise ReplayError(
                    f"the local broker in {broker.data_dir} did not start again: {err}; start "
                    f"it with `stream-rnn kafka up --data-dir {broker.data_dir}`"
                ) from err
        mark("broker up")
        return (
            f"restarted the broker at {info.bootstrap} (pid {old} -> {info.pid}; down "
            f"{down_s:g}s, {time.monotonic() - started:.1f}s in all)"
        )

    def _publish(self, source: str, mark: Callable[[str], None], halted: Callable[[], bool]) -> str:
        s = self.setup
        if s.registry is None:
            raise ReplayError("publish needs --registry DIR")
        try:
            version = publish_model(
                s.registry, source, bootstrap=s.bootstrap, topic=s.updates_topic, key=s.key
            )
        except (RegistryError, OpsError) as err:
            raise ReplayError(f"publishing {source} failed: {err}") from err
        mark("publish")
        signed = "signed" if s.key is not None else "unsigned"
        where = (
            f"published {version} (production of {s.registry.root}; announced on "
            f"{s.updates_topic}, {signed})"
        )
        names = sorted(self.group.workers)
        if not names:
            return f"{where}; the workers are not the replay's: their predictions show the swap"
        started = time.monotonic()
        pending = set(names)
        while pending:
            for name in sorted(pending):
                worker = self.group.workers.get(name)
                status = worker.status() if worker is not None else None
                if worker is None or (status and status.get("model_version") == version):
                    pending.discard(name)
            if not pending:
                break
            if halted() or time.monotonic() - started > SWAP_TIMEOUT_S:
                raise ReplayError(
                    f"{', '.join(sorted(pending))} did not serve {version} within "
                    f"{SWAP_TIMEOUT_S:.0f}s of its announcement; see their logs in {self.logs}"
                )
            time.sleep(POLL_S)
        return f"{where}; served by {', '.join(names)} after {time.monotonic() - started:.1f}s"
