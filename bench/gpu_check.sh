#!/usr/bin/env bash
# One command for a GPU machine, in this order: install → profile (bench/profile_engine.py: top
# kernels and their share at batch 1 and 32, text + JSON) → end-to-end benchmark → CUDA tests →
# everything else (op benchmarks, other tests, apps); then a summary.
#
#   bash bench/gpu_check.sh OUTDIR            # on the GPU machine, from anywhere
#   DRY_RUN=1 bash bench/gpu_check.sh OUTDIR  # anywhere: same phases at CPU scale, no install
#
# Writes into OUTDIR: env.txt, install.log, profile.txt + profile.json, bench-e2e.json +
# bench-e2e.log, pytest-gpu.log + junit-gpu.xml (gpu-marked tests), bench-ops.json + bench-ops.log
# + winners.json, pytest-rest.log + junit-rest.xml (the other tests, 8 processes), bench-apps.json
# + bench-apps.log (training, HTTP service, faces), summary.md, status.txt. Every phase is
# time-boxed so the whole run ends within TOTAL_SECONDS (default 530: 9 minutes on an H100
# minus margin); a benchmark phase cut short still writes the results it has (SIGINT
# makes pytest-benchmark save its JSON). Wheels in ./.whl (see bench/README.md) are
# installed first, into /tmp/site, for what the machine lacks (open_clip_torch ...).
set -uo pipefail
OUT="${1:?usage: bash bench/gpu_check.sh OUTDIR}"
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
DRY_RUN="${DRY_RUN:-0}"
TOTAL_SECONDS="${TOTAL_SECONDS:-530}"
PY="${PYTHON:-python3}"
deadline=$((SECONDS + TOTAL_SECONDS))
: > "$OUT/status.txt"

log() { echo "gpu_check [$((SECONDS))s]: $*" | tee -a "$OUT/status.txt" >&2; }

# seconds a phase may take: at most CAP, leaving RESERVE for the phases after it
budget() {
    local cap=$1 reserve=$2 left=$((deadline - SECONDS - $2))
    (( left < cap )) && cap=$left
    (( cap < 5 )) && cap=5
    echo "$cap"
}

# run a phase: NAME LOGFILE CAP RESERVE command...; SIGINT at the limit so pytest writes its reports
phase() {
    local name=$1 logfile=$2 limit
    limit=$(budget "$3" "$4")
    shift 4
    log "$name: up to ${limit}s: $*"
    timeout -s INT -k 20 "$limit" "$@" > "$logfile" 2>&1
    local rc=$?
    log "$name: exit $rc$([ $rc = 124 ] && echo ' (time limit reached: partial)')"
    return $rc
}

# -P: do not put the working directory on sys.path, so tests import the installed package
# (with its compiled extension), not the source tree
PYTEST=("$PY" -P -m pytest)

