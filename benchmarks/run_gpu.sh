#!/usr/bin/env bash
# Everything measured on the GPU machine, in one command (about 10 minutes on an H100):
#   bash benchmarks/run_gpu.sh [tests|model|service|all] [RESULTS_DIR]
# GPU tests (pytest -m gpu), the model-level benchmark and the service-level benchmark; logs
# and JSON land in RESULTS_DIR (default bench-results/). Needs the published RMBG-2.0 code in
# third_party/rmbg20 (or RMBG_ARCH_DIR) and, on an offline machine, the carried packages
# (source .device-site/setup.sh first).
set -uo pipefail
part="${1:-all}"
out="${2:-bench-results}"
mkdir -p "$out"
export RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 YOLO_OFFLINE=1 PYTHONUNBUFFERED=1
status=0
run() { [[ "$part" == all || "$part" == "$1" ]]; }
if run tests; then
    python3 -m pytest -m gpu tests/gpu -s -p no:cacheprovider -o addopts="-q --strict-markers -ra" \
        2>&1 | tee "$out/gpu-tests.log" || status=1
fi
if run model; then
    python3 -m benchmarks.model_bench --out "$out/model.json" 2>&1 | tee "$out/model.log" || status=1
fi
if run service; then
    python3 -m benchmarks.service_bench --out "$out/service.json" 2>&1 | tee "$out/service.log" || status=1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.csv" 2>&1 || true
exit $status
