#!/usr/bin/env bash
# The latency gate of `pytest bench/` (bench/regression.py) against a chosen baseline:
#   bash bench/compare.sh [BASELINE_DIR] [pytest args...]   (default: this device kind's)
set -euo pipefail
cd "$(dirname "$0")/.."
baseline=()
[ $# -gt 0 ] && [ -d "$1" ] && { baseline=(--baseline "$1"); shift; }
exec "${PYTHON:-python}" -P -m pytest bench/test_bench_e2e.py bench/test_bench_ops.py -q "${baseline[@]}" "$@"
