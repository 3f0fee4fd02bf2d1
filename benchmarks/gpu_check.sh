#!/usr/bin/env bash
# One prepared GPU check (issue 7), for a GPU machine with no network: correctness against PyTorch on the GPU and
# speed of graphopt's CUDA kernels and of the MobileNetV2 fp16 artifact. Writes gpu_check.json (to $OUT if set).
#
# Prepare here first (no GPU needed):   python benchmarks/gpu_check_prepare.py
# then on the GPU machine, from the repo root, carrying .gpu_check:   bash benchmarks/gpu_check.sh
# It installs only from what it carries: TVM's runtime (no compiler: kernels were compiled here) and the
# apache-tvm-ffi wheel; torch, numpy and the rest come from the machine's Python. Budget: about 5 minutes (kernels stop starting after 240 s).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=.gpu_check
OUTDIR="${OUT:-$PWD}"
if [ ! -f "$DATA/kernels/index.json" ]; then
  echo "gpu_check: $DATA is missing; run 'python benchmarks/gpu_check_prepare.py' first and carry $DATA" >&2
  exit 2
fi
PY="${PYTHON:-python3}"
SITE=/tmp/gpu_check_site
rm -rf "$SITE" && mkdir -p "$SITE"
tar -xJf "$DATA/tvm-runtime.tar.xz" -C "$SITE"
"$PY" -m pip install -q --no-index --no-deps --target "$SITE" "$DATA"/wheels/apache_tvm_ffi-*.whl
# graphopt itself, without dependencies (the machine's own torch, numpy, networkx, onnx are used)
# (a failed install is not fatal: gpu_check.py then loads the two helpers it needs from their source files)
"$PY" -m pip install -q --no-index --no-deps --no-build-isolation --target "$SITE/graphopt_pkg" . >/dev/null 2>&1 \
  || echo "gpu_check: graphopt did not install here; kernel checks only" >&2
export PYTHONPATH="$SITE/graphopt_pkg:$SITE:${PYTHONPATH:-}"
export TVM_USE_RUNTIME_LIB=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$PY" -c "import sys, torch, numpy; print(sys.version.split()[0], torch.__version__, numpy.__version__)" || true
export PYTHONUNBUFFERED=1
timeout 330 "$PY" benchmarks/gpu_check.py --data "$DATA" --json "$OUTDIR/gpu_check.json" --budget-s 240 \
  2>&1 | tee "$OUTDIR/gpu_check.log"
