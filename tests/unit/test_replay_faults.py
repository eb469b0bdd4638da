"""Fault injection of ``stream-rnn replay``: the ``--fault`` grammar, the plan's checks, malformed
messages placed in the schedule, the injector's scheduling (with a fake target), the report.

No broker here: the live faults are exercised in tests/integration/test_replay_faults_broker.py.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from stream_harness import make_model

from stream_rnn.engine.engine import Engine
from stream_rnn.ops import workers
from stream_rnn.ops.cli import cli
from stream_rnn.ops.processes import ManagedProcess
from stream_rnn.registry.checkpoint import load_checkpoint
from stream_rnn.replay.analysis import analyse
from stream_rnn.replay.exceptions import ReplayError
from stream_rnn.replay.faults import (
    MALFORMED,
    Fault,
    PlanContext,
    Trigger,
    check_plan,
    fault_check,
    fault_markers,
    inject_malformed,
    malformed_records,
    parse_fault,
    parse_faults,
    workers_check,
)
from stream_rnn.replay.injector import FaultInjector
from stream_rnn.replay.inproc import InprocOptions, run_inproc
from stream_rnn.replay.report import write_report
from stream_rnn.replay.result import FaultRecord
from stream_rnn.replay.schedule import Schedule, Timing, answer_expected, build_schedule

KAFKA2 = PlanContext(kafka=True, workers=2, duration=60.0)


# ------------------------------------------------------------------------------- grammar
@pytest.mark.parametrize(
    ("spec", "kind", "arg", "when"),
    [
        ("kill@40%", "kill", None, Trigger(fraction=0.4)),
        ("kill:2@40%", "kill", "worker-2", Trigger(fraction=0.4)),
        ("KILL:worker-3@12s", "kill", "worker-3", Trigger(seconds=12.0)),
        ("restart@2.5s", "restart", None, Trigger(seconds=2.5)),
        ("add:extra_1@100%", "add", "extra_1", Trigger(fraction=1.0)),
        ("remove@0%", "remove", None, Trigger(fraction=0.0)),
        ("publish:runs/v2@30%", "publish", "runs/v2", Trigger(fraction=0.3)),
        ("publish:m-abc@x@30%", "publish", "m-abc@x", Trigger(fraction=0.3)),
        ("malformed@20%", "malformed", None, Trigger(fraction=0.2)),
    ],
)
def test_faults_parse(spec: str, kind: str, arg: str | None, when: Trigger) -> None:
    fault = parse_fault(spec, order=3)
    assert (fault.kind, fault.arg, fault.when, fault.order) == (kind, arg, when, 3)
    assert fault.active == (kind != "malformed")


def test_fault_arguments_have_defaults_and_units() -> None:
    assert parse_fault("malformed@20%").count == len(MALFORMED) == 10
    assert parse_fault("malformed:25@20%").count == 25
    assert parse_fault("broker-restart@60%").down_s == 2.0
    assert parse_fault("broker-restart:5@60%").down_s == 5.0
    assert parse_fault("broker-restart:0.5s@60%").down_s == 0.5


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("kill", "say when it fires after '@'"),
        ("@40%", "say when it fires after '@'"),
        ("explode@40%", "unknown kind 'explode'"),
        ("kill@40", "neither P% nor Ss (a unit is required)"),
        ("kill@-5%", "neither P% nor Ss"),
        ("kill@150%", "150% is more than all the messages"),
        ("kill:@40%", "nothing after ':'"),
        ("kill:bad name@40%", "'bad name' is no worker name"),
        ("publish@30%", "publish needs the model"),
        ("malformed:0@10%", "a whole number from 1 to 10000"),
        ("malformed:2.5@10%", "a whole number from 1 to 10000"),
        ("malformed:many@10%", "'many' is not a number"),
        ("broker-restart:999@10%", "the broker may stay down 0 to 300 s"),
    ],
)
def test_bad_faults_are_refused_saying_what_to_write(spec: str, message: str) -> None:
    with pytest.raises(ReplayError) as err:
        parse_fault(spec)
    assert message in str(err.value)
    assert "KIND[:ARG]@WHEN" in str(err.value)  # and how to write one


# ------------------------------------------------------------------------------- the plan
def test_the_plan_names_the_worker_each_fault_acts_on() -> None:
    specs = ["kill@10%", "restart@20%", "remove:1@30%", "add@40%", "restart@50%", "kill:3@60%"]
    faults = check_plan(parse_faults(specs), KAFKA2)
    assert [f.worker for f in faults] == [
        "worker-2",  # the newest running one
        "worker-2",  # the last one stopped
        "worker-1",
        "worker-3",  # the next free name
        "worker-1",
        "worker-3",
    ]
    assert [f.order for f in faults] == list(range(6))


@pytest.mark.parametrize(
    ("specs", "ctx", "message"),
    [
        (["kill@10%"], PlanContext(kafka=True), "pass --workers N"),
        (["broker-restart@10%"], PlanContext(kafka=False), "give --to kafka"),
        (["publish:v@10%"], PlanContext(kafka=True, workers=1, fixed_model=True), "--registry"),
        (["restart@10%"], KAFKA2, "no worker was stopped before it"),
        (["kill:2@10%", "restart:1@20%"], KAFKA2, "worker-1 was not stopped"),
        (["kill:7@10%"], KAFKA2, "worker-7 does not run by then"),
        (["add:1@10%"], KAFKA2, "a worker named worker-1 exists already"),
        (["kill@10%", "kill@20%"], KAFKA2, "leave no worker running"),
        (["kill@50%", "restart@40%"], KAFKA2, "give them in the order they should fire"),
        (["kill@20s", "restart@10s"], KAFKA2, "give them in the order they should fire"),
        (["kill@61s"], KAFKA2, "lasts 60.0 s"),
        (["malformed@5s"], PlanContext(kafka=True, fast=True), "use P%"),
    ],
)
def test_plans_the_replay_cannot_carry_out_are_refused(
    specs: list[str], ctx: PlanContext, message: str
) -> None:
    with pytest.raises(ReplayError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_plan(parse_faults(specs), ctx)


def test_in_process_replays_take_malformed_messages_and_kill_then_restart_is_fine() -> None:
    assert check_plan(parse_faults(["malformed@50%"]), PlanContext(kafka=False))
    plan = check_plan(parse_faults(["kill@10%", "kill@20%", "restart@30%"]), KAFKA2)
    assert [f.worker for f in plan] == ["worker-2", "worker-1", "worker-1"]
    # time and share triggers are ordered separately: a time may come between shares
    assert check_plan(parse_faults(["kill@10%", "restart@5s", "add@20%"]), KAFKA2)


# ------------------------------------------------------------------------------- malformed
@pytest.fixture
def schedule(tmp_path: Path) -> tuple[Schedule, Any]:
    model_dir, data, _ = make_model(tmp_path, "next-token", 10)
    model, manifest = load_checkpoint(model_dir)
    built = build_schedule(data, level="char", timing=Timing(rate=100.0), seed=2)
    return built, (model, manifest)


def test_malformed_messages_take_their_place_in_the_schedule(
    schedule: tuple[Schedule, Any],
) -> None:
    before, _ = schedule
    n = len(before.events)
    late = round(before.duration * 0.8, 2)  # seconds: well after the half
    faults = check_plan(
        parse_faults(["malformed:3@0%", "malformed:12@50%", f"malformed@{late}s"]),
        PlanContext(kafka=True, duration=before.duration),
    )
    after, placed = inject_malformed(before, faults)
    assert len(after.events) == n + 3 + 12 + 10
    half = -(-n // 2)
    assert placed[0] == (0, 3)
    assert placed[1] == (half + 3, 12)  # after half of the data's messages
    first, count = placed[2]
    assert count == 10 and after.events[first].t == late
    assert after.events[first - 1].t < late <= after.events[first + count].t
    # the data's own messages keep their order, and every sequence still starts at its token
    assert [e for e in after.events if e.kind != "raw"] == before.events
    for i, seq in enumerate(after.sequences):
        first_event = after.events[seq.first]
        assert (first_event.kind, first_event.seq, first_event.pos) == ("token", i, 0)
    injected = [e for e in after.events if e.kind == "raw"]
    reasons = Counter(e.expect for e in injected)
    # mixed kinds, in turn: 3 = the first three, 12 = all ten and two more, 10 = all ten
    want = {reason: 2 for reason, _, _ in MALFORMED}
    assert reasons == {**want, "not_json": 4, "not_object": 4, "missing_field": 3}
    keys = [e.key for e in injected if e.key is not None]
    assert len(set(keys)) == len(keys)  # each a key of its own ...
    assert not set(keys) & {e.key for e in before.events}  # ... that the data never uses
    assert all(answer_expected(after, tokens=False)[first : first + count])
    assert after.keys == before.keys and after.tokens == before.tokens
    assert "25 malformed messages injected by --fault" in after.notes


def test_every_malformed_kind_comes_back_as_the_dead_letter_it_names(
    schedule: tuple[Schedule, Any],
) -> None:
    before, (model, manifest) = schedule
    faults = check_plan(
        parse_faults(["malformed:20@30%"]), PlanContext(kafka=False, duration=before.duration)
    )
    after, placed = inject_malformed(before, faults)
    fast = Schedule(after.events, after.sequences, after.source, Timing(fast=True), after.notes)
    result = run_inproc(fast, Engine(model, manifest), options=InprocOptions(fast=True))
    analysis = analyse(
        fast, result, task="next-token", load=lambda v: (model, manifest), markers=[]
    )
    assert analysis.dead_letters == Counter({reason: 2 for reason, _, _ in MALFORMED})
    assert analysis.dead_letters == analysis.expected_dead_letters
    assert analysis.passed, [(c.name, c.detail) for c in analysis.checks]

    (record,) = malformed_records(faults, placed, result.sent_at, wall0=1000.0)
    assert record.status == "done" and record.at is not None
    assert record.wall == pytest.approx(1000.0 + record.at)
    assert record.markers == [(record.at, "20 malformed")]
    assert "20 malformed messages" in record.detail and "token_out_of_range" in record.detail


# ------------------------------------------------------------------------------- injector
class FakeTarget:
    """Records what it was asked to do; ``fail`` names a kind that raises."""

    def __init__(self, fail: str | None = None, hold: threading.Event | None = None) -> None:
        self.done: list[str] = []
        self.fail = fail
        self.hold = hold

    def apply(self, fault: Fault, mark: Callable[[str], None], halted: Callable[[], bool]) -> str:
        mark(f"{fault.kind} begins")
        if self.hold is not None:
            while not self.hold.wait(0.01):
                if halted():
                    raise ReplayError("halted")
        if fault.kind == self.fail:
            raise ReplayError(f"{fault.kind} went wrong")
        self.done.append(fault.spec)
        mark(f"{fault.kind} done")
        return f"did {fault.spec}"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _wait(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def test_faults_fire_in_order_once_their_trigger_is_reached() -> None:
    faults = check_plan(parse_faults(["kill@10%", "malformed@20%", "restart@3s"]), KAFKA2)
    target, clock = FakeTarget(), Clock()
    injector = FaultInjector(faults, target, clock=clock, tick_s=0.005)
    assert [f.kind for f in injector.faults] == ["kill", "restart"]  # malformed: the schedule's
    injector.begin(clock.now, total=100)
    time.sleep(0.05)
    assert target.done == [] and not injector.busy()
    injector.sent(10)
    assert injector.busy()  # due: the replay must wait for it
    _wait(lambda: target.done == ["kill@10%"] and not injector.busy())
    injector.sent(100)  # everything sent; the restart waits for its time all the same
    time.sleep(0.05)
    assert target.done == ["kill@10%"] and not injector.busy()
    clock.now += 3.0
    assert injector.busy()
    _wait(lambda: len(target.done) == 2 and not injector.busy())
    records = injector.finish()
    assert [r.status for r in records] == ["done", "done"]
    kill, restart = records
    assert kill.at == 0.0 and restart.at == 3.0 and restart.done_at == 3.0
    assert kill.wall is not None and abs(kill.wall - time.time()) < 10
    assert restart.markers == [(3.0, "restart begins"), (3.0, "restart done")]
    assert kill.detail == "did kill@10%"
    assert fault_markers(records) == [  # moments within half a second share one marker
        (0.0, "kill begins + kill done"),
        (3.0, "restart begins + restart done"),
    ]
    check = fault_check(records)
    assert check.passed and check.detail == "2 of 2 faults done"


def test_a_fault_under_way_holds_the_replay_until_it_is_done() -> None:
    hold = threading.Event()
    faults = check_plan(parse_faults(["broker-restart@0%"]), KAFKA2)
    injector = FaultInjector(faults, FakeTarget(hold=hold), tick_s=0.005)
    injector.begin(time.monotonic(), total=10)
    _wait(lambda: injector.records[0].at is not None)
    injector.sent(10)
    time.sleep(0.05)
    assert injector.busy()  # under way
    hold.set()
    _wait(lambda: not injector.busy())
    assert injector.finish()[0].status == "done"


def test_a_failed_fault_skips_the_rest_and_fails_the_check() -> None:
    faults = check_plan(parse_faults(["kill@0%", "restart@0%", "add@0%"]), KAFKA2)
    target = FakeTarget(fail="restart")
    injector = FaultInjector(faults, target, tick_s=0.005)
    injector.begin(time.monotonic(), total=10)
    _wait(lambda: injector.records[1].status == "failed")
    _wait(lambda: not injector.busy())
    records = injector.finish()
    assert [r.status for r in records] == ["done", "failed", "skipped"]
    assert records[1].detail == "ReplayError: restart went wrong"
    assert records[2].detail == "not started: an earlier fault failed" and records[2].at is None
    check = fault_check(records)
    assert check.passed is False
    assert check.detail.startswith("1 of 3 faults done; restart@0%: failed (ReplayError: ")
    assert target.done == ["kill@0%"]


def test_owned_workers_that_exit_by_themselves_fail_their_check() -> None:
    assert workers_check([]).passed is True
    check = workers_check(["worker-1 (pid 7) exited by itself with status 70 at 3.0s"])
    assert check.passed is False and "status 70" in check.detail


def test_faults_the_replay_never_reached_are_skipped() -> None:
    faults = check_plan(parse_faults(["kill@50%", "restart@90%"]), KAFKA2)
    injector = FaultInjector(faults, FakeTarget(), tick_s=0.005)
    injector.begin(time.monotonic(), total=10)
    injector.sent(4)
    records = injector.finish(timeout=5)
    assert [r.status for r in records] == ["skipped", "skipped"]
    assert records[0].detail == "not started: the replay ended before its trigger"


def test_finish_leaves_a_fault_stuck_in_its_wait() -> None:
    faults = check_plan(parse_faults(["kill@0%"]), KAFKA2)
    injector = FaultInjector(faults, FakeTarget(hold=threading.Event()), tick_s=0.005)
    injector.begin(time.monotonic(), total=10)
    _wait(lambda: injector.busy())
    (record,) = injector.finish(timeout=5)
    assert record.status == "failed" and record.detail == "ReplayError: halted"


class ScriptHandle(ManagedProcess):
    """Stands in for a worker process: runs the Python code given as its first argument."""

    def __init__(self, args: list[str], port: int, log_path: Path, **kw: Any) -> None:
        super().__init__([sys.executable, "-c", args[0]], log_path, env=kw.get("env"))
        self.port = port

    def status(self) -> dict[str, Any] | None:
        return None


def test_workers_that_exit_by_themselves_are_started_again_up_to_a_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(workers, "WorkerHandle", ScriptHandle)
    group = workers.WorkerGroup(tmp_path / "logs")
    crash = ["import sys; sys.exit(70)"]
    try:
        first = group.start("worker-1", crash)
        first.handle.wait(30)
        assert group.replace_exited(crash, limit=1) == [(first, group.workers["worker-1"])]
        second = group.workers["worker-1"]
        assert second.pid != first.pid and first.handle.returncode == 70
        second.handle.wait(30)
        assert group.replace_exited(crash, limit=1) == [(second, None)]  # left down now
        assert group.workers == {} and group.stopped == [first, second]
        assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == [
            "worker-1-0.log", "worker-1-1.log",
        ]  # fmt: skip
        group.start("worker-2", ["import time; time.sleep(60)"])
        assert group.replace_exited(crash, limit=1) == []  # running: nothing to do
    finally:
        group.close()
    assert group.replace_exited(crash, limit=1) == []  # closed: nothing starts


# ------------------------------------------------------------------------------- report, CLI
def test_the_report_lists_the_faults_and_writes_faults_json(
    tmp_path: Path, schedule: tuple[Schedule, Any]
) -> None:
    before, (model, manifest) = schedule
    result = run_inproc(before, Engine(model, manifest), options=InprocOptions(fast=True))
    result.elapsed_s = 12.0  # as if replayed in time: the faults' moments fall inside the run
    result.faults = [
        FaultRecord("kill:2@40%", "kill", 0, "done", 1.5, 1e9, 9.25, "SIGKILL worker-2 (pid 7)",
                    [(1.5, "worker-2 SIGKILL"), (9.25, "takeover")]),
        FaultRecord("restart@90%", "restart", 1, detail="not started: the replay ended"),
    ]  # fmt: skip
    analysis = analyse(
        before, result, task="next-token", load=lambda v: (model, manifest),
        markers=fault_markers(result.faults),
    )  # fmt: skip
    analysis.checks.append(fault_check(result.faults))
    paths = write_report(tmp_path / "report", analysis, faults=result.faults)
    assert tmp_path / "report" / "faults.json" in paths
    saved = json.loads((tmp_path / "report" / "faults.json").read_text())
    assert saved[0]["at"] == 1.5 and saved[0]["markers"] == [[1.5, "worker-2 SIGKILL"],
                                                             [9.25, "takeover"]]  # fmt: skip
    assert saved[1]["status"] == "skipped" and saved[1]["at"] is None
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Faults injected" in md
    assert "| kill:2@40% | done | 1.50 s | 9.25 s | SIGKILL worker-2 (pid 7) |" in md
    assert "| restart@90% | skipped | – | – |" in md
    assert "| worker-2 SIGKILL | 1.50 s |" in md  # on the plots too
    assert "| faults injected as planned | FAIL |" in md


def test_the_command_injects_malformed_messages_in_process(tmp_path: Path) -> None:
    model_dir, data, _ = make_model(tmp_path, "next-token", 12)
    report = tmp_path / "report"
    args = ["replay", "--data", str(data), "--model", str(model_dir), "--max"]
    done = CliRunner().invoke(cli, [*args, "--fault", "malformed:10@50%", "--report", str(report)])
    assert done.exit_code == 0, done.output
    md = (report / "report.md").read_text()
    assert "## Guarantee checks: all passed" in md
    assert "| faults injected as planned | pass | 1 of 1 faults done |" in md
    for reason, _, _ in MALFORMED:
        assert f"| {reason} | 1 | 1 |" in md
    (saved,) = json.loads((report / "faults.json").read_text())
    assert saved["status"] == "done" and saved["markers"][0][1] == "10 malformed"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--to", "kafka", "--fault", "kill@40%"], "pass --workers N"),
        (["--fault", "broker-restart@40%"], "give --to kafka"),
        (["--workers", "2"], "--workers starts workers of a live system: give --to kafka"),
        (["--to", "kafka", "--fault", "boom@1%"], "unknown kind 'boom'"),
    ],
)
def test_the_command_refuses_faults_it_cannot_inject_before_it_starts(
    tmp_path: Path, extra: list[str], message: str
) -> None:
    model_dir, data, _ = make_model(tmp_path, "next-token", 4)
    args = ["replay", "--data", str(data), "--model", str(model_dir)]
    done = CliRunner().invoke(cli, [*args, "--bootstrap", "127.0.0.1:9", *extra])
    assert done.exit_code != 0
    assert message in " ".join(done.output.split()), done.output


def test_the_command_says_what_to_pass_for_a_broker_or_a_registry_it_does_not_have(
    tmp_path: Path,
) -> None:
    model_dir, data, _ = make_model(tmp_path, "next-token", 4)
    args = ["replay", "--data", str(data), "--model", str(model_dir), "--to", "kafka"]
    runner = CliRunner()
    no_broker = runner.invoke(
        cli, [*args, "--kafka-data-dir", str(tmp_path / "nothing"), "--fault", "broker-restart@10%"]
    )
    text = " ".join(no_broker.output.split())
    assert no_broker.exit_code != 0
    assert f"no local Kafka broker runs with data in {tmp_path / 'nothing'}" in text
    assert "pass its --kafka-data-dir DIR" in text
    no_registry = runner.invoke(
        cli, [*args, "--registry", str(tmp_path / "none"), "--fault", "publish:v2@50%"]
    )
    text = " ".join(no_registry.output.split())
    assert no_registry.exit_code != 0 and "publishes into a registry: give --registry DIR" in text
    registry_dir = tmp_path / "registry"
    registry_dir.mkdir()
    unknown = runner.invoke(
        cli, [*args, "--registry", str(registry_dir), "--fault", "publish:m-nope@50%"]
    )
    text = " ".join(unknown.output.split())
    assert unknown.exit_code != 0 and "neither a checkpoint directory" in text
