"""The worker's commit protocol without faust or Kafka: every step, every failure, in microseconds."""

from __future__ import annotations

import pytest

from stream_rnn.stream.commit import (
    EXIT_SOFTWARE,
    EXIT_TEMPFAIL,
    CommitProtocol,
    ProtocolError,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _protocol(exactly_once: bool = True, **kw: float) -> tuple[CommitProtocol, Clock]:
    clock = Clock()
    return CommitProtocol(exactly_once=exactly_once, interval_s=0.1, clock=clock, **kw), clock


def test_events_below_the_committed_offset_or_already_processed_are_dropped() -> None:
    p, _ = _protocol()
    p.assigned({0: 100, 1: 0})
    assert not p.accept(0, 99)  # committed by the previous owner: fetched again
    assert p.accept(0, 100) and p.accept(1, 0)
    assert not p.accept(2, 5)  # not ours
    p.processed(0, 100)
    assert not p.accept(0, 100)  # a duplicate delivery
    assert p.accept(0, 103)  # gaps are fine (compaction, transaction markers)


def test_a_commit_carries_the_offsets_after_the_last_processed_events() -> None:
    p, clock = _protocol()
    p.assigned({0: 0, 1: 0})
    assert not p.due()  # nothing processed
    p.processed(0, 4)
    p.processed(1, 9)
    p.processed(0, 7)
    assert not p.due()  # the interval has not passed
    clock.now += 0.1
    assert p.due()
    plan = p.begin()
    assert plan.offsets == {0: 8, 1: 10}
    assert not p.due() and p.pending == {}
    p.processed(0, 8)  # the next micro-batch, while the commit is in flight
    p.succeeded(plan)
    assert p.floor == {0: 8, 1: 10} and p.pending == {0: 9}


def test_one_commit_at_a_time() -> None:
    p, _ = _protocol()
    p.assigned({0: 0})
    p.processed(0, 1)
    plan = p.begin()
    with pytest.raises(ProtocolError, match="one commit at a time"):
        p.begin()
    p.succeeded(plan)
    with pytest.raises(ProtocolError, match="not the one in flight"):
        p.succeeded(plan)


def test_exactly_once_never_retries_a_failed_transaction() -> None:
    p, _ = _protocol()
    p.assigned({0: 0})
    p.processed(0, 5)
    plan = p.begin()
    decision = p.failed(plan, ConnectionError("broker gone"))
    assert decision.exits and decision.exit_code == EXIT_TEMPFAIL and decision.abort
    assert "aborted" in decision.message and "broker gone" in decision.message


def test_a_fenced_worker_exits_and_says_why() -> None:
    p, _ = _protocol()
    p.assigned({3: 0})
    p.processed(3, 0)
    decision = p.failed(p.begin(), RuntimeError("ProducerFenced"), fenced=True)
    assert decision.exit_code == EXIT_TEMPFAIL and decision.abort
    assert "another worker owns partitions [3]" in decision.message
    assert p.lost(RuntimeError("x"), fenced=True).abort


def test_at_least_once_retries_with_backoff_then_exits() -> None:
    p, clock = _protocol(exactly_once=False, max_attempts=3, backoff_s=0.5)
    p.assigned({0: 0})
    p.processed(0, 1)
    clock.now += 1
    first = p.failed(p.begin(), OSError("down"))
    assert not first.exits and first.retry_in_s == 0.5
    assert p.pending == {0: 2}  # kept for the next attempt
    p.processed(0, 6)  # a newer offset supersedes it
    assert p.pending == {0: 7}
    assert not p.due() and not p.ready()  # backing off
    clock.now += 0.5
    assert p.due()
    second = p.failed(p.begin(), OSError("down"))
    assert second.retry_in_s == 1.0
    clock.now += 1.0
    third = p.failed(p.begin(), OSError("down"))
    assert third.exits and third.exit_code == EXIT_TEMPFAIL and not third.abort
    assert "3 checkpoints in a row failed" in third.message


def test_success_resets_the_failure_count() -> None:
    p, clock = _protocol(exactly_once=False, max_attempts=2)
    p.assigned({0: 0})
    p.processed(0, 1)
    clock.now += 1
    assert not p.failed(p.begin(), OSError("x")).exits
    clock.now += 1
    p.succeeded(p.begin())
    assert p.failures == 0 and p.commits == 1
    p.processed(0, 2)
    clock.now += 1
    assert not p.failed(p.begin(), OSError("x")).exits


def test_revocation_mid_commit_drops_the_partition_and_its_offsets() -> None:
    p, clock = _protocol(exactly_once=False)
    p.assigned({0: 0, 1: 0})
    p.processed(0, 3)
    p.processed(1, 3)
    clock.now += 1
    plan = p.begin()
    p.revoked([1])  # the rebalance lands while the commit is in flight
    decision = p.failed(plan, OSError("x"))
    assert not decision.exits
    assert p.pending == {0: 4}  # partition 1 is its new owner's to redo
    assert not p.accept(1, 4)
    with pytest.raises(ProtocolError, match="not owned"):
        p.processed(1, 5)


def test_an_engine_crash_aborts_under_exactly_once_and_commits_nothing_either_way() -> None:
    eo, _ = _protocol()
    alo, _ = _protocol(exactly_once=False)
    for p in (eo, alo):
        p.assigned({0: 0})
        p.processed(0, 9)
        decision = p.crashed(RuntimeError("boom"))
        assert decision.exit_code == EXIT_SOFTWARE and "boom" in decision.message
        assert "dead-lettered" in decision.message and p.in_flight is None
    assert eo.crashed(RuntimeError("x")).abort and not alo.crashed(RuntimeError("x")).abort


def test_extra_work_makes_a_commit_due_without_offsets() -> None:
    p, clock = _protocol()
    p.assigned({0: 0})
    clock.now += 1
    assert not p.due() and p.due(extra=True)  # e.g. retention deleted keys: tombstones
    assert p.begin().offsets == {}


@pytest.mark.parametrize("bad", [{"interval_s": 0.0}, {"max_attempts": 0}])
def test_bad_settings_are_refused(bad: dict[str, float]) -> None:
    args: dict[str, float] = {"interval_s": 1.0, **bad}
    with pytest.raises(ValueError, match="must be"):
        CommitProtocol(exactly_once=True, **args)  # type: ignore[arg-type]
