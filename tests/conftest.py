"""Shared test configuration: paths to the real data shipped next to the repository."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# The real-broker fixtures (session broker, topics, worker processes) for integration and
# chaos tests alike; a plugin rather than a sub-directory conftest so that both share them.
pytest_plugins = ["kafka_fixtures"]

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Two cores: let torch use them, and keep hypothesis deterministic across runs.
torch.set_num_threads(2)


@pytest.fixture
def fortunes_dir() -> Path:
    path = SHARED_DATA / "fortunes-langid"
    if not (path / "valid.jsonl").is_file():
        pytest.skip(f"real data not present at {path}")
    return path
