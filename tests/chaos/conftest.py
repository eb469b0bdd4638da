"""Chaos tests: the exactness contract on the real broker while workers die, move and starve.

The broker, topic and worker fixtures are the integration tests' (``tests/kafka_fixtures.py``,
a plugin registered by ``tests/conftest.py``); this file adds the chaos workers' settings.
Every test here is marked ``kafka`` and ``slow``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
from chaos_harness import ChaosWorkers, ChaosWorkersFactory, tiny_model
from stream_harness import WorkerFactory


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.path).parents:
            item.add_marker(pytest.mark.kafka)
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def gru_model(tmp_path: Path) -> Path:
    """GRU 1x16, random weights: small states, so that many keys stay cheap."""
    return tiny_model(tmp_path)


@pytest.fixture
def chaos_workers(worker_factory: WorkerFactory) -> ChaosWorkersFactory:
    """``chaos_workers(model_dir, topics, group, *args, env=None)`` -> `ChaosWorkers` of this
    test (the underlying ``worker_factory`` stops every worker afterwards)."""
    return functools.partial(ChaosWorkers, worker_factory)
