"""A faust app on the bulk consume path that logs what its agent takes (integration tests).

The agent takes micro-batches from its channel queue with ``take_batches(queue, max_batch, 0)``
(so a batch is taken from the queue in one step, right before it is logged), writes one JSON
line per batch, then sleeps ``--delay-s`` (a slow agent: the queue fills, the bulk path waits
for room). Each batch line holds what was true when it was taken: the consumer's flow, the
group generation, the assignment, the queue size, the events ``[partition, offset,
generation]`` and the bulk path's counters. The rebalance signals are logged too.

Run (the tests start it; SIGTERM stops it)::

    python tests/bulk_consume_app.py --bootstrap 127.0.0.1:9092 --topic t --group g \\
        --log /tmp/a.jsonl --datadir /tmp/a
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from typing import Any

import faust

from stream_rnn.stream import faust_boundary as fb
from stream_rnn.stream.batches import take_batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--datadir", required=True)
    parser.add_argument("--maxsize", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--delay-s", type=float, default=0.01)
    parser.add_argument("--max-poll-records", type=int, default=500)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    app = faust.App(
        args.group,
        broker=f"kafka://{args.bootstrap}",
        store="memory://",
        datadir=args.datadir,
        autodiscover=False,
        topic_allow_declare=False,
        topic_disable_leader=True,
        web_enabled=False,
        consumer_auto_offset_reset="earliest",
        table_standby_replicas=0,
        stream_buffer_maxsize=args.maxsize,
        broker_max_poll_records=args.max_poll_records,
        broker_session_timeout=10.0,
        broker_heartbeat_interval=1.0,
    )
    topic = app.topic(
        args.topic,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        acks=False,
    )
    fb.use_bulk_consumer(app, [args.topic])
    out = open(args.log, "a", buffering=1)  # noqa: SIM115 - open for the process's lifetime
    taken = 0

    def write(kind: str, **fields: Any) -> None:
        consumer = app.consumer
        stats = fb.bulk_stats(app)
        line = {
            "kind": kind,
            "t": time.monotonic(),
            "flow": consumer.flow_active,
            "generation": app.consumer_generation_id,
            "assignment": sorted(tp.partition for tp in consumer.assignment()),
            "taken": taken,
            "stats": stats.as_dict() if stats else None,
            **fields,
        }
        out.write(json.dumps(line) + "\n")

    @app.agent(topic, name="taker")
    async def taker(stream: Any) -> None:
        nonlocal taken
        queue = fb.channel_queue(stream)
        async for events in take_batches(queue, args.max_batch, 0.0):
            taken += len(events)
            positions = [
                [e.message.partition, e.message.offset, e.message.generation_id] for e in events
            ]
            write("batch", qsize=queue.qsize(), events=positions)  # type: ignore[attr-defined]
            await asyncio.sleep(args.delay_s)

    @app.on_partitions_revoked.connect
    async def revoked(sender: Any, /, *a: Any, signal: Any, **kw: Any) -> None:
        tps = a[0] if a else kw.get("revoked", set())
        write("revoked", partitions=sorted(tp.partition for tp in tps))

    @app.on_partitions_assigned.connect
    async def assigned(sender: Any, /, *a: Any, signal: Any, **kw: Any) -> None:
        tps = a[0] if a else kw.get("assigned", set())
        write("assigned", partitions=sorted(tp.partition for tp in tps))

    worker = faust.Worker(app, loglevel="WARNING", quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()


if __name__ == "__main__":
    main()
