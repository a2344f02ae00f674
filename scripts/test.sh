#!/usr/bin/env bash
# Set up everything the tests need (system packages and .venv) and run the
# whole suite: lint, type check, unit and integration tests, benchmark smoke.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh --test
.venv/bin/ruff check src tests bench
.venv/bin/mypy
.venv/bin/python -m pytest -q "$@"
