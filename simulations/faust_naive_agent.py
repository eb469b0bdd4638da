"""The usual hand-written Faust agent, and two empty agents: references for broker_bench.py.

``--mode naive`` is what a Faust tutorial leads to: ``async for event in stream.events()``,
one event at a time; ``json.loads``; the key's hidden state in a faust ``Table`` (a list of
floats, written back after every token, so every token also produces a changelog message);
the same network with batch 1 under ``torch.inference_mode``; top-5 next tokens; one
``await topic.send(...)`` per prediction. It writes the predictions topic like the worker
(``ts`` = emit time, ``latency_s`` from the token's ``ts``), so it is timed the same way.

``--mode empty-events`` / ``--mode empty-take`` / ``--mode empty-queue`` do nothing per message
(``stream.events()`` one by one, ``stream.take_events(max_batch, within)``, or
``take_batches(stream.channel.queue, max_batch, max_wait)`` as the worker iterates): the cost
of faust's own consumer path. They time themselves, first to ``--expect``-th message, and write
``{"count", "first", "last", "cpu_first", "cpu_last"}`` (``time.time()``,
``time.process_time()``) to ``--done-file``.

Run (broker_bench.py starts it as a subprocess; SIGTERM stops it)::

    python simulations/faust_naive_agent.py --mode naive --bootstrap 127.0.0.1:9092 \\
        --model runs/m --tokens-topic t --predictions-topic p --group g --partitions 4 \\
        --datadir /tmp/naive
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import faust
import torch

from stream_rnn.registry.checkpoint import load_checkpoint
from stream_rnn.stream.batches import take_batches
from stream_rnn.train.vocab import Vocab

MODES = ("naive", "empty-events", "empty-take", "empty-queue")


def build_app(args: argparse.Namespace) -> faust.App:
    app = faust.App(
        args.group,
        broker=f"kafka://{args.bootstrap}",
        store="memory://",
        datadir=args.datadir,
        autodiscover=False,
        topic_partitions=args.partitions,  # the table's changelog: co-partitioned with tokens
        topic_disable_leader=True,
        web_enabled=False,
        consumer_auto_offset_reset="earliest",
    )
    tokens = app.topic(
        args.tokens_topic,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=args.partitions,
    )
    if args.mode == "naive":
        _naive_agent(app, tokens, args)
    else:
        _empty_agent(app, tokens, args)
    return app


def _naive_agent(app: faust.App, tokens: Any, args: argparse.Namespace) -> None:
    model, manifest = load_checkpoint(args.model)
    model.eval()
    if model.config.is_lstm:
        raise SystemExit("the naive agent keeps one state tensor per key: use a GRU or RNN model")
    vocab = Vocab.from_dict(manifest.vocab)
    stoi, itos, unk = vocab.stoi, vocab.itos, vocab.unk_id
    shape = (model.config.num_layers, 1, model.config.hidden_size)
    predictions = app.topic(
        args.predictions_topic,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
    )
    states = app.Table("states", default=list, partitions=args.partitions)

    @app.agent(tokens, name="naive")
    async def naive(stream: Any) -> None:
        async for event in stream.events():
            key = event.key.decode()
            msg = json.loads(event.value)
            token = msg["token"]
            tid = stoi.get(token, unk) if isinstance(token, str) else int(token)
            flat = states[key]
            state = torch.tensor(flat).view(shape) if flat else model.init_state(1)
            with torch.inference_mode():
                out, state = model.step(torch.tensor([[tid]]), state)
                values, ids = torch.softmax(out[0, 0], -1).topk(5)
            states[key] = state.flatten().tolist()
            now = time.time()
            sent = msg.get("ts")
            pred = {
                "key": key,
                "id": f"{event.message.partition}:{event.message.offset}",
                "type": "next",
                "model_version": manifest.version,
                "next": {"tokens": [itos[i] for i in ids.tolist()], "probs": values.tolist()},
                "latency_s": None if sent is None else now - sent,
                "ts": now,
                "v": 1,
            }
            await predictions.send(key=event.key, value=json.dumps(pred).encode())


def _empty_agent(app: faust.App, tokens: Any, args: argparse.Namespace) -> None:
    seen = {"count": 0, "first": 0.0, "last": 0.0, "cpu_first": 0.0, "cpu_last": 0.0}

    def count(n: int) -> None:
        # process_time: CPU of every thread of the process (faust's consumer thread included)
        if not seen["count"]:
            seen["first"], seen["cpu_first"] = time.time(), time.process_time()
        seen["count"] += n
        if seen["count"] >= args.expect and not seen["last"]:
            seen["last"], seen["cpu_last"] = time.time(), time.process_time()
            Path(args.done_file).write_text(json.dumps(seen))

    @app.agent(tokens, name="empty")
    async def empty(stream: Any) -> None:
        if args.mode == "empty-events":
            async for _event in stream.events():
                count(1)
        elif args.mode == "empty-queue":
            queue = stream.channel.queue
            async for events in take_batches(queue, args.max_batch, args.max_wait):
                count(len(events))
        else:
            async for events in stream.take_events(args.max_batch, within=args.max_wait):
                count(len(events))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=MODES, default="naive")
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--tokens-topic", required=True)
    parser.add_argument("--predictions-topic", default="")
    parser.add_argument("--model", default="")
    parser.add_argument("--group", required=True)
    parser.add_argument("--partitions", type=int, required=True)
    parser.add_argument("--datadir", required=True)
    parser.add_argument("--expect", type=int, default=0, help="empty modes: messages to time")
    parser.add_argument("--done-file", default="", help="empty modes: where the timing goes")
    parser.add_argument("--max-batch", type=int, default=1024)
    parser.add_argument("--max-wait", type=float, default=0.05)
    args = parser.parse_args()
    if args.mode == "naive" and not (args.model and args.predictions_topic):
        parser.error("--mode naive needs --model and --predictions-topic")
    if args.mode != "naive" and not (args.expect > 0 and args.done_file):
        parser.error(f"--mode {args.mode} needs --expect N and --done-file")
    logging.basicConfig(level=logging.WARNING)
    app = build_app(args)
    worker = faust.Worker(app, loglevel="WARNING", quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()


if __name__ == "__main__":
    main()
