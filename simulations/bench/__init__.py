"""Every benchmark of stream_rnn in one run: ``python -m simulations.bench``.

Sections (``--list``): the engine in process against a naive loop and a dense ceiling; input
decoding; the worker's batch path with token chunks; memory per key from 1k to 1M keys; the
worker through a real local broker against the pass-through pipe, with the latency curve; the
cost of exactly-once; a scale sweep of partitions x workers; recovery after a SIGKILL; the
pause of a hot swap under load; the checkpoint cost; faust's consume path. Every row is
measured against a reference run in the same process or the same run, and the whole run is
written as ``bench.json`` (every number, the machine), ``bench.md`` (the report), PNG plots and,
with ``--readme``, the README's generated performance block.

Layout: `cli` (arguments, outputs), `runner` (the shared broker, timing, failures),
`results` (rows, targets, sections, JSON), `report` (Markdown, the README block), `plots`,
`machine`, and one module per section in `sections`.
"""
