"""The machine a run measured: cores, CPU, memory, load, thread settings and versions.

Rates on a shared two-core machine move with whatever else runs, so every run records the load
average before and after (and per section), next to what could explain a difference between
two runs: the CPU, torch's thread count, the library and broker versions, the commit.
"""

from __future__ import annotations

import os
import platform
import subprocess  # noqa: S404 - git rev-parse, an argument list
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("stream-rnn", "torch", "faust-streaming", "aiokafka", "kafka-python", "msgspec")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _commit() -> str | None:
    """The checked-out commit (read only: ``git rev-parse``), None outside a git checkout."""
    try:
        out = subprocess.run(  # noqa: S603 - fixed argument list
            ["git", "rev-parse", "HEAD"],  # noqa: S607 - git from PATH
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _kafka_version() -> str | None:
    try:
        from stream_rnn.ops.kafka_jars import default_kafka_version  # noqa: PLC0415

        return default_kafka_version()
    except Exception:  # noqa: BLE001 - informative only
        return None


def loadavg() -> float:
    """The 1-minute load average now."""
    return round(os.getloadavg()[0], 2)


def machine_info() -> dict[str, Any]:
    """Everything about this machine and software that a reader of the numbers needs."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count() or 0
    return {
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "cpu": _cpu_model(),
        "memory_gib": _memory_gib(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "versions": {p: _version(p) for p in PACKAGES} | {"kafka broker": _kafka_version()},
        "commit": _commit(),
        "loadavg_start": list(os.getloadavg()),
    }
