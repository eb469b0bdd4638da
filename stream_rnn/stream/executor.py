"""Where a worker runs the engine: on its event loop's thread (default) or a thread of its own.

Everything that touches the state pool (micro-batches, checkpoint snapshots, restores, expiry)
goes through one executor, so it is serialised either way. On the loop's thread is the default
because the engine is mostly short torch calls that release and re-take the GIL: on a thread of
its own, each of those waited for the event loop (busy with faust's per-message work) to hand
the GIL back, and a worker drained ~7.8k tokens/s at ~118 CPU µs a token; inline it drains
~12k/s at ~83 µs (broker benchmark, same run conditions). faust's consumer, and with it the
group heartbeats, has its own thread, so a micro-batch on the loop does not stall the group.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class InlineExecutor(Executor):
    """Runs each submitted call at once, on the caller's thread; the future is already done.

    Example::

        result = await loop.run_in_executor(InlineExecutor(), engine.process, events)
    """

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as err:  # noqa: BLE001 - handed to the awaiting caller
            future.set_exception(err)
        return future


def engine_executor(own_thread: bool) -> Executor:
    """The executor for all of a worker's state-pool work (see the module docstring)."""
    if own_thread:
        return ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
    return InlineExecutor()
