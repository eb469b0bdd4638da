# The two set-up commands of the README. Both install what they need themselves.
.PHONY: demo test lint setup chaos bench

setup:
	bash deploy/bootstrap.sh

# The main job end to end on a local default (no downloads beyond the packages).
demo: setup
	.venv/bin/stream-rnn demo

# The whole test suite: lint, type check, unit + integration tests (real Kafka broker).
test: setup lint
	.venv/bin/python -m pytest

lint: setup
	.venv/bin/ruff check stream_rnn tests simulations
	.venv/bin/ruff format --check stream_rnn tests simulations
	.venv/bin/mypy

# Only the chaos tests (real broker: kills, SIGSTOP zombies, broker outages, compaction,
# rebalances, engine faults, 100k-key deletion and recovery); about 12 minutes.
chaos: setup
	.venv/bin/python -m pytest tests/chaos -p no:cacheprovider

# Every benchmark in one run (about 17 minutes on 2 cores): docs/perf/bench.json, bench.md, the
# plots, and the README's generated performance block. Nothing else may run meanwhile.
bench: setup
	.venv/bin/python -m simulations.bench --out docs/perf --readme README.md
