#!/usr/bin/env bash
# Regression gate: run the benchmarks and fail when a case's median is more than
# THRESHOLD slower than the committed baseline of this kind of GPU.
#
#   bash bench/compare.sh bench/results/baseline/h100 [THRESHOLD]   (default 15%)
#
# Extra arguments after THRESHOLD go to pytest (e.g. -k "mmfs-fast").
set -euo pipefail
BASELINE="${1:?usage: bash bench/compare.sh BASELINE_DIR [THRESHOLD] [pytest args...]}"
THRESHOLD="${2:-15%}"
shift $(( $# >= 2 ? 2 : 1 ))
cd "$(dirname "$0")/.."
status=0
for kind in e2e ops; do
    if [ ! -s "$BASELINE/$kind.json" ]; then
        echo "compare: no $BASELINE/$kind.json; make one with bench/gpu_check.sh (bench/README.md)" >&2
        status=2
        continue
    fi
    "${PYTHON:-python}" -P -m pytest "bench/test_bench_$kind.py" -q "$@" \
        --benchmark-compare="$BASELINE/$kind.json" --benchmark-compare-fail="median:$THRESHOLD" || status=1
done
exit $status