if [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > "$OUT/wheels.log" 2>&1 \
        && log "installed wheels from .whl into /tmp/site" || log "installing .whl failed: see wheels.log"
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

if [ "$DRY_RUN" = 1 ]; then
    log "DRY_RUN: CPU scale, no install (would run: TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 $PY -m pip install --no-build-isolation --no-deps .)"
    PYTEST=("$PY" -m pytest)  # the source tree stands in for the installed package
    GPU_TEST_ARGS=(tests --co -q -m gpu)
    REST_TEST_ARGS=(tests --co -q -m "not gpu")
    E2E_ARGS=(-k "eager-fp32-ref and image_to_wplus")
    APPS_ARGS=(-k "test_train_iteration[1] or test_serve[1] or test_detect_align[1]")
    OPS_ARGS=(-k "bias_act and ref and not fwdbwd")
    PROFILE_ARGS=(--batch 1)
else
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        log "no CUDA device visible to torch: this script is for a GPU machine (DRY_RUN=1 runs it at CPU scale)"
        exit 2
    fi
    export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
    export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
    phase install "$OUT/install.log" 150 380 "$PY" -m pip install -v --no-build-isolation --no-deps . \
        || log "install failed: the tests and benchmarks below run on whatever is importable"
    # -vv against pytest.ini's -q: one line per test, so a cut-short log still names each result.
    # 6 processes: the Triton tests spend most of their time compiling autotuning candidates
    # (CPU-bound; ~10 s per full-size case), which the first run's serial 150 s could not finish
    GPU_TEST_ARGS=(tests -vv -rfE -m gpu -n 6 --dist load)
    # the rest (Triton on the GPU, models, CLI, services) in parallel: CI runs them too, on the CPU
    REST_TEST_ARGS=(tests -q -rfE -m "not gpu" -n 8 --dist loadfile)
    # a test stuck past this fails with its stack instead of eating the phase (pytest-timeout)
    if "$PY" -c "import pytest_timeout" 2>/dev/null; then
        GPU_TEST_ARGS+=(--timeout 60); REST_TEST_ARGS+=(--timeout 60)
    fi
    E2E_ARGS=()
    APPS_ARGS=()
    # fp16 only: every op case (3 dtypes, ~2000 cases) takes ~10 min; run the file alone for all
    OPS_ARGS=(-k fp16)
    PROFILE_ARGS=()
fi

{
    nvidia-smi 2>&1 || echo "nvidia-smi: not available"
    "$PY" -P -c "import json, mmfs_fast.benchmark as b; print(json.dumps(b.environment(), indent=1))" 2>&1
    "$PY" -m pip list 2>/dev/null | grep -iE "^(torch|triton|open.clip|timm|pytest|numpy|safetensors) "
} > "$OUT/env.txt"
missing=$("$PY" -c "
import importlib.util as u
print(' '.join(m for m in ('open_clip', 'timm', 'torchvision', 'ftfy', 'regex', 'huggingface_hub', 'yaml',
                         'safetensors', 'tqdm', 'pytest_benchmark', 'cpuinfo',
                         'fastapi', 'uvicorn', 'multipart', 'httpx', 'av', 'dlib', 'skimage')
               if u.find_spec(m) is None))")
[ -n "$missing" ] && log "missing modules: $missing (bring wheels in .whl: see bench/README.md)"

# where the time goes first: the profile is what bench/cost_model.py is calibrated against
phase profile "$OUT/profile.log" 45 330 env PYTHONPATH="bench${PYTHONPATH:+:$PYTHONPATH}" "$PY" -P bench/profile_engine.py \
    -o "$OUT/profile.txt" "${PROFILE_ARGS[@]}"
phase bench-e2e "$OUT/bench-e2e.log" 130 200 "${PYTEST[@]}" bench/test_bench_e2e.py -q \
    --benchmark-json="$OUT/bench-e2e.json" --benchmark-columns=median,iqr,rounds,iterations "${E2E_ARGS[@]}"
# the gpu-marked tests: what only this machine can check
phase tests-gpu "$OUT/pytest-gpu.log" 120 80 "${PYTEST[@]}" "${GPU_TEST_ARGS[@]}" --junitxml="$OUT/junit-gpu.xml"
tests_rc=$?
tail -n 3 "$OUT/pytest-gpu.log" | tee -a "$OUT/status.txt"
# everything else, with what time is left: op benchmarks (they rewrite mmfs_fast/ops/winners.json),
# the other tests, training s/iter, HTTP service, faces
phase bench-ops "$OUT/bench-ops.log" 50 30 "${PYTEST[@]}" bench/test_bench_ops.py -q \
    --benchmark-json="$OUT/bench-ops.json" --benchmark-columns=median,iqr,rounds,iterations "${OPS_ARGS[@]}"
[ -f mmfs_fast/ops/winners.json ] && cp mmfs_fast/ops/winners.json "$OUT/winners.json"
phase tests-rest "$OUT/pytest-rest.log" 60 0 "${PYTEST[@]}" "${REST_TEST_ARGS[@]}" --junitxml="$OUT/junit-rest.xml"
rest_rc=$?
(( tests_rc == 0 )) && tests_rc=$rest_rc
tail -n 3 "$OUT/pytest-rest.log" | tee -a "$OUT/status.txt"
phase bench-apps "$OUT/bench-apps.log" 100 0 "${PYTEST[@]}" bench/test_bench_train.py bench/test_bench_serve.py \
    bench/test_bench_faces.py -q -ra --benchmark-json="$OUT/bench-apps.json" \
    --benchmark-columns=median,iqr,rounds,iterations "${APPS_ARGS[@]}"

jsons=()
for f in "$OUT/bench-e2e.json" "$OUT/bench-apps.json" "$OUT/bench-ops.json"; do [ -s "$f" ] && jsons+=("$f"); done
if [ ${#jsons[@]} -gt 0 ]; then
    "$PY" bench/summarize.py "${jsons[@]}" -o "$OUT/summary.md" && log "summary: $OUT/summary.md"
else
    log "no benchmark JSON was written: see bench-*.log"
fi
log "done in ${SECONDS}s; tests exit $tests_rc"
exit "$tests_rc"
