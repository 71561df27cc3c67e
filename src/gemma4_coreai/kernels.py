"""Hand-written kernels for the CUDA fast path, each with a stock torch fallback that computes the same function.

Only the CUDA fast path (fast.py) uses these; the stock path (model.py's `dequant_linear`) and the Core AI export
never do. Weights stay in the bundle's q4_0 layout (INTERNALS.md): packed uint8 [N, K/2] (column 2j in the low
nibble of byte j, 2j+1 in the high one, stored as q+8) and one scale per 32 inputs [N, K/32] (fp16, or fp32 where
fp16 is not exact). That layout already streams well: each 32-weight block is 16 contiguous bytes, so one thread
loads one block with one 16-byte load, and a warp covers contiguous rows.

- `q4_gemv(x, q4, scale)`: y[N] = W @ x for one token (decode). Triton; reads each weight byte once, fp32
  accumulation, one rounding to x's dtype at the end. Autotuned per (N, K).
- `q4_dequant(q4, scale, dtype)`: W [N, K] in `dtype` (prefill: dequantize, then a tensor-core GEMM).
- `torch.ops.gemma4.q4_gemv` / `torch.ops.gemma4.q4_dequant`: the same, as torch custom ops so that
  `torch.compile` and CUDA graphs treat them as opaque kernels.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:  # Triton is optional: the CPU build of torch has none, and the stock path never needs it.
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    HAVE_TRITON = False

BLOCK = 32


def triton_usable(t: Tensor) -> bool:
    """True when the Triton kernels can run on `t`'s device (CUDA, or the Triton CPU interpreter in tests)."""
    import os

    if not HAVE_TRITON:
        return False
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


# ---- stock fallbacks (the reference the kernels are tested against) --------------------------------------

