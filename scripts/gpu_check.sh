#!/usr/bin/env bash
# The GPU-only checks in one call (made for a lent H100/H200 through the device tool, or any
# CUDA machine). Uses the machine's python3 with torch and transformers; zeroserve's own
# code comes from src/ and the demo models from models/ (build them first with make models).
# Writes logs and figures under ${OUT:-.gpu-out}. Usage: scripts/gpu_check.sh [tests] [share] [estimate]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.gpu-out}; mkdir -p "$OUT"
PY=${GPU_PYTHON:-python3}
if [ -d .whl ]; then   # wheels carried to a machine without a package registry
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:$PWD:${PYTHONPATH:-} ZEROSERVE_HOME=$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
# Parts to run: all by default, or any of: tests share estimate
parts=${*:-tests share estimate}
status=0
for part in $parts; do
  case $part in
    tests) $PY -m pytest -q -s -p no:cacheprovider -o addopts="" tests/gpu 2>&1 | tee "$OUT/pytest.txt" || status=1 ;;
    share) $PY bench/gpu_share.py --out "$OUT/gpu_share.md" 2>&1 | tee "$OUT/gpu_share.log" || status=1 ;;
    estimate) $PY bench/estimate_accuracy.py --out "$OUT/estimate.md" 2>&1 | tee "$OUT/estimate.log" || status=1 ;;
    *) echo "unknown part $part"; status=2 ;;
  esac
done
exit $status
