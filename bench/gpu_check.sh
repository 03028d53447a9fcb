#!/usr/bin/env bash
# The GPU run of optden in one offline, time-bounded script (GPU time is lent by the quarter hour).
#
#   bench/gpu_check.sh [OUTDIR]            # on the GPU machine; OUTDIR defaults to $OUT
#   bench/gpu_check.sh --dry-run [OUTDIR]  # the same plumbing on CPU, tiny sizes (CI runs it)
#
# Steps, most important evidence first; each runs under `timeout`, and a step is skipped
# (not started) when the rest of the budget cannot hold its estimate:
#   1 env         GPU, driver, versions, Python.h, libcuda (stop when torch sees no GPU)
#   2 build       the extension with OPTDEN_CUDA=1 for sm_90 (pip -e, offline, no deps)
#   3 smoke       each backend against the float64 oracle; real and random data
#   4 bench-pass  the GEMM pass vs the fused pass, blocked fp32 and the k-NN floor, CIFAR
#                 N = 1..4096 and ImageNet-64 N = 1, 64, each result checked against float64
#   5 tests-gemm  pytest -m gpu tests/gpu/test_gpu_gemm_pass.py (kernel configs, scale)
#   6 tests-a     pytest -m gpu, kernel-level tests (junit)
#   7 bench-in    bench_gpu at ImageNet-64 size, N = 1, 64, 512 (cuda backend excluded)
#   8 bench-c     bench_gpu at CIFAR size, N = 1, 64, 512, 4096 (cuda backend excluded)
#   9 tests-b     pytest -m gpu, the scale tests (M = 50k x 3072, 1e6 x 768)
#  10 nccl        one-rank NCCL ShardedDenoiser against the single-process denoiser
#  11 bench-cu    the cuda backend, CIFAR size, N = 1, 64, 512
#  12 local       bench_local --device cuda: LocalDenoiser (torch passes) against the public
#                 LS / ELS code's way, LS at M = 50,000 x 64 queries, ELS at M = 2,000 x 16 (check.log)
# The GEMM pass's own run (about 5 minutes; it needs no build: the pass is Triton only):
#   GPU_CHECK_STEPS=env,bench-pass,tests-gemm GPU_CHECK_BUDGET=300 bench/gpu_check.sh
# Environment: GPU_CHECK_BUDGET (seconds, default 450), GPU_CHECK_STEPS (comma list of
# step names to run, default all), OPTDEN_TRITON_AUTOTUNE (default 0 here: one fixed
# configuration; autotuning costs minutes of compiles).
# Output (at most 8 files): check.log (every step's output, the build's included, flushed
# as it runs), summary.txt (one line per step), junit-a.xml, junit-b.xml, bench-pass.csv,
# bench-in64.csv, bench-cifar.csv, bench-cuda.csv. Exit status: the number of failed steps.
set -uo pipefail

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
OUTDIR="${1:-${OUT:-}}"
if [[ -z "$OUTDIR" ]]; then
    echo "gpu_check.sh: give an output folder (or set OUT)" >&2
    exit 2
fi
mkdir -p "$OUTDIR" || exit 2
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT" || exit 2
PY="${PYTHON:-python3}"
if [[ $DRY == 1 && -x "$ROOT/.venv/bin/python" && -z "${PYTHON:-}" ]]; then PY="$ROOT/.venv/bin/python"; fi
BUDGET="${GPU_CHECK_BUDGET:-450}"
STEPS="${GPU_CHECK_STEPS:-all}"
export PYTHONUNBUFFERED=1 OPTDEN_TRITON_AUTOTUNE="${OPTDEN_TRITON_AUTOTUNE:-0}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
LOG="$OUTDIR/check.log"
SUMMARY="$OUTDIR/summary.txt"
: >"$LOG"
: >"$SUMMARY"
START=$(date +%s)
FAILED=0

note() { echo "$*" | tee -a "$LOG" "$SUMMARY"; }
left() { echo $((BUDGET - ($(date +%s) - START))); }
wanted() { [[ "$STEPS" == all || ",$STEPS," == *",$1,"* ]]; }

