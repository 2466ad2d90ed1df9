"""Probe (H100): how fast can a Triton K loop with 128x128 fp8 block scales go?

One dense GEMM C[M, N] = sum_kb (A_kb @ B_kb^T) * a_s[m, kb] * b_s[n // 128, kb] (the inner loop of
kernels.grouped_gemm for fp8_block128, without the MoE routing), in variants of the K loop:

  vector   the kernel's loop today: partial = dot(a, b, 0); acc += partial * a_s[:, None] * b_s[None, :]
  scalar   b_s loaded as one scalar per K tile (BLOCK_N <= 128, tiles aligned to the scale blocks)
  unroll2  two K tiles per iteration: both dots issued before either is scaled (K/128 even)
  noscale  acc = dot(a, b, acc): the per-tensor loop, the ceiling of the block-scale variants

Prints TFLOP/s per (variant, tile) and the max |diff| of each scaled variant against `vector`.
Run from the repository root on the GPU: python scripts/gpu_probe_fp8_block.py

Measured on the H100 (2026-11-24, Triton 3.6, M=8192 N=14336 K=4096), TF/s:
  128x128 w8 s3: vector 706, scalar 771, unroll2 798, noscale 1096
  64x128  w4 s4: vector 656, scalar 705, unroll2 659, noscale 815
  64x256  w8 s3: vector 660 (the fused silu+group-quant GEMM1 tile); 128x256 w8 s3: vector 354 (spills)
The kernel took `scalar` (where the tile lies in one scale block) and the scale product first;
unroll2 helps only the 128x128 8-warp tile and needs twice the shared memory per stage (s4
no longer fits), so it would need its own config knob: not taken.
(The GROUP_M swizzle below repeats kernels/grouped_gemm.py's on purpose: the probe stands alone.)
"""
import sys

import torch
import triton
import triton.language as tl


@triton.jit
def _probe_kernel(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, M, N, K,
                  VARIANT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :]
    b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * K + offs_k[:, None]
    KB = K // BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if VARIANT == "unroll2":
        for kt in range(0, KB, 2):
            a0 = tl.load(a_ptrs)
            b0 = tl.load(b_ptrs)
            a1 = tl.load(a_ptrs + BLOCK_K)
            b1 = tl.load(b_ptrs + BLOCK_K)
            p0 = tl.dot(a0, b0, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32))
            p1 = tl.dot(a1, b1, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32))
            as0 = tl.load(as_ptr + offs_m * KB + kt)
            as1 = tl.load(as_ptr + offs_m * KB + kt + 1)
            bs0 = tl.load(bs_ptr + (pid_n * BLOCK_N // 128) * KB + kt)
            bs1 = tl.load(bs_ptr + (pid_n * BLOCK_N // 128) * KB + kt + 1)
            acc += p0 * (as0[:, None] * bs0)
            acc += p1 * (as1[:, None] * bs1)
            a_ptrs += 2 * BLOCK_K
            b_ptrs += 2 * BLOCK_K
    else:
        for kt in range(0, KB):
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
            if VARIANT == "noscale":
                acc = tl.dot(a, b, acc)
            else:
                a_s = tl.load(as_ptr + offs_m * KB + kt)
                partial = tl.dot(a, b, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32))
                if VARIANT == "vector":
                    b_s = tl.load(bs_ptr + (offs_n // 128) * KB + kt)
                    acc += partial * a_s[:, None] * b_s[None, :]
                else:  # scalar
                    b_s = tl.load(bs_ptr + (pid_n * BLOCK_N // 128) * KB + kt)
                    acc += partial * (a_s[:, None] * b_s)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(c_ptrs, acc.to(tl.bfloat16))


def main() -> int:
    M, N, K = (int(v) for v in (sys.argv[1:4] if len(sys.argv) >= 4 else (8192, 14336, 4096)))
    torch.manual_seed(0)
    dev = "cuda"
    a = torch.randn(M, K, device=dev).to(torch.float8_e4m3fn)
    b = torch.randn(N, K, device=dev).to(torch.float8_e4m3fn)
    a_s = torch.rand(M, K // 128, device=dev) + 0.5
    b_s = torch.rand(N // 128, K // 128, device=dev) + 0.5
    flops = 2.0 * M * N * K
    tiles = [(128, 128, 8, 3), (128, 128, 8, 4), (64, 128, 4, 3), (64, 128, 4, 4), (128, 64, 4, 3),
             (64, 256, 8, 3), (128, 256, 8, 3)]
    ref = None
    print(f"M={M} N={N} K={K}")
    print(f"{'variant':<8} {'tile':<16} {'TF/s':>6} {'max|d|':>9}")
    for variant in ("vector", "scalar", "unroll2", "noscale"):
        for bm, bn, warps, stages in tiles:
            if variant in ("scalar", "unroll2") and bn > 128:
                continue  # one b scale per tile needs BLOCK_N <= 128
            c = torch.empty(M, N, device=dev, dtype=torch.bfloat16)
            grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)

            def run():
                _probe_kernel[grid](a, b, c, a_s, b_s, M, N, K, VARIANT=variant, BLOCK_M=bm, BLOCK_N=bn,
                                    BLOCK_K=128, GROUP_M=8, num_warps=warps, num_stages=stages)
            try:
                run()
                torch.cuda.synchronize()
                ms = triton.testing.do_bench(run, warmup=25, rep=200, return_mode="median")
            except Exception as exc:  # shared memory overflow etc.: a row, not a crash
                print(f"{variant:<8} {bm}x{bn} w{warps} s{stages}  failed: {str(exc).splitlines()[0][:80]}")
                continue
            if variant == "vector" and (bm, bn) == (128, 128) and ref is None:
                ref = c.float().clone()
            diff = float((c.float() - ref).abs().max()) if ref is not None and variant != "noscale" else float("nan")
            print(f"{variant:<8} {bm}x{bn} w{warps} s{stages:<3} {flops / ms / 1e9:>6.0f} {diff:>9.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
