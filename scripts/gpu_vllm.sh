#!/usr/bin/env bash
# Runs the vllm backend on a machine without vLLM and without network (the project's GPU image),
# from the bundle scripts/build_vllm_gpu_bundle.sh wrote to .gpu_vllm/ (carry it):
#
#   scripts/gpu_vllm.sh [SUITE ...]        (default: smoke premerge; "none": no suite)
#   VLLM_PROBE=script.py scripts/gpu_vllm.sh none   (a script run with the bundle loaded, first)
#   VLLM_RUN_ARGS="--filter scheme=int8_* --repeat 2 --fresh-seeds" scripts/gpu_vllm.sh nightly
#
# It unpacks vLLM's sources and the carried wheels into a scratch site directory (outside the
# repository), puts it after the repository on PYTHONPATH, prints what the backend loaded
# (version, distribution, bundle, substituted ops), then runs `moe-validate run --backend vllm`
# per suite into $OUT/vllm-SUITE (or reports/vllm-SUITE without $OUT), each log beside it, and
# ends with the exit status of the last failing step (0 when every step passed). On a GPU the
# Triton kernels compile for the device: leave TRITON_INTERPRET unset there; on a CPU (to check
# this script) it is set to 1.
set -uo pipefail
cd "$(dirname "$0")/.."
bundle=${VLLM_BUNDLE:-.gpu_vllm}
site=${VLLM_BUNDLE_SITE:-/tmp/gpu_vllm_site}
out=${OUT:-reports}
python=${PYTHON:-python3}
suites=("$@")
[ ${#suites[@]} -gt 0 ] || suites=(smoke premerge)
sources=$(ls "$bundle"/vllm-*-sources.tar.gz 2>/dev/null | head -1)
[ -n "$sources" ] || { echo "gpu_vllm.sh: no $bundle/vllm-*-sources.tar.gz: run scripts/build_vllm_gpu_bundle.sh here first and carry $bundle" >&2; exit 2; }

t0=$(date +%s)
rm -rf "$site" && mkdir -p "$site"
tar xzf "$sources" -C "$site"
if ls "$bundle"/wheels/*.whl >/dev/null 2>&1; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$bundle"/wheels/*.whl \
    || { echo "gpu_vllm.sh: installing the carried wheels failed (built for another Python? see $bundle/TARGET)" >&2; exit 2; }
fi
export PYTHONPATH="$PWD:$site" PYTHONUNBUFFERED=1
if "$python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  unset TRITON_INTERPRET
else
  export TRITON_INTERPRET=1
fi
echo "== unpacked in $(( $(date +%s) - t0 )) s; TRITON_INTERPRET=${TRITON_INTERPRET:-unset}"
"$python" - <<'EOF' || { echo "gpu_vllm.sh: the vllm backend did not load (above)" >&2; exit 2; }
import torch, triton
from moe_validate import vllm_backend
v = vllm_backend.load_vllm()
from vllm.platforms import current_platform
print(f"torch {torch.__version__}, triton {triton.__version__}, device "
      f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}")
print(f"vllm {v.version} ({v.distribution}; bundle: {v.bundle}); platform {type(current_platform).__name__}")
print("substituted ops:", ", ".join(v.substituted_ops) or "none")
if torch.cuda.is_available() and not current_platform.is_cuda():
    raise SystemExit("on a GPU vLLM chose " + type(current_platform).__name__ + ", not CudaPlatform: its "
                     "kernels would not take their CUDA paths (is the bundle built with --target gpu?)")
EOF

mkdir -p "$out"
status=0
if [ -n "${VLLM_PROBE:-}" ]; then  # a script to run with the bundle loaded, before the suites
  "$python" "$VLLM_PROBE" > "$out/probe.log" 2>&1; rc=$?
  [ $rc -eq 0 ] || status=$rc
  echo "== probe $VLLM_PROBE: rc=$rc"; cat "$out/probe.log"
fi
for suite in "${suites[@]}"; do
  [ "$suite" != none ] || continue
  dir="$out/vllm-$suite"
  # shellcheck disable=SC2086  # VLLM_RUN_ARGS: more `run` arguments, word-split (--filter ... --repeat 2)
  "$python" -m moe_validate.cli run --backend vllm --suite "$suite" --out "$dir" --overwrite --no-report ${VLLM_RUN_ARGS:-} \
    > "$dir.log" 2>&1
  rc=$?
  [ $rc -eq 0 ] || status=$rc
  echo "== $suite: rc=$rc after $(( $(date +%s) - t0 )) s: $(tail -n 2 "$dir.log" | tr '\n' ' ')"
  # a device machine returns at most 8 files, 2 folders down: keep results.jsonl and the log
  [ -z "${OUT:-}" ] || rm -rf "$dir/logs" "$dir/.moe-validate.lock"
done
exit $status
