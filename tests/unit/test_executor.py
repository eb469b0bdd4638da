"""The worker's engine executor: inline by default (the loop's thread), or a thread of its own."""

from __future__ import annotations

import asyncio
import threading

import pytest

from stream_rnn.ops.settings import Settings
from stream_rnn.stream.executor import InlineExecutor, engine_executor
from stream_rnn.stream.worker_options import WorkerOptions


def test_inline_executor_runs_on_the_callers_thread_through_run_in_executor() -> None:
    async def main() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        ident = await loop.run_in_executor(InlineExecutor(), threading.get_ident)
        return ident, threading.get_ident()

    ran_on, caller = asyncio.run(main())
    assert ran_on == caller


def test_inline_executor_hands_errors_to_the_awaiting_caller() -> None:
    def fail() -> None:
        raise ValueError("bad batch")

    async def main() -> None:
        await asyncio.get_running_loop().run_in_executor(InlineExecutor(), fail)

    with pytest.raises(ValueError, match="bad batch"):
        asyncio.run(main())


def test_own_thread_executor_runs_elsewhere() -> None:
    executor = engine_executor(own_thread=True)
    try:
        assert executor.submit(threading.get_ident).result() != threading.get_ident()
    finally:
        executor.shutdown()
    assert isinstance(engine_executor(own_thread=False), InlineExecutor)


def test_worker_option_comes_from_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    assert WorkerOptions.from_settings("m", Settings()).engine_thread is False
    monkeypatch.setenv("STREAM_RNN_ENGINE_THREAD", "1")
    assert WorkerOptions.from_settings("m", Settings()).engine_thread is True
