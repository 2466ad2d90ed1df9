"""Checks kernels/_interp.py natively on a GPU: fp8/int8 casts bit-exact vs torch, dot dtypes, tanh."""
import torch, triton, triton.language as tl
from kernels._interp import to_fp8_e4m3, to_int8, tanh, dot, INTERPRETING

@triton.jit
def _casts(x_ptr, y_ptr, z_ptr, t_ptr, n, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    x = tl.load(x_ptr + o, mask=m)
    tl.store(y_ptr + o, to_fp8_e4m3(x), mask=m)
    tl.store(z_ptr + o, to_int8(x), mask=m)
    tl.store(t_ptr + o, tanh(x * 0.01), mask=m)

@triton.jit
def _mm(a_ptr, b_ptr, c_ptr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rm = tl.arange(0, BM); rn = tl.arange(0, BN); rk = tl.arange(0, BK)
    a = tl.load(a_ptr + rm[:, None] * BK + rk[None, :])
    b = tl.load(b_ptr + rk[:, None] * BN + rn[None, :])
    acc = dot(a, b, tl.zeros((BM, BN), dtype=tl.float32))
    tl.store(c_ptr + rm[:, None] * BN + rn[None, :], acc)

print("torch", torch.__version__, "triton", triton.__version__, "interp", INTERPRETING, torch.cuda.get_device_name())
codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
codes = codes[torch.isfinite(codes)].sort().values
x = torch.cat([codes, (codes[1:] + codes[:-1]) / 2, torch.randn(1 << 20) * 100, torch.tensor([500., -1e4, 448.5, 464.])]).cuda()
y = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device="cuda"); z = torch.empty(x.shape, dtype=torch.int8, device="cuda"); t = torch.empty_like(x)
_casts[(triton.cdiv(x.numel(), 1024),)](x, y, z, t, x.numel(), BLOCK=1024)
print("fp8 mismatches", int((y.float() != x.clamp(-448, 448).to(torch.float8_e4m3fn).float()).sum()), "of", x.numel())
print("int8 mismatches", int((z != torch.round(x).clamp(-127, 127).to(torch.int8)).sum()))
print("tanh max err", float((t - torch.tanh(x * 0.01)).abs().max()))
for dt in (torch.float32, torch.float16, torch.bfloat16):
    a = torch.randn(64, 32, device="cuda").to(dt); b = torch.randn(32, 64, device="cuda").to(dt); c = torch.empty(64, 64, device="cuda")
    _mm[(1,)](a, b, c, 64, 64, 32)
    ref = a.double() @ b.double()
    print(dt, "dot relF", float((c.double() - ref).norm() / ref.norm()))
