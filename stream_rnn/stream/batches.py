"""Micro-batches straight from a faust channel's queue, and the loop that handles them.

faust's ``Stream.noack_take`` runs an async processor, a passive stream iterator and event
bookkeeping for every message: in the broker benchmark an agent that does nothing with its
batches drains ~14k messages/s that way, and ~19k/s when it takes the same events from its
channel's queue in bulk (``get_nowait`` until the queue is empty or the batch is full). The
events are faust's own (consumer, conductor, decoding, flow control and the queue's pressure
callbacks are untouched); only the per-message generator machinery is skipped. Nothing is
acked here: the worker commits offsets itself (see `stream_rnn.stream.worker`).

A batch closes when it is full (``max_batch``) or ``max_wait_s`` after its first event became
available, whichever comes first. `consume_batches` handles the batches one after the other
and starts a commit after each one in the background: the next batch is taken while the
commit is under way, never after it.

Example::

    @app.agent(topic)
    async def agent(stream):
        async for events in take_batches(stream.channel.queue, 1024, 0.05):
            ...
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol, TypeVar

log = logging.getLogger("stream_rnn.batches")
T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class EventQueue(Protocol[T_co]):
    """What `take_batches` needs of a queue (asyncio.Queue and faust's ThrowableQueue)."""

    async def get(self) -> T_co: ...

    def get_nowait(self) -> T_co: ...


async def take_batches(
    queue: EventQueue[T],
    max_batch: int,
    max_wait_s: float,
    *,
    poll_s: float = 0.002,
) -> AsyncIterator[list[T]]:
    """Yield lists of 1..``max_batch`` queued items, in queue order, forever.

    A batch starts with the next item (waiting as long as it takes), then takes whatever is
    already queued; if that leaves it short of ``max_batch``, it looks again every ``poll_s``
    until ``max_wait_s`` after its first item became available, and yields what it has. An item
    found queued when the caller asks for the next batch counts as available since the previous
    batch was handed over (it may have been waiting while the caller was busy), so a caller
    slower than ``max_wait_s`` gets its next batch at once. ``max_wait_s`` 0 yields what was
    queued at once. Errors thrown into a faust queue surface from ``get``/``get_nowait``.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    if max_wait_s < 0:
        raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
    now = asyncio.get_running_loop().time
    handed_over: float | None = None  # when the previous batch was yielded
    while True:
        try:
            try:
                batch = [queue.get_nowait()]
                # queued while the caller handled the previous batch: waiting since then at most
                opened = now() if handed_over is None else handed_over
            except asyncio.QueueEmpty:
                batch = [await queue.get()]
                opened = now()
        except StopAsyncIteration:  # faust closes the channel when it stops the agent
            return
        deadline = opened + max_wait_s
        closed = False
        while len(batch) < max_batch:
            try:
                batch.append(queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            except StopAsyncIteration:
                closed = True
                break
            remaining = deadline - now()
            if remaining <= 0:
                break
            # The queue ran dry: look again shortly. Waiting on get() instead would cost a task
            # and a wake-up per message while the consumer refills the queue one by one.
            await asyncio.sleep(min(remaining, poll_s))
        handed_over = now()
        yield batch
        if closed:
            return


async def consume_batches(
    queue: EventQueue[T],
    max_batch: int,
    max_wait_s: float,
    handle: Callable[[list[T]], Awaitable[None]],
    commit: Callable[[], Awaitable[None]],
    *,
    stopping: Callable[[], bool] = lambda: False,
) -> None:
    """``handle`` every batch of `take_batches`; after each, start ``commit`` in the background.

    One commit runs at a time: while one is under way, further batches are handled without
    starting another (the commit decides itself what is due). A commit that raised re-raises
    here, after the batch that follows it. Returns when the queue is closed or, before a batch,
    when ``stopping()`` says so.

    Example::

        await consume_batches(queue, 1024, 0.05, worker.handle, worker.commit_point,
                              stopping=lambda: worker.stopping)
    """
    committing: asyncio.Task[None] | None = None
    async for batch in take_batches(queue, max_batch, max_wait_s):
        if stopping():
            return
        await handle(batch)
        if committing is not None and committing.done():
            finished, committing = committing, None
            finished.result()  # a failed commit ends the loop, as an inline one would
        if committing is None:
            committing = asyncio.ensure_future(commit())
            committing.add_done_callback(_log_failure)


def _log_failure(task: asyncio.Future[None]) -> None:
    # logged when it happens: the loop re-raises it only once another batch arrives
    if not task.cancelled() and task.exception() is not None:
        log.error("a commit started after a micro-batch failed", exc_info=task.exception())
