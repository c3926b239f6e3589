#!/usr/bin/env bash
# One command for a GPU machine: bf16 + gradient-checkpointing distill steps of a t5-large-shaped random model, peak
# memory against bench/memory.py's prediction, and a quick inference benchmark. Results: OUT_DIR/gpu_check.json.
#
#   bash bench/gpu_check.sh [OUT_DIR]      # OUT_DIR defaults to $OUT, then ./gpu_check_out
#
# Uses the current python if it imports torch with CUDA; otherwise creates .venv-gpu (system site packages visible,
# so a preinstalled CUDA torch is reused) and pip-installs torch and this package (-e .) into it.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$out"
has_cuda_torch() { "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }
python=python3
if ! has_cuda_torch "$python"; then
    if [ ! -x .venv-gpu/bin/python ]; then
        python3 -m venv --system-site-packages .venv-gpu
    fi
    python=.venv-gpu/bin/python
    has_cuda_torch "$python" || "$python" -m pip install --quiet torch
fi
"$python" -c 'import peft_tagi' 2>/dev/null || "$python" -m pip install --quiet -e .
"$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'
"$python" -m bench.gpu_check --device cuda --out "$out" "${@:2}" \
    2>&1 | tee "$out/gpu_check.log"
