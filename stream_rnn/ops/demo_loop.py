"""What ``stream-rnn demo`` does to the live system while the replay streams through it.

`LoopController` runs on a thread of its own, on the replay's clock (`LoopProgress` starts it),
and at fractions of the replay's scheduled duration (`LoopPlan`):

1. **learning loop** — ``stream-rnn record`` archives what was streamed so far; v2 must also
   read text written with capitals, digits and punctuation that v1's vocabulary lacks, and a
   retrain from production's weights keeps production's vocabulary, so ``stream-rnn train``
   trains a new model (same architecture, its own vocabulary) on the recorded sequences plus
   written-style ones (`stream_rnn.train.synthetic.generate_written`); v1 and v2 are compared
   on the most recent recorded sequences, and ``stream-rnn models publish --policy rewarm``
   announces v2 (signed); every worker hot-swaps it, recomputing live states from their token
   history through v2's vocabulary;
2. **fault** — one worker is SIGKILLed (no revocation, no final commit); the survivor takes its
   partitions over, restoring their states, and exactly-once holds;
3. **recovery** — the killed worker is started again and rejoins the group.

Each step leaves ``(t, label)`` markers for the report's plots and an entry in `LoopOutcome`.
Steps the replay outlived are skipped and said so. The jobs run as child processes at a lower
priority (`LiveSystem.run_job`), so that training never holds this process's GIL while the
replay sends at its schedule.

Example::

    progress = LoopProgress(console)
    loop = LoopController(live, progress, LoopPlan(), duration=schedule.duration, say=print)
    loop.start()
    result = run_kafka(schedule, ..., progress=progress)
    outcome = loop.finish()
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from stream_rnn.ops.demo_stream import PARTITIONS, DemoError, LiveSystem
from stream_rnn.train.synthetic import WRITTEN_CHARS

SWAP_TIMEOUT_S = 60.0
TAKEOVER_TIMEOUT_S = 90.0
REJOIN_TIMEOUT_S = 120.0
TICK_S = 0.5


@dataclass(frozen=True)
class LoopPlan:
    """When the steps start (fractions of the replay's duration) and how the candidate trains."""

    retrain_at: float = 0.3
    kill_at: float = 0.6
    restart: bool = True
    victim: str = "worker-2"
    retrain_epochs: int = 3
    batch_size: int = 8
    hidden: int = 64  # v2's architecture: v1's (only the vocabulary changes)
    embed: int = 32
    seed: int = 0


@dataclass
class LoopOutcome:
    """What the steps did: markers for the report, and the facts for the summary."""

    markers: list[tuple[float, str]] = field(default_factory=list)
    recorded: int | None = None
    retrain: dict[str, Any] | None = None  # how v2 was trained and judged (`judge_v2`)
    new_version: str | None = None
    swapped: dict[str, float] = field(default_factory=dict)  # worker -> t it served the new one
    swap_pause_s: dict[str, float] = field(default_factory=dict)
    killed: dict[str, Any] | None = None  # name, pid, at, partitions, took_over_at
    restarted: dict[str, Any] | None = None  # name, pid, at, rejoined_at
    skipped: list[str] = field(default_factory=list)
    error: BaseException | None = None


class _Stopped(Exception):
    """The demo is ending: the controller leaves its step."""


class LoopProgress:
    """The replay's `stream_rnn.replay.result.Progress` on a rich console: sent and answered
    messages, and a line (`note`) with what each worker serves; also the replay's clock."""

    def __init__(self, console: Console) -> None:
        self.bars = Progress(
            TextColumn("{task.description:<9}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            console=console,
            transient=True,
        )
        self.started = threading.Event()
        self.abort: BaseException | None = None  # set by the controller when a step failed
        self.t0 = 0.0
        self.wall0 = 0.0
        self.total = 0
        self.sent = 0
        self._sent_task = self.bars.add_task("sent", total=None, info="", visible=False)
        self._answered_task = self.bars.add_task("answered", total=None, info="", visible=False)

    def start(self, total: int, expected: int) -> None:
        self.total = total
        self.bars.update(self._sent_task, total=total, visible=True)
        self.bars.update(self._answered_task, total=expected, visible=True)
        self.bars.start()
        self.t0 = time.monotonic()  # run_kafka's own start follows at once
        self.wall0 = time.time()
        self.started.set()

    def update(self, sent: int, answered: int) -> None:
        if self.abort is not None:  # raised in the replay's thread: it stops sending
            raise DemoError(f"the demo stops: {self.abort}") from self.abort
        self.sent = sent
        self.bars.update(self._sent_task, completed=sent)
        self.bars.update(self._answered_task, completed=answered)

    def note(self, text: str) -> None:
        self.bars.update(self._answered_task, info=text)

    def close(self) -> None:
        self.bars.stop()

    def elapsed(self) -> float:
        """Seconds since the replay started (its outputs' ``at`` clock)."""
        return time.monotonic() - self.t0

    @property
    def sending(self) -> bool:
        return self.sent < self.total


class LoopController(threading.Thread):
    """Runs the `LoopPlan` against ``live`` while the replay runs (see the module docstring)."""

    def __init__(
        self,
        live: LiveSystem,
        progress: LoopProgress,
        plan: LoopPlan,
        *,
        duration: float,
        say: Callable[[str], None],
        names: dict[str, str],
    ) -> None:
        super().__init__(name="demo-loop", daemon=True)
        self.live = live
        self.progress = progress
        self.plan = plan
        self.duration = duration
        self.say = say
        self.names = names  # model version -> short name (v1, v2) for the output
        self.outcome = LoopOutcome()
        self._halt = threading.Event()
        self._replay_done = threading.Event()

    # ------------------------------------------------------------------ the thread
    def run(self) -> None:
        try:
            while not self.progress.started.wait(TICK_S):
                if self._halt.is_set():
                    return
            self._learning_loop()
            self._fault()
            if self.plan.restart and self.outcome.killed is not None:
                self._recovery()
        except _Stopped:
            return
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            self.outcome.error = err
            self.progress.abort = err

    def finish(self, timeout: float = 60.0) -> LoopOutcome:
        """The replay is over: let the step under way end (within ``timeout``), skip the rest."""
        self._replay_done.set()
        self.join(timeout)
        if self.is_alive():
            self._halt.set()
            self.join(10.0)
            self.outcome.skipped.append(f"a step did not end within {timeout:.0f}s of the replay")
        return self.outcome

    def stop(self) -> None:
        """Leave whatever step is under way at the next tick (Ctrl-C, an error)."""
        self._halt.set()

    # ------------------------------------------------------------------ steps
    def _learning_loop(self) -> None:
        if not self._wait_for(self.plan.retrain_at, "the learning loop (record, train v2)"):
            return
        live, out, p = self.live, self.outcome, self.plan
        recorded = live.dir / "recorded.jsonl"
        at = self._now()
        self.say(f"{at:5.1f}s  stream-rnn record: what was streamed so far -> {recorded.name}")
        live.run_job(
            ["record", "--out", str(recorded), "--bootstrap", live.bootstrap,
             "--topic", live.topics.tokens, "--task", "next-token", "--open", "drop"],
            "record", tick=self._tick,
        )  # fmt: skip
        with recorded.open("rb") as fh:
            out.recorded = sum(1 for line in fh if line.strip())
        self._mark(at, f"recorded {out.recorded} seq.")
        data = write_v2_corpus(recorded, live.dir / "v2-data", seed=p.seed)
        self.say(
            f"{self._now():5.1f}s  recorded {out.recorded} sequences; v2 must also read text "
            f"written with {''.join(sorted(WRITTEN_CHARS))!r}, which v1's vocabulary lacks (a "
            "retrain from production's weights keeps it): stream-rnn train, a new model on "
            f"{data.recorded} recorded + {data.written} written-style sequences "
            f"({p.retrain_epochs} epochs)"
        )
        v2_dir = live.dir / "v2"
        live.run_job(
            ["train", "--data", str(data.train), "--valid", str(data.valid),
             "--task", "next-token", "--cell", "gru", "--hidden", str(p.hidden),
             "--embed", str(p.embed), "--epochs", str(p.retrain_epochs),
             "--batch-size", str(p.batch_size), "--lr", "3e-3", "--seed", str(p.seed),
             "--device", "cpu", "--out", str(v2_dir)],
            "train-v2", tick=self._tick,
        )  # fmt: skip
        v1 = next(v for v, n in self.names.items() if n == "v1")
        out.retrain = judge_v2(live.registry.path(v1), v2_dir, data)
        version = out.new_version = str(out.retrain["version"])
        self.names[version] = "v2"
        voc = out.retrain["vocabulary"]
        self.say(
            f"{self._now():5.1f}s  v2 = {version}: vocabulary {voc['v1']} -> {voc['v2']} tokens "
            f"({voc['new']} new, {voc['moved']} of {voc['shared']} shared characters with "
            f"other ids); held-out {out.retrain['reason']}; stream-rnn models publish "
            "(signed, policy rewarm: live states recomputed by v2 from their token history)"
        )
        live.publish(v2_dir, "rewarm", tick=self._tick)
        # the command ends once the broker acknowledged the announcement
        at = self._now()
        self._mark(at, "v2 announced")
        self.say(f"{at:5.1f}s  v2 published and announced")
        pending = set(live.workers)
        deadline = time.monotonic() + SWAP_TIMEOUT_S
        while pending:
            for name in sorted(pending):
                status = live.workers[name].status() if name in live.workers else None
                if status and status.get("model_version") == version:
                    out.swapped[name] = self._now()
                    swap = status.get("last_swap") or {}
                    if swap.get("pause_s") is not None:
                        out.swap_pause_s[name] = float(swap["pause_s"])
                    pending.discard(name)
            if time.monotonic() > deadline:
                raise DemoError(f"{', '.join(sorted(pending))} did not swap to {version} in time")
            self._tick()
        pauses = ", ".join(f"{n} {s * 1000:.0f} ms" for n, s in sorted(out.swap_pause_s.items()))
        self.say(f"{self._now():5.1f}s  every worker serves v2 (hot swap; pause {pauses})")

    def _fault(self) -> None:
        if not self._wait_for(self.plan.kill_at, "the SIGKILL of a worker"):
            return
        live, victim = self.live, self.plan.victim
        survivors = sorted(n for n in live.workers if n != victim)
        before = sorted(live.assigned([victim]))
        at = self._now()
        pid = live.kill(victim)
        self._mark(at, f"{victim} SIGKILL")
        self.outcome.killed = {"name": victim, "pid": pid, "at": at, "partitions": before}
        self.say(f"{at:5.1f}s  SIGKILL {victim} (pid {pid}, partitions {before})")
        self._until(
            lambda: len(live.assigned(survivors)) == PARTITIONS,
            TAKEOVER_TIMEOUT_S,
            f"{', '.join(survivors)} did not take over all {PARTITIONS} partitions",
        )
        took = self._now()
        self.outcome.killed["took_over_at"] = took
        self._mark(took, "takeover")
        self.say(
            f"{took:5.1f}s  {', '.join(survivors)} took over partitions {before} "
            f"({took - at:.1f}s after the kill: session timeout, restore)"
        )

    def _recovery(self) -> None:
        name = self.plan.victim
        if not self.progress.sending or self._replay_done.is_set():
            self.outcome.skipped.append(f"restart of {name}: the replay had ended")
            return
        at = self._now()
        worker = self.live.start_worker(name)
        self.say(f"{at:5.1f}s  restarting {name} (pid {worker.pid})")
        self._until(
            lambda: bool(self.live.assigned([name])),
            REJOIN_TIMEOUT_S,
            f"{name} did not rejoin the group",
        )
        joined = self._now()
        self.outcome.restarted = {"name": name, "pid": worker.pid, "at": at, "rejoined_at": joined}
        self._mark(joined, f"{name} rejoined")
        parts = sorted(self.live.assigned([name]))
        self.say(f"{joined:5.1f}s  {name} rejoined the group, partitions {parts}")

    # ------------------------------------------------------------------ helpers
    def _now(self) -> float:
        return self.progress.elapsed()

    def _mark(self, at: float, label: str) -> None:
        self.outcome.markers.append((at, label))

    def _wait_for(self, fraction: float, what: str) -> bool:
        """Wait for ``fraction`` of the replay's duration; False if the replay ended first."""
        while True:
            if self._replay_done.is_set():
                self.outcome.skipped.append(f"{what}: the replay had ended")
                return False
            if self._now() >= fraction * self.duration:
                return True
            self._tick()

    def _until(self, condition: Callable[[], bool], timeout: float, failure: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise DemoError(f"{failure} within {timeout:.0f}s; see {self.live.logs}")
            self._tick()

    def _tick(self) -> None:
        """Refresh the progress line, then sleep one tick; `_Stopped` once the demo ends."""
        if self._halt.is_set():
            raise _Stopped
        parts = []
        for name, worker in sorted(self.live.workers.items()):
            if not worker.handle.alive():
                raise DemoError(
                    f"{name} (pid {worker.pid}) exited by itself with status "
                    f"{worker.handle.returncode}; see {worker.handle.log_path}"
                )
            status = worker.status()
            if status is None:
                parts.append(f"{name} starting")
                continue
            version = str(status.get("model_version"))
            parts.append(
                f"{name} {self.names.get(version, version[:8])} {status.get('assigned') or []}"
            )
        self.progress.note(" | ".join(parts))
        if self._halt.wait(TICK_S):
            raise _Stopped


@dataclass(frozen=True)
class V2Data:
    """v2's corpus (JSONL files) and the recorded sequences it is judged on."""

    train: Path
    valid: Path
    holdout: list[Any]  # the most recent recorded sequences (Records), not trained on
    recorded: int  # recorded sequences trained or validated on
    written: int  # written-style sequences added


def write_v2_corpus(recorded: Path, out: Path, *, seed: int) -> V2Data:
    """v2's training and validation files in ``out``: the recorded sequences but the most
    recent 20 % (held out), and as many written-style ones (at least 100), 10 % of each kind
    to validate on."""
    from stream_rnn.train.data import read_records, write_records
    from stream_rnn.train.exceptions import DataError, RetrainError
    from stream_rnn.train.retrain import split_records
    from stream_rnn.train.synthetic import generate_written

    try:
        split = split_records(read_records(recorded), 0.2, valid=0.1, seed=seed)
    except (DataError, RetrainError) as err:
        raise DemoError(f"v2 cannot be trained on {recorded}: {err}") from err
    n = max(100, len(split.train) + len(split.valid))
    written = generate_written(n, seed=seed + 1000, min_len=24, max_len=72)
    random.Random(seed).shuffle(written)  # noqa: S311 - a data split, not a secret
    n_valid = max(1, n // 10)
    out.mkdir(parents=True, exist_ok=True)
    train, valid = out / "train.jsonl", out / "valid.jsonl"
    write_records(train, split.train + written[n_valid:])
    write_records(valid, split.valid + written[:n_valid])
    return V2Data(train, valid, split.holdout, len(split.train) + len(split.valid), n)


def judge_v2(v1_dir: Path, v2_dir: Path, data: V2Data) -> dict[str, Any]:
    """v2 against v1 on the held-out recorded sequences (next-token loss), and how their
    vocabularies differ: the summary's ``retrain`` entry."""
    from stream_rnn.registry.checkpoint import load_checkpoint
    from stream_rnn.train.retrain import compare, evaluate_records
    from stream_rnn.train.vocab import Vocab

    (m1, man1), (m2, man2) = load_checkpoint(v1_dir), load_checkpoint(v2_dir)
    v1_eval = evaluate_records(m1, man1, data.holdout)
    v2_eval = evaluate_records(m2, man2, data.holdout)
    verdict = compare("next-token", v2_eval, v1_eval, 0.0)
    voc1, voc2 = Vocab.from_dict(man1.vocab), Vocab.from_dict(man2.vocab)
    shared = set(voc1.itos) & set(voc2.itos)
    return {
        "decision": "published",
        "version": man2.version,
        "parent_version": None,  # a new model: fresh weights, its own vocabulary
        "vocabulary": {
            "v1": len(voc1),
            "v2": len(voc2),
            "new": len(set(voc2.itos) - set(voc1.itos)),
            "shared": len(shared),
            "moved": sum(voc1.stoi[t] != voc2.stoi[t] for t in shared),
        },
        "data": {"recorded": data.recorded, "written": data.written, "holdout": len(data.holdout)},
        "metric": verdict.metric,
        "candidate_metrics": {verdict.metric: verdict.candidate},
        "production_metrics": {verdict.metric: verdict.production},
        "better": verdict.better,
        "reason": verdict.describe().replace("production", "v1"),
    }
