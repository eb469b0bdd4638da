#!/usr/bin/env bash
# Create .venv and install stream_rnn with its dependencies (PyTorch from PyPI included).
# Idempotent: re-installs only when pyproject.toml changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.stream-rnn-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "installing stream_rnn and its dependencies into .venv (first time: PyTorch, a few minutes)" >&2
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e '.[dev]'
    touch "$stamp"
fi
# docker-compose (Debian's v1 package): tests/unit/test_deploy_files.py validates
# deploy/compose.yaml with `docker-compose config`, which needs no Docker daemon. Only as root
# with apt-get; elsewhere that test is skipped (and fails under CI).
if ! command -v docker-compose >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
        && [ "$(id -u)" = 0 ]; then
    echo "installing docker-compose (validates deploy/compose.yaml)" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends docker-compose >/dev/null; } \
        || echo "could not install docker-compose; the compose validation test will say so" >&2
fi
# promtool (Debian's package prometheus): tests/unit/test_prometheus_rules.py checks the config,
# the alert rules and the dashboard queries of deploy/prometheus and deploy/grafana with it, and
# fails without it. Installed only as root with apt-get; elsewhere this says what to install.
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        echo "installing prometheus (promtool checks deploy/prometheus)" >&2
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends prometheus >/dev/null; } \
            || echo "could not install prometheus; tests/unit/test_prometheus_rules.py needs promtool" >&2
    else
        echo "promtool not found: install Prometheus so that promtool is on PATH" \
            "(Debian/Ubuntu: sudo apt-get install prometheus; elsewhere a release from" \
            "https://prometheus.io/download/); tests/unit/test_prometheus_rules.py needs it" >&2
    fi
fi
