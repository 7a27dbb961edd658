#!/usr/bin/env bash
# The main job: sets up .venv (first run only), then runs the Preview workflow in a real ComfyUI
# on the embedded default model and prints the path of the mp4. Arguments go to run_demo.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python scripts/run_demo.py "$@"
