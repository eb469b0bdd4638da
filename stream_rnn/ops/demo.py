"""``stream-rnn demo``: the whole product on one machine, with no downloads.

1. **v1**: trains a small character-level GRU language model on the built-in synthetic corpus,
   deliberately under-trained (``--epochs 1``), scores the held-out split offline;
2. **scenario**: ``--sequences`` sequences of the same corpus typed by users with Zipf-like
   activity, interleaved, with a share of malformed messages (each names the dead-letter
   reason it must come back with);
3. **live system** (`stream_rnn.ops.demo_stream`): a local Kafka broker, v1 published to a
   registry with a fresh signing key, two exactly-once workers of one group following it;
4. **replay** of the scenario through Kafka at a steady ``--rate`` with live progress, while
   `stream_rnn.ops.demo_loop` records what was streamed and trains v2, a new model with
   another vocabulary (the recorded sequences plus text written with capitals, digits and
   punctuation that v1 never saw), publishes it (every worker hot-swaps it, rewarming live
   states through the new vocabulary), SIGKILLs one worker (the other takes its partitions
   over) and restarts it;
5. **report** (`stream_rnn.ops.demo_report` over `stream_rnn.replay`): guarantee checks,
   quality per version, latency at the steady rate, plots with the swap and the faults
   marked, ``summary.json``; everything was shut down before it.

``--no-stream`` keeps it in process: v1, the scenario replayed through the engine (no broker),
and the same report. Artefacts go to ``--out`` (default ``runs/demo``).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console

if TYPE_CHECKING:
    from stream_rnn.ops.demo_loop import LoopPlan

console = Console(soft_wrap=True)
MALFORMED = (  # (key, raw value, the dead-letter reason it must come back with)
    ("ghost", '{"v":1,"type":"token","token":"a"', "not_json"),
    (None, '{"v":1,"type":"token","token":"a"}', "missing_key"),
    ("ghost", '{"v":1,"type":"token","token":true}', "wrong_type"),
    ("ghost", '{"v":2,"type":"token","token":"a"}', "bad_version"),
    ("ghost", '{"v":1,"type":"end"}', "unknown_key"),
)
MALFORMED_SHARE = 0.004
WORKERS = ("worker-1", "worker-2")


def say(text: str) -> None:
    # paths, versions and log lines are data: never rich markup
    console.print(text, markup=False, highlight=False)


@dataclass(frozen=True)
class Scenario:
    """The replayed event log and what it holds."""

    path: Path
    sequences: int
    users: int
    tokens: int
    malformed: int


# ------------------------------------------------------------------------------------ v1
def train_v1(out: Path, epochs: int, seed: int) -> tuple[Path, dict[str, Any]]:
    """Synthetic corpus -> a small GRU LM (v1) in ``out/v1`` -> offline scores of the test
    split; returns the checkpoint and its figures."""
    from stream_rnn.predict.offline import score_records
    from stream_rnn.registry.checkpoint import load_checkpoint
    from stream_rnn.train.baselines import unigram_perplexity
    from stream_rnn.train.batching import prepare
    from stream_rnn.train.data import write_records
    from stream_rnn.train.synthetic import generate_split
    from stream_rnn.train.trainer import TrainConfig, train
    from stream_rnn.train.vocab import Vocab

    split = generate_split("next-token", 600, 100, 100, seed=seed)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name, recs in (("train", split.train), ("valid", split.valid), ("test", split.test)):
        write_records(data / f"{name}.jsonl", recs)
    cfg = TrainConfig(
        task="next-token", cell="gru", hidden=64, embed=32, epochs=epochs, batch_size=32,
        lr=3e-3, seed=seed,
    )  # fmt: skip
    result = train(cfg, split.train, split.valid, out / "v1")
    model, manifest = load_checkpoint(out / "v1")
    with (data / "test_scores.jsonl").open("w", encoding="utf-8") as fh:
        for line in score_records(model, manifest, split.test):
            fh.write(json.dumps(line) + "\n")
    vocab = Vocab.from_dict(manifest.vocab)
    tr, va = prepare(split.train, "next-token", vocab), prepare(split.valid, "next-token", vocab)
    return out / "v1", {
        "version": manifest.version,
        "train_sequences": len(split.train),
        "epochs": epochs,
        "seconds": result.elapsed_s,
        "valid_perplexity": manifest.metrics["valid"]["perplexity"],
        "unigram_perplexity": unigram_perplexity(tr, va, len(vocab)),
        "test_scores": str(data / "test_scores.jsonl"),
    }


# ------------------------------------------------------------------------------ scenario
def write_scenario(path: Path, sequences: int, seed: int) -> Scenario:
    """``sequences`` sequences of the corpus (other samples than v1's) typed by ``sequences
    // 4`` users with Zipf(0.8) activity, interleaved (a user's sequences one after another),
    plus ~0.4 % malformed messages; written as an event log for `build_schedule`."""
    from stream_rnn.train.data import records_to_events
    from stream_rnn.train.synthetic import generate

    rng = random.Random(f"stream-rnn-demo/{seed}")  # noqa: S311 - a workload, not a secret
    users = max(1, sequences // 4)
    weights = [1.0 / (rank + 1) ** 0.8 for rank in range(users)]
    owners = rng.choices(range(users), weights=weights, k=sequences)
    records = [
        replace(rec, key=f"user-{owner:04d}")
        for rec, owner in zip(
            generate("next-token", sequences, seed=seed + 1, min_len=24, max_len=72),
            owners,
            strict=True,
        )
    ]
    rows: list[dict[str, Any]] = records_to_events(records, level="char", interleave_seed=seed)
    tokens = sum(r["type"] == "token" for r in rows)
    bad = max(len(MALFORMED), round(MALFORMED_SHARE * len(rows)))
    for j in range(bad):
        key, raw, reason = MALFORMED[j % len(MALFORMED)]
        row = {"key": None if key is None else f"{key}-{j:04d}", "raw": raw, "expect": reason}
        rows.insert(rng.randrange(1, len(rows)), row)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r, separators=(",", ":")) + "\n" for r in rows)
    return Scenario(path, sequences, len(set(owners)), tokens, bad)


# ------------------------------------------------------------------------------ the command
@click.command("demo")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="artefact directory (default: runs/demo)")  # fmt: skip
@click.option("--epochs", type=click.IntRange(min=1), default=1, show_default=True,
              help="epochs of v1 (few on purpose: the learning loop improves it)")  # fmt: skip
@click.option("--retrain-epochs", type=click.IntRange(min=1), default=3, show_default=True,
              help="epochs of v2, trained mid-stream")  # fmt: skip
@click.option("--sequences", type=click.IntRange(min=20), default=900, show_default=True,
              help="sequences in the replayed scenario")  # fmt: skip
@click.option("--rate", type=click.FloatRange(min=1), default=250.0, show_default=True,
              help="tokens per second of the replay (steady)")  # fmt: skip
@click.option("--restart/--no-restart", default=True, show_default=True,
              help="start the killed worker again")  # fmt: skip
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--stream/--no-stream", default=True, show_default=True,
              help="through Kafka with two workers (else in process, no broker)")  # fmt: skip
def demo_cmd(
    out_dir: str | None,
    epochs: int,
    retrain_epochs: int,
    sequences: int,
    rate: float,
    restart: bool,
    seed: int,
    stream: bool,
) -> None:
    """Run the whole product on this machine: train v1 -> stream a scenario through Kafka and two
    workers -> train v2 with a new vocabulary on what was recorded and hot-swap it mid-stream
    -> SIGKILL a worker -> report with every guarantee check. Exits 1 if a check fails."""
    from stream_rnn.ops.settings import get_settings

    out = Path(out_dir) if out_dir else get_settings().runs_dir / "demo"
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    console.rule("[bold]stream_rnn demo")
    say(f"1. v1: a GRU 1x64 language model, {epochs} epoch(s) on the built-in corpus")
    v1_dir, v1 = train_v1(out, epochs, seed)
    say(
        f"   {v1['version']} in {v1['seconds']:.0f}s: validation perplexity "
        f"{v1['valid_perplexity']:.2f} (unigram {v1['unigram_perplexity']:.2f}); test split "
        f"scored offline -> {v1['test_scores']}"
    )
    scenario = write_scenario(out / "scenario.jsonl", sequences, seed)
    say(
        f"2. scenario: {scenario.sequences} sequences of {scenario.users} users, "
        f"{scenario.tokens:,} tokens, {scenario.malformed} malformed messages -> {scenario.path}"
    )
    if stream:
        from stream_rnn.ops.demo_loop import LoopPlan

        plan = LoopPlan(restart=restart, retrain_epochs=retrain_epochs, seed=seed)
        facts = _streamed(out, v1_dir, scenario, rate, plan)
    else:
        facts = _in_process(out, v1_dir, scenario)
    facts.update(v1=v1, scenario={**asdict(scenario), "path": str(scenario.path)})
    facts["seconds"] = round(time.monotonic() - started, 1)
    (out / "summary.json").write_text(json.dumps(facts, indent=2, default=str), encoding="utf-8")
    say(f"done in {facts['seconds']:.0f}s; report -> {facts['report']}; summary -> "
        f"{out / 'summary.json'}")  # fmt: skip
    if not facts["passed"]:
        console.print("[bold red]some guarantee checks failed[/bold red] (see the report)")
        raise SystemExit(1)


def _streamed(
    out: Path, v1_dir: Path, scenario: Scenario, rate: float, plan: LoopPlan
) -> dict[str, Any]:
    """Steps 3-5 through Kafka; the summary's facts."""
    from stream_rnn.ops.demo_loop import LoopController, LoopProgress
    from stream_rnn.ops.demo_report import (
        loop_facts,
        print_summary,
        registry_loader,
        write_demo_report,
    )
    from stream_rnn.ops.demo_stream import HISTORY, PARTITIONS, DemoError, LiveSystem
    from stream_rnn.ops.workers import sigterm_interrupts
    from stream_rnn.replay.exceptions import ReplayError
    from stream_rnn.replay.kafka import run_kafka
    from stream_rnn.replay.schedule import Timing, answer_expected, build_schedule

    schedule = build_schedule(scenario.path, level="char", timing=Timing(rate=rate))
    with sigterm_interrupts(), LiveSystem(out / "stream", say=say) as live:
        say("3. live system")
        bootstrap = live.start_broker()
        say(f"   Kafka {live.kafka.version} broker at {bootstrap} (data in {live.kafka.data_dir}); "
            f"topics {live.topics.tokens} etc., {PARTITIONS} partitions")  # fmt: skip
        live.create_key()
        v1 = live.publish(v1_dir)
        say(f"   registry {live.registry.root}: v1 = {v1} is production, announced on "
            f"{live.updates_topic} (signed with {live.key_file}, mode 600)")  # fmt: skip
        for name in WORKERS:
            live.start_worker(name)
        live.wait_assigned(WORKERS, every=True)
        for name in WORKERS:
            w = live.workers[name]
            say(f"   {name}: pid {w.pid}, exactly-once, partitions {sorted(live.assigned([name]))}, "
                f"status http://127.0.0.1:{w.handle.port}/, metrics :{w.metrics_port}/metrics")  # fmt: skip
        say(
            f"4. replay: {len(schedule.events):,} messages at {rate:g} tokens/s "
            f"({schedule.duration:.0f}s); learning loop at {plan.retrain_at:.0%}, SIGKILL at "
            f"{plan.kill_at:.0%}"
        )
        progress = LoopProgress(console)
        loop = LoopController(
            live, progress, plan, duration=schedule.duration, say=say, names={v1: "v1"}
        )
        loop.start()
        try:
            result = run_kafka(
                schedule,
                bootstrap=bootstrap,
                topics=live.topics,
                expected=answer_expected(schedule, tokens=True),
                timeout_s=60.0,
                progress=progress,
            )
        except ReplayError as err:
            loop.stop()
            raise DemoError(f"the replay failed: {err}") from err
        except BaseException:
            loop.stop()
            raise
        outcome = loop.finish()
        statuses = {n: w.status() or {} for n, w in live.workers.items()}
        say("   shutting down")
    # the system is down: the report needs only the registry's checkpoints
    say("5. report: checking every answer against the offline pass of its version")
    facts = write_demo_report(
        console, out, schedule, result, registry_loader(live.registry), outcome.markers,
        title=f"stream-rnn demo: {scenario.sequences} sequences through Kafka, 2 workers",
        rate=rate, history=HISTORY,
    )  # fmt: skip
    facts.update(loop_facts(outcome, result, v1, statuses))
    print_summary(console, facts)
    if outcome.error is not None:
        raise DemoError(f"a step of the learning loop failed: {outcome.error}") from outcome.error
    return facts


def _in_process(out: Path, v1_dir: Path, scenario: Scenario) -> dict[str, Any]:
    """``--no-stream``: the scenario through the engine in this process, then the report."""
    from stream_rnn.engine.engine import Engine
    from stream_rnn.ops.demo_loop import LoopProgress
    from stream_rnn.ops.demo_report import print_summary, write_demo_report
    from stream_rnn.registry.checkpoint import load_checkpoint
    from stream_rnn.replay.inproc import InprocOptions, run_inproc
    from stream_rnn.replay.schedule import Timing, build_schedule

    schedule = build_schedule(scenario.path, level="char", timing=Timing(fast=True))
    say(f"3. in process (no broker): {len(schedule.events):,} messages through the engine, --max")
    model, manifest = load_checkpoint(v1_dir)
    result = run_inproc(
        schedule, Engine(model, manifest), options=InprocOptions(fast=True),
        progress=LoopProgress(console),
    )  # fmt: skip

    def load(version: str) -> Any:
        return (model, manifest) if version == manifest.version else None

    say("4. report: checking every answer against the offline pass of v1")
    facts = write_demo_report(
        console, out, schedule, result, load, [],
        title=f"stream-rnn demo: {scenario.sequences} sequences in process", rate=None,
    )  # fmt: skip
    print_summary(console, facts)
    return facts
