#!/usr/bin/env bash
# Set up trustmesh and start the trust authority on the embedded default:
# SQLite in ~/.trustmesh/server, HTTP (health, CRL, OCSP, metrics) on 127.0.0.1:8080.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/trustmesh server run "$@"