def q4_dequant_ref(q4: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """packed uint8 [N, K/2] + scale [N, K/32] -> W [N, K] in `dtype` (fp32 products, one rounding)."""
    n = q4.shape[0]
    lo = (q4 & 0x0F).to(torch.int8) - 8
    hi = (q4 >> 4).to(torch.int8) - 8
    q = torch.stack((lo, hi), dim=-1).reshape(n, -1)
    k = q.shape[1]
    w = q.float().view(n, k // BLOCK, BLOCK) * scale.float().unsqueeze(-1)
    return w.view(n, k).to(dtype)


def q4_gemv_ref(x: Tensor, q4: Tensor, scale: Tensor) -> Tensor:
    """x [..., K] (one token) -> y [..., N] = x @ W.T, fp32 accumulation, rounded to x's dtype."""
    w = q4_dequant_ref(q4, scale, torch.float32)
    return (x.float() @ w.t()).to(x.dtype)


# ---- Triton kernels --------------------------------------------------------------------------------------

if HAVE_TRITON:

    def _gemv_configs():
        cfgs = []
        for bn, g, w in ((2, 16, 2), (4, 8, 2), (4, 16, 4), (8, 8, 4), (8, 16, 4), (16, 8, 4), (16, 16, 8),
                         (32, 8, 8), (4, 32, 4), (8, 32, 8)):
            cfgs.append(triton.Config({"BLOCK_N": bn, "GROUPS": g}, num_warps=w, num_stages=3))
        return cfgs

    def _prune(configs, named_args, **kwargs):
        k = named_args["K"]
        ok = [c for c in configs if (k // BLOCK) % c.kwargs["GROUPS"] == 0]
        return ok or [triton.Config({"BLOCK_N": 4, "GROUPS": 1}, num_warps=2)]

    @triton.jit
    def _q4_gemv_kernel(x_ptr, w_ptr, s_ptr, y_ptr, N, K, KG, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr):
        """y[n] = sum_k x[k] * (nib(n, k) - 8) * s[n, k // 32]; BLOCK_N rows per program, GROUPS blocks per step.

        K is a multiple of 32 * GROUPS (the autotuner prunes configs that do not divide it)."""
        pid = tl.program_id(0)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rn < N
        rn_safe = tl.where(rmask, rn, 0).to(tl.int64)
        g = tl.arange(0, GROUPS)
        t = tl.arange(0, 16)
        w_row = w_ptr + rn_safe[:, None, None] * (KG * 16)
        s_row = s_ptr + rn_safe[:, None] * KG
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for g0 in range(0, KG, GROUPS):
            gi = g0 + g
            b = tl.load(w_row + gi[None, :, None] * 16 + t[None, None, :])  # [BN, G, 16] uint8, 16 B / block
            lo = (b & 15).to(tl.float32) - 8.0
            hi = (b >> 4).to(tl.float32) - 8.0
            xoff = gi[:, None] * 32 + t[None, :] * 2
            xe = tl.load(x_ptr + xoff).to(tl.float32)  # [G, 16] even columns
            xo = tl.load(x_ptr + xoff + 1).to(tl.float32)  # odd columns
            part = tl.sum(lo * xe[None, :, :] + hi * xo[None, :, :], axis=2)  # [BN, G]
            sc = tl.load(s_row + gi[None, :]).to(tl.float32)
            acc += tl.sum(part * sc, axis=1)
        tl.store(y_ptr + rn, acc.to(y_ptr.dtype.element_ty), mask=rmask)

    _q4_gemv_tuned = triton.autotune(configs=_gemv_configs(), key=["N", "K"],
                                     prune_configs_by={"early_config_prune": _prune})(_q4_gemv_kernel)

    @triton.jit
    def _q4_dequant_kernel(w_ptr, s_ptr, out_ptr, N, K, KG, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_g = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        gi = pid_g * GROUPS + tl.arange(0, GROUPS)
        t = tl.arange(0, 16)
        kg = KG
        m2 = (rn[:, None] < N) & (gi[None, :] < kg)
        m3 = m2[:, :, None]
        rn64 = rn.to(tl.int64)
        b = tl.load(w_ptr + rn64[:, None, None] * (kg * 16) + gi[None, :, None] * 16 + t[None, None, :], mask=m3,
                    other=8)
        sc = tl.load(s_ptr + rn64[:, None] * kg + gi[None, :], mask=m2, other=0.0).to(tl.float32)[:, :, None]
        lo = ((b & 15).to(tl.float32) - 8.0) * sc
        hi = ((b >> 4).to(tl.float32) - 8.0) * sc
        o = out_ptr + rn64[:, None, None] * (kg * 32) + gi[None, :, None] * 32 + t[None, None, :] * 2
        tl.store(o, lo.to(out_ptr.dtype.element_ty), mask=m3)
        tl.store(o + 1, hi.to(out_ptr.dtype.element_ty), mask=m3)


def _check(q4: Tensor, scale: Tensor) -> tuple[int, int]:
    n, kb = q4.shape
    k = kb * 2
    if q4.dtype != torch.uint8 or scale.shape != (n, k // BLOCK) or k % BLOCK:
        raise ValueError(f"q4_0 weight: expected uint8 [N, K/2] and scale [N, K/32], got {tuple(q4.shape)} "
                         f"{q4.dtype} and {tuple(scale.shape)}")
    return n, k


def q4_gemv_triton(x: Tensor, q4: Tensor, scale: Tensor, out: Tensor | None = None,
                   autotune: bool = True) -> Tensor:
    """Triton GEMV: x [K] or [1, K] (or any [..., K] holding one token) -> y [..., N] in x's dtype."""
    n, k = _check(q4, scale)
    if x.shape[-1] != k or x.numel() != k:
        raise ValueError(f"q4_gemv: x {tuple(x.shape)} is not one token of width {k}")
    xc = x.contiguous()
    y = out if out is not None else torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    if autotune:
        def grid(meta):
            return (triton.cdiv(n, meta["BLOCK_N"]),)

        _q4_gemv_tuned[grid](xc, q4, scale, y, n, k, k // BLOCK)
    else:
        groups = 8 if (k // BLOCK) % 8 == 0 else 1
        _q4_gemv_kernel[(triton.cdiv(n, 8),)](xc, q4, scale, y, n, k, k // BLOCK, BLOCK_N=8, GROUPS=groups, num_warps=4)
    return y


def q4_dequant_triton(q4: Tensor, scale: Tensor, dtype: torch.dtype = torch.bfloat16,
                      out: Tensor | None = None) -> Tensor:
    n, k = _check(q4, scale)
    w = out if out is not None else torch.empty(n, k, dtype=dtype, device=q4.device)
    bn, g = 16, 8
    _q4_dequant_kernel[(triton.cdiv(n, bn), triton.cdiv(k // BLOCK, g))](q4, scale, w, n, k, k // BLOCK, BLOCK_N=bn,
                                                                         GROUPS=g,
                                                                         num_warps=4)
    return w


# ---- dispatch + torch custom ops -------------------------------------------------------------------------

def q4_gemv(x: Tensor, q4: Tensor, scale: Tensor) -> Tensor:
    """One-token int4 GEMV: the Triton kernel where it can run, else the stock reference."""
    if triton_usable(q4):
        return q4_gemv_triton(x, q4, scale, autotune=q4.is_cuda)
    return q4_gemv_ref(x, q4, scale)


def q4_dequant(q4: Tensor, scale: Tensor, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    if triton_usable(q4):
        return q4_dequant_triton(q4, scale, dtype)
    return q4_dequant_ref(q4, scale, dtype)


@torch.library.custom_op("gemma4::q4_gemv", mutates_args=())
def _op_q4_gemv(x: Tensor, q4: Tensor, scale: Tensor) -> Tensor:
    return q4_gemv(x, q4, scale)


@_op_q4_gemv.register_fake
def _(x: Tensor, q4: Tensor, scale: Tensor) -> Tensor:
    return x.new_empty(*x.shape[:-1], q4.shape[0])


@torch.library.custom_op("gemma4::q4_dequant", mutates_args=())
def _op_q4_dequant(q4: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    return q4_dequant(q4, scale, dtype)


@_op_q4_dequant.register_fake
def _(q4: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    return q4.new_empty(q4.shape[0], q4.shape[1] * 2, dtype=dtype)


# ---- CPU: torch's int4 kernels ---------------------------------------------------------------------------

def cpu_int4_pack(q4: Tensor, scale: Tensor, dtype: torch.dtype = torch.bfloat16) -> tuple[Tensor, Tensor]:
    """Bundle q4_0 -> (packed weight, scales_and_zeros [K/32, N, 2]) for `aten._weight_int4pack_mm_for_cpu`.

    torch dequantizes `(u - 8) * scale + zero` with u in [0, 15]: our nibbles are u = q + 8 and zero = 0, so the
    lattice is reproduced exactly up to the scale's rounding to `dtype` (exact for fp32; bf16 rounds fp16 scales)."""
    n, k = _check(q4, scale)
    u = torch.stack(((q4 & 0x0F), (q4 >> 4)), dim=-1).reshape(n, k).to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1)
    sz = torch.stack((scale.to(dtype).t().contiguous(), torch.zeros(k // BLOCK, n, dtype=dtype)), dim=-1)
    return packed, sz.contiguous()


def cpu_int4_mm(x: Tensor, packed: Tensor, sz: Tensor) -> Tensor:
    """x [..., K] -> [..., N] through torch's CPU int4 kernel (group 32), in sz's dtype, cast back to x's."""
    shape = x.shape
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, shape[-1]).to(sz.dtype), packed, BLOCK, sz)
    return y.view(*shape[:-1], -1).to(x.dtype)
