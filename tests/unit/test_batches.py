"""take_batches: bulk micro-batches from a queue, in order, bounded in size and wait."""

from __future__ import annotations

import asyncio

import pytest
from mode.utils.queues import FlowControlEvent, ThrowableQueue

from stream_rnn.stream.batches import consume_batches, take_batches


async def _collect(queue: asyncio.Queue[int], n: int, max_batch: int, wait: float) -> list:
    out: list[list[int]] = []
    seen = 0
    async for batch in take_batches(queue, max_batch, wait):
        out.append(batch)
        seen += len(batch)
        if seen >= n:
            break
    return out


def test_full_queue_gives_full_batches_in_order() -> None:
    async def main() -> list[list[int]]:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(2500):
            queue.put_nowait(i)
        return await _collect(queue, 2500, 1000, 0.05)

    batches = asyncio.run(main())
    assert [len(b) for b in batches] == [1000, 1000, 500]
    assert [x for b in batches for x in b] == list(range(2500))


def test_waits_up_to_max_wait_for_more_then_yields_a_short_batch() -> None:
    async def main() -> tuple[list[list[int]], float]:
        queue: asyncio.Queue[int] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def feed() -> None:
            for i in range(5):
                queue.put_nowait(i)
                await asyncio.sleep(0.01)

        feeder = asyncio.create_task(feed())
        started = loop.time()
        it = take_batches(queue, 100, 0.2)
        first = await anext(it)
        elapsed = loop.time() - started
        await feeder
        return [first], elapsed

    batches, elapsed = asyncio.run(main())
    # all five arrive within the 0.2 s window that opened with the first one
    assert batches == [[0, 1, 2, 3, 4]]
    assert 0.15 <= elapsed < 1.0


def test_zero_wait_yields_what_is_queued() -> None:
    async def main() -> list[list[int]]:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(3):
            queue.put_nowait(i)
        it = take_batches(queue, 100, 0.0)
        first = await anext(it)
        queue.put_nowait(3)
        return [first, await anext(it)]

    assert asyncio.run(main()) == [[0, 1, 2], [3]]


def test_no_item_lost_when_the_wait_times_out() -> None:
    async def main() -> list[int]:
        queue: asyncio.Queue[int] = asyncio.Queue()
        got: list[int] = []
        it = take_batches(queue, 1000, 0.002)
        for i in range(200):
            queue.put_nowait(i)
            if i % 7 == 0:
                await asyncio.sleep(0.003)  # let some batches time out mid-wait
            if not queue.empty():
                got += await anext(it)
        while len(got) < 200:
            got += await anext(it)
        return got

    assert asyncio.run(main()) == list(range(200))


def test_faust_queue_errors_surface() -> None:
    async def main() -> None:
        flow = FlowControlEvent(initially_suspended=False)
        queue: ThrowableQueue[int] = ThrowableQueue(flow_control=flow)
        queue.put_nowait(1)
        await queue.throw(RuntimeError("consumer crashed"))
        async for _ in take_batches(queue, 10, 0.01):
            pass

    with pytest.raises(RuntimeError, match="consumer crashed"):
        asyncio.run(main())


def test_a_closed_faust_channel_ends_the_batches() -> None:
    # faust stops an agent by throwing StopAsyncIteration into its channel's queue
    async def main() -> list[list[int]]:
        flow = FlowControlEvent(initially_suspended=False)
        queue: ThrowableQueue[int] = ThrowableQueue(flow_control=flow)
        queue.put_nowait(1)
        got = []
        async for batch in take_batches(queue, 10, 0.01):
            got.append(batch)
            await queue.throw(StopAsyncIteration())
        return got

    assert asyncio.run(main()) == [[1]]


@pytest.mark.parametrize(("max_batch", "wait"), [(0, 0.1), (10, -1.0)])
def test_bad_limits_are_refused(max_batch: int, wait: float) -> None:
    async def main() -> None:
        async for _ in take_batches(asyncio.Queue(), max_batch, wait):
            pass

    with pytest.raises(ValueError, match="must be"):
        asyncio.run(main())


def test_items_queued_while_the_caller_was_busy_come_at_once() -> None:
    # A batch closes max_wait after its first item became available: items that arrived while
    # the caller handled the previous batch (longer than max_wait) do not wait another max_wait.
    async def main() -> tuple[list[int], float]:
        queue: asyncio.Queue[int] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        it = take_batches(queue, 100, 0.2)
        queue.put_nowait(0)
        await anext(it)  # opens and closes after 0.2 s: nothing else came
        queue.put_nowait(1)
        await asyncio.sleep(0.3)  # the caller is busy; 1 waits in the queue meanwhile
        started = loop.time()
        second = await anext(it)
        return second, loop.time() - started

    second, elapsed = asyncio.run(main())
    assert second == [1]
    assert elapsed < 0.1


def test_a_faust_channel_closed_while_a_batch_fills_yields_it_then_ends() -> None:
    async def main() -> list[list[int]]:
        flow = FlowControlEvent(initially_suspended=False)
        queue: ThrowableQueue[int] = ThrowableQueue(flow_control=flow)
        queue.put_nowait(1)
        queue.put_nowait(2)

        async def close_soon() -> None:
            await asyncio.sleep(0.01)
            await queue.throw(StopAsyncIteration())

        closer = asyncio.create_task(close_soon())
        got = [batch async for batch in take_batches(queue, 10, 0.5)]
        await closer
        return got

    assert asyncio.run(main()) == [[1, 2]]


def test_a_commit_under_way_never_holds_up_the_next_batches() -> None:
    async def main() -> tuple[list[list[int]], list[str]]:
        queue: asyncio.Queue[int] = asyncio.Queue()
        handled: list[list[int]] = []
        log: list[str] = []
        release = asyncio.Event()

        async def handle(batch: list[int]) -> None:
            handled.append(batch)
            log.append(f"batch {batch[0]}")
            if batch[0] == 2:
                release.set()  # batch 2 was handled while the first commit still ran

        async def commit() -> None:
            log.append("commit start")
            await release.wait()
            log.append("commit end")

        async def feed() -> None:
            for i in range(3):
                queue.put_nowait(i)
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.05)
            queue.put_nowait(3)

        feeder = asyncio.create_task(feed())
        loop = asyncio.create_task(
            consume_batches(queue, 1, 0.0, handle, commit, stopping=lambda: len(handled) >= 4)
        )
        await asyncio.wait_for(feeder, 5)
        queue.put_nowait(4)  # the batch that finds stopping() true
        await asyncio.wait_for(loop, 5)
        return handled, log

    handled, log = asyncio.run(main())
    assert handled == [[0], [1], [2], [3]]
    # one commit at a time; batches 1 and 2 went on while the first commit waited
    assert log[:4] == ["batch 0", "commit start", "batch 1", "batch 2"]
    assert log.count("commit start") == 2 and log.index("commit end") < log.index("batch 3")


def test_a_failed_commit_surfaces_after_the_next_batch() -> None:
    async def main() -> list[int]:
        queue: asyncio.Queue[int] = asyncio.Queue()
        handled: list[int] = []

        async def handle(batch: list[int]) -> None:
            handled.extend(batch)
            await asyncio.sleep(0)  # a real batch awaits (the engine, the producer)

        async def commit() -> None:
            raise RuntimeError("broker gone")

        for i in range(5):
            queue.put_nowait(i)
        with pytest.raises(RuntimeError, match="broker gone"):
            await asyncio.wait_for(consume_batches(queue, 1, 0.0, handle, commit), 5)
        return handled

    assert asyncio.run(main()) == [0, 1]
