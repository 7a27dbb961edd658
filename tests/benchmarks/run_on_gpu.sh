#!/usr/bin/env bash
# Runs tests/benchmarks/gpu_speed.py on a GPU machine that has PyTorch but not the rest of the
# pack's dependencies, from what the git-ignored folder .gpu_carry/ brings along:
#
#   .gpu_carry/diffusers-*.whl  needed by every part (VAE, the injectors' AdaLayerNorm, the
#                               scheduler); pure Python, any Python 3
#   .gpu_carry/av-*.whl         optional (CPython 3.11+, x86_64): the e2e part then also writes
#                               the mp4; without it frames are made and dropped
#   .gpu_carry/ComfyUI/         optional: the dit part then also times ComfyUI's WanModel_S2V
#                               (the few comfy/ modules it imports, with ComfyUI's LICENSE)
#
# The machine's own Python must have: torch with CUDA, numpy, safetensors, accelerate, einops
# (our DiT); huggingface_hub >= 1.32, requests, regex, filelock, Pillow (diffusers' imports);
# psutil, tqdm (ComfyUI's). The wheels go to a private folder with --no-deps: nothing the
# machine has is replaced.
#
#   bash tests/benchmarks/run_on_gpu.sh --parts dit --presets preview,standard,hd
#   bash tests/benchmarks/run_on_gpu.sh tests/benchmarks/low_vram.py --clips 3
#
# A first argument ending in .py names another benchmark script to run the same way.
#
# PYTHON picks the interpreter (default python3); LIVEAVATAR_BENCH_SITE the install folder.
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-python3}
CARRY=.gpu_carry
SITE=${LIVEAVATAR_BENCH_SITE:-${TMPDIR:-/tmp}/liveavatar-bench-site}
mkdir -p "$SITE"

"$PYTHON" -c 'import sys, torch; print(f"python {sys.version.split()[0]}, torch {torch.__version__}, "
              f"cuda {torch.cuda.is_available()}")'

for wheel in "$CARRY"/*.whl; do
    [ -e "$wheel" ] || continue
    name=$(basename "$wheel")
    if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "$wheel" 2>"$SITE/pip.log"; then
        echo "installed $name"
    else
        # No pip, or a wheel tagged for another Python: a wheel is a zip of the package, so
        # unpacking it still serves pure-Python ones; gpu_speed.py reports what fails to import.
        echo "pip could not install $name ($(tail -n 1 "$SITE/pip.log")); unpacking it instead" >&2
        "$PYTHON" -m zipfile -e "$wheel" "$SITE"
    fi
done
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

if [ -z "${LIVEAVATAR_COMFYUI:-}" ] && [ -d "$CARRY/ComfyUI/comfy" ]; then
    export LIVEAVATAR_COMFYUI="$PWD/$CARRY/ComfyUI"
fi
"$PYTHON" -c 'import diffusers' || { echo "diffusers does not import: put its wheel in $CARRY/" >&2; exit 1; }
"$PYTHON" -c 'import av' 2>/dev/null || echo "PyAV does not import: the e2e part runs without the writer" >&2

SCRIPT=tests/benchmarks/gpu_speed.py
if [[ "${1:-}" == *.py ]]; then
    SCRIPT=$1
    shift
fi
exec "$PYTHON" "$SCRIPT" "$@"
