"""One frozen settings object, configurable from the environment (prefix ``STREAM_RNN_``).

CLI flags override these; deployment files set the environment.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Process-wide defaults.

    Example::

        STREAM_RNN_DEVICE=cuda stream-rnn score ...   # or Settings(device="cuda")
    """

    model_config = SettingsConfigDict(env_prefix="STREAM_RNN_", frozen=True, extra="ignore")

    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:1 or auto")
    bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap HOST:PORT")
    kafka_data_dir: Path = Field(
        Path.home() / ".local" / "state" / "stream-rnn" / "kafka",
        description="data directory of the local development broker",
    )
    runs_dir: Path = Field(Path("runs"), description="where demo artefacts go")
    log_level: str = Field("INFO", description="logging level")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
