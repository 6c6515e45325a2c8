#!/usr/bin/env bash
# Creates .venv, installs the pinned requirements, then builds and installs mmfs_fast
# (with the CUDA extension when nvcc is found; see README "Install"). The build uses the torch
# requirements.txt pins (the one pyproject.toml names for isolated builds) instead of installing
# a second copy of it, with its CUDA libraries, into a throwaway build environment: a few GB of
# disk a small CI machine may not have.
set -euo pipefail
cd "$(dirname "$0")"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export MAX_JOBS="${MAX_JOBS:-2}"
export PIP_NO_CACHE_DIR=1
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q --no-build-isolation .
