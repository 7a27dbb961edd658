#!/usr/bin/env bash
# The test command: sets up .venv (first run only), lints, checks the formatting, and runs the
# whole test suite.
# Arguments go to pytest: `bash scripts/test.sh -m "not slow"` is the fast lane.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
echo "ruff check . && ruff format --check ." >&2
.venv/bin/python -m ruff check .
.venv/bin/python -m ruff format --check .
exec .venv/bin/python -m pytest "$@"
