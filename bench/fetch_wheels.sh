#!/usr/bin/env bash
# Download, into ./.whl (git-ignored), the wheels an offline GPU machine lacks for
# bench/gpu_check.sh: what the device machines' image did not hold on 2026-11-26
# (it has torch 2.11, triton, timm, torchvision, scikit-image, httpx, pytest-benchmark,
# pytest-xdist, pytest-timeout). About 40 MB, under the device tool's 64 MiB.
#
#   bash bench/fetch_wheels.sh [PYTHON_VERSION]   (default 3.12, the GPU machine's)
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER="${1:-3.12}"
# one version of each (two stop the install), as they installed together on the H200
WHEELS=(open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4                        # CLIP
        fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic-core==2.50.5  # HTTP service
        annotated-types==0.8.0 typing-inspection==0.4.5 opentelemetry-api==1.45.2
        uvicorn==0.54.0 python-multipart==0.0.34
        av==18.1.0)                                                              # video
rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "${WHEELS[@]}"
du -sh .whl
