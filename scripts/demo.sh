#!/usr/bin/env bash
# Set everything up (HAProxy, nginx and wrk from Debian if missing, .venv with the project), then
# run the local demo: HAProxy -> primary, with the agent mirroring to two shadows.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/demo.py