# step NAME ESTIMATE_S TIMEOUT_S CMD...: run CMD under timeout, its output appended to the log.
step() {
    local name=$1 est=$2 lim=$3
    shift 3
    wanted "$name" || return 0
    local rest
    rest=$(left)
    if ((rest < est)); then
        note "SKIP  $name: needs ~${est} s, ${rest} s of the budget left"
        return 0
    fi
    ((lim > rest)) && lim=$rest
    echo "=== $name (limit ${lim} s, $(date -u +%H:%M:%S)): $*" >>"$LOG"
    local t0=$(date +%s) rc
    if declare -F "$1" >/dev/null; then  # a function of this script: timeout needs a process
        timeout -k 10 "$lim" bash -c '"$@"' _ "$@" >>"$LOG" 2>&1
    else
        timeout -k 10 "$lim" "$@" >>"$LOG" 2>&1
    fi
    rc=$?
    local dt=$(($(date +%s) - t0))
    if ((rc == 0)); then
        note "OK    $name (${dt} s)"
    elif ((rc == 124 || rc == 137)); then
        note "TIME  $name: killed at its ${lim} s limit"
        FAILED=$((FAILED + 1))
    else
        note "FAIL  $name: exit $rc (${dt} s)"
        FAILED=$((FAILED + 1))
    fi
    return $rc
}

note "gpu_check.sh $(date -u +%Y-%m-%dT%H:%M:%SZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo none)$(git diff --quiet 2>/dev/null || echo +dirty) dry_run=$DRY budget=${BUDGET}s"

# ---------------------------------------------------------------- 1 env
env_report() {
    echo "uname: $(uname -a)"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv
    echo "nvcc: $(command -v nvcc || echo none) $(nvcc --version 2>/dev/null | tail -1)"
    "$PY" - <<'EOF'
import importlib, os, sys, sysconfig, ctypes.util
print("python", sys.version.split()[0], sys.executable)
inc = sysconfig.get_paths()["include"]
print("Python.h:", os.path.isfile(os.path.join(inc, "Python.h")), inc)
print("libcuda:", ctypes.util.find_library("cuda"))
for m in ("torch", "triton", "numpy", "pybind11", "setuptools", "sklearn", "skimage", "pytest", "faiss"):
    try:
        print(f"{m}: {importlib.import_module(m).__version__}")
    except Exception as e:
        print(f"{m}: missing ({type(e).__name__})")
import torch
print("torch.version.cuda", torch.version.cuda, "cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}, cc {p.major}.{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB, "
          f"L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB")
EOF
}
export -f env_report
export PY DRY OUTDIR
step env 5 60 env_report
if [[ $DRY == 0 ]] && ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    note "STOP: torch sees no GPU"
    exit 1
fi

# ---------------------------------------------------------------- 2 build
build() {
    if [[ $DRY == 1 ]]; then
        # CPU plumbing: the extension as `make setup` builds it (or already built)
        "$PY" -c 'from optden import _ext; print("extension:", _ext.features() or _ext.error)'
        return
    fi
    # a prebuilt extension carried along is used when it imports and has CUDA kernels
    if "$PY" -c 'import optden._C as C, sys; sys.exit(0 if C.build_info().get("cuda") else 1)' 2>/dev/null; then
        echo "prebuilt optden._C with CUDA kernels imports; not rebuilding"
        return
    fi
    OPTDEN_CUDA=1 OPTDEN_CUDA_ARCHS="${OPTDEN_CUDA_ARCHS:-90}" OPTDEN_BUILD_JOBS=0 \
    local blog
    blog=$(mktemp)
    "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e . >"$blog" 2>&1
    local rc=$?
    tail -25 "$blog"
    if ((rc != 0)); then  # an old pip or setuptools without editable builds: build in place
        echo "pip -e failed (exit $rc); trying setup.py build_ext --inplace"
        OPTDEN_CUDA=1 OPTDEN_CUDA_ARCHS="${OPTDEN_CUDA_ARCHS:-90}" OPTDEN_BUILD_JOBS=0 \
            "$PY" setup.py build_ext --inplace >>"$blog" 2>&1
        rc=$?
        tail -15 "$blog"
    fi
    rm -f "$blog"
    "$PY" -c 'import optden._C as C, sys; print(C.build_info()); sys.exit(0 if C.build_info()["cuda"] else 3)' || rc=3
    return $rc
}
export -f build
step build 60 300 build
"$PY" -c 'import optden; print(optden.info())' >>"$LOG" 2>&1

# ---------------------------------------------------------------- 3 smoke
if [[ $DRY == 1 ]]; then DEV=cpu; else DEV=cuda; fi
step smoke 20 120 "$PY" bench/gpu_smoke.py backends --device "$DEV"

