#!/usr/bin/env bash
# A few smoke cases through the vllm backend on a GPU from the carried bundle (.gpu_vllm), for a
# short device call: scripts/gpu_vllm_cases.sh FILTER (the syntax of run --filter).
set -uo pipefail
cd "$(dirname "$0")/.."
site=/tmp/gpu_vllm_site; rm -rf "$site" && mkdir -p "$site"
tar xzf .gpu_vllm/vllm-*-sources.tar.gz -C "$site"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .gpu_vllm/wheels/*.whl || exit 2
export PYTHONPATH="$PWD:$site" PYTHONUNBUFFERED=1; unset TRITON_INTERPRET
python3 -m moe_validate.cli run --backend vllm --suite smoke --filter "$1" --out "${OUT:-reports}/vllm-cases" --overwrite --no-report
