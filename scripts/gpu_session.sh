#!/usr/bin/env bash
# The GPU checks and timings of docs/benchmarks.md ("For a session with a GPU"), in stages
# that each fit one short call on a lent machine (CUDA, torch and triton installed there;
# no network needed). Logs, JSON and an environment summary go to $OUT (default gpu-out/).
#
#   bash scripts/gpu_session.sh tests      # correctness on the device (~3-5 min)
#   bash scripts/gpu_session.sh act        # activation ratios, fp32 then bf16 (~5 min)
#   bash scripts/gpu_session.sh model      # LeNet5 / ResNet50 steps and folding (~5 min)
#   bash scripts/gpu_session.sh all        # the three above, in that order
#
# Each stage builds the C extensions in place first (a few seconds) and runs from src/,
# so no pip install is needed on the device. Exit status: the first failing step's.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
status=0

step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, remember the first failure
    local name=$1
    shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc"
    [ "$status" -ne 0 ] || status=$rc
}

setup() {
    "$PY" setup.py build_ext --inplace >"$OUT/build.log" 2>&1 || echo "C build failed (see build.log)"
    {
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
        "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except ImportError as e:
    print("triton missing:", e)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
EOF
    } >"$OUT/env.txt" 2>&1
    cat "$OUT/env.txt"
}

tests() {
    # the device-only tests first (Triton compiled for this GPU; inductor's CUDA kernels),
    # then the layers, conversion and kernels with CUDA present
    step gpu-tests "$PY" -m pytest -q -m gpu tests
    step kernel-tests "$PY" -m pytest -q -x tests/kernels tests/test_normalized.py tests/test_devices.py
}

act() {
    step act-fp32 "$PY" benchmarks/run.py --device cuda --only act --json "$OUT/act-fp32.json"
    step act-bf16 "$PY" benchmarks/run.py --device cuda --only act --dtype bfloat16 \
        --json "$OUT/act-bf16.json"
}

model() {
    step model "$PY" benchmarks/run.py --device cuda --only lenet,resnet,fold --json "$OUT/model.json"
}

setup
case "${1:-all}" in
    tests) tests ;;
    act) act ;;
    model) model ;;
    all) tests; act; model ;;
    *) echo "usage: $0 tests|act|model|all" >&2; exit 2 ;;
esac
exit "$status"