# ---------------------------------------------------------------- 4 the GEMM pass: bench (checked against float64), tests
GEMM_TESTS=tests/gpu/test_gpu_gemm_pass.py
if [[ $DRY == 1 ]]; then
    step bench-pass 15 120 "$PY" bench/bench_gpu_pass.py --device cpu --sizes cifar --csv "$OUTDIR/bench-pass.csv"
    step tests-gemm 10 120 "$PY" -m pytest -q -m gpu "$GEMM_TESTS" -p no:cacheprovider
else
    # the bench stops its optional work (config sweeps, then baselines) near --budget-s
    step bench-pass 120 170 "$PY" bench/bench_gpu_pass.py --budget-s 140 --csv "$OUTDIR/bench-pass.csv"
    # -v: each test's outcome is logged as it ends (evidence even if the step is cut off)
    step tests-gemm 60 150 "$PY" -m pytest -v -m gpu "$GEMM_TESTS" -p no:cacheprovider -o addopts="-rA"
fi

# ---------------------------------------------------------------- 6 tests, kernel level
SCALE_K="million or cifar_size"
if [[ $DRY == 1 ]]; then
    # no GPU: the suite must skip cleanly (collection and fixtures are the plumbing)
    step tests-a 20 120 "$PY" -m pytest -q -m gpu tests/gpu -p no:cacheprovider --junitxml="$OUTDIR/junit-a.xml"
else
    step tests-a 90 200 "$PY" -m pytest -q -m gpu tests/gpu -p no:cacheprovider -k "not ($SCALE_K)" \
        --ignore="$GEMM_TESTS" --junitxml="$OUTDIR/junit-a.xml" --maxfail=15 -o addopts="-ra"
fi

# ---------------------------------------------------------------- 7, 8 bench (cuda backend last: slow dot loop)
BENCH_METHODS="optden-triton,optden-torch64,naive-fp32,blocked-fp32,knn-floor"
if [[ $DRY == 1 ]]; then
    step bench-in 10 120 "$PY" bench/bench_gpu.py --device cpu --sizes imagenet64 --max-rows 300 --n 1,4 \
        --methods "$BENCH_METHODS" --csv "$OUTDIR/bench-in64.csv"
    step bench-c 10 120 "$PY" bench/bench_gpu.py --device cpu --sizes cifar --max-rows 2000 --n 1,4 \
        --methods "$BENCH_METHODS" --csv "$OUTDIR/bench-cifar.csv"
else
    step bench-in 60 150 "$PY" bench/bench_gpu.py --sizes imagenet64 --n 1,64,512 --budget 8 \
        --methods "$BENCH_METHODS" --csv "$OUTDIR/bench-in64.csv"
    step bench-c 40 120 "$PY" bench/bench_gpu.py --sizes cifar --n 1,64,512,4096 --budget 8 \
        --methods "$BENCH_METHODS" --csv "$OUTDIR/bench-cifar.csv"
fi

# ---------------------------------------------------------------- 9 tests, scale
if [[ $DRY == 0 ]]; then
    step tests-b 60 150 "$PY" -m pytest -q -m gpu tests/gpu -p no:cacheprovider -k "$SCALE_K" --ignore="$GEMM_TESTS" \
        --junitxml="$OUTDIR/junit-b.xml" -o addopts="-ra"
fi

# ---------------------------------------------------------------- 10 nccl
step nccl 10 60 "$PY" bench/gpu_smoke.py nccl --device "$DEV"

# ---------------------------------------------------------------- 11 the cuda backend
if [[ $DRY == 1 ]]; then
    step bench-cu 5 60 "$PY" bench/bench_gpu.py --device cpu --sizes cifar --max-rows 500 --n 1 \
        --methods optden-cuda --csv "$OUTDIR/bench-cuda.csv"
else
    step bench-cu 20 90 "$PY" bench/bench_gpu.py --sizes cifar --n 1,64,512 --budget 10 \
        --methods optden-cuda --csv "$OUTDIR/bench-cuda.csv"
fi

# ---------------------------------------------------------------- 12 the local denoisers (output in check.log)
if [[ $DRY == 1 ]]; then
    step local 10 180 "$PY" bench/bench_local.py --device cpu --gpu-step --quick --size 12 --csv ""
else
    step local 60 90 "$PY" bench/bench_local.py --device cuda --csv ""
fi

note "done in $(($(date +%s) - START)) s; $FAILED step(s) failed"
exit $FAILED
