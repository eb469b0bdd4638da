"""Replay recorded sequences through the system with their timing, and report on it.

``schedule`` turns either recorded format into a timed list of wire messages; ``inproc`` runs
it through an :class:`~stream_rnn.engine.engine.Engine` in this process (no broker);
``kafka`` produces it to a live system's tokens topic and reads the answers back; both give a
:class:`~stream_rnn.replay.result.ReplayResult`, which ``analysis`` checks against the recorded
ground truth and the offline pass, and ``report`` writes as Markdown, HTML and PNG plots.

Example::

    schedule = build_schedule("events.jsonl", level="char", timing=Timing(speed=10))
    result = run_inproc(schedule, engine)
    analysis = analyse(schedule, result, models={engine.version: (model, manifest)})
    write_report(Path("runs/replay"), analysis)
"""
