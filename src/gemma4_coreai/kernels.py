"""Hand-written kernels for the CUDA fast path, each with a stock torch fallback that computes the same function.

Only the CUDA fast path (fast.py) uses these; the stock path (model.py's `dequant_linear`) and the Core AI export
never do. Weights stay in the bundle's q4_0 layout (INTERNALS.md): packed uint8 [N, K/2] (column 2j in the low
nibble of byte j, 2j+1 in the high one, stored as q+8) and one scale per 32 inputs [N, K/32] (fp16, or fp32 where
fp16 is not exact). That layout already streams well: each 32-weight block is 16 contiguous bytes, so one thread
loads one block with one 16-byte load, and a warp covers contiguous rows.

- `q4_gemv_partials(x, q4, scale, split, variant)`: one token (decode): fp32 partial sums of W @ x over `split` K
  slices (the caller's next kernel adds them), or with the `GEMV_REDUCE` flag in `variant` (CUDA kernel) their sum
  [1, N], added in the kernel's own epilogue. A CUDA C++ kernel (`q4_gemv_cuda.cu`, built on first use with nvcc)
  where it builds, else Triton (autotuned per shape); both read each weight byte once with exact products and fp32
  accumulation. `variant` picks one of the CUDA kernel's shapes (GEMV_VARIANTS); the tensor-core ones read the
  weights in the "frag" layout (`to_frag_layout`, a load-time permutation of the same bytes). `q4_gemv` is the
  same, summed and rounded to x's dtype.
- `q4_dequant(q4, scale, dtype, frag)`: W [N, K] in `dtype` (prefill: dequantize, then a tensor-core GEMM).
- `torch.ops.gemma4.q4_gemv(_partials)` / `torch.ops.gemma4.q4_dequant`: the same, as torch custom ops so that
  `torch.compile` and CUDA graphs treat them as opaque kernels.
"""

from __future__ import annotations

import warnings

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


# ---- the CUDA C++ GEMV (q4_gemv_cuda.cu), built on first use --------------------------------------------------

_CUDA = {"ext": None, "tried": False, "error": None}


def cuda_ext():
    """The compiled CUDA GEMV extension (nvcc + ninja, built once and cached by torch), or None with one warning
    where it cannot be built; GEMMA4_CUDA_GEMV=0 turns it off (the Triton kernel then runs)."""
    import os

    if _CUDA["tried"]:
        return _CUDA["ext"]
    _CUDA["tried"] = True
    if os.environ.get("GEMMA4_CUDA_GEMV", "1") == "0":
        _CUDA["error"] = "GEMMA4_CUDA_GEMV=0"
        return None
    try:
        from pathlib import Path

        from torch.utils.cpp_extension import load

        _CUDA["ext"] = load(name="gemma4_q4_cuda", sources=[str(Path(__file__).with_name("q4_gemv_cuda.cu"))],
                            extra_cuda_cflags=["-O3", "-std=c++17"], verbose=False)
    except Exception as e:  # noqa: BLE001 - no nvcc/ninja/compiler: the Triton kernel does the same job
        _CUDA["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200] if str(e).strip() else ''}"
        warnings.warn(f"gemma4-coreai: the CUDA int4 GEMV could not be built ({_CUDA['error']}); using the Triton "
                      "kernel", RuntimeWarning, stacklevel=2)
    return _CUDA["ext"]


# ---- kernel variants and the "frag" weight layout -----------------------------------------------------------

# The CUDA kernel's shapes (q4_gemv_cuda.cu `launch_variant`): CUDA-core rows per warp x blocks in flight per lane
# (0 also serves fp16/fp32 x; 1-7 need bf16 x), a read-only probe (8: streams the bytes, computes nothing; benchmarks
# only), and the tensor-core kernel with 1/2/4 chunks of 4 blocks in flight (16-18: bf16 x, frag layout).
GEMV_VARIANTS = {0: "cuda r2u2", 1: "cuda r1u2", 2: "cuda r1u4", 3: "cuda r2u1", 4: "cuda r2u3", 5: "cuda r2u4",
                 6: "cuda r4u1", 7: "cuda r4u2", 8: "read-only r2u2", 16: "mma u1", 17: "mma u2", 18: "mma u4"}
FRAG_VARIANTS = (16, 17, 18)
# Flag OR-ed into a CUDA variant: the kernel adds its K slices itself (the last CTA of each row tile, in slice order)
# and returns [1, N] instead of [split, N]: no separate reduction kernel (q4_gemv_cuda.cu `reduce_split`).
GEMV_REDUCE = 32


# Dynamic shared memory the tensor-core GEMV may use for its K slice of x (q4_gemv_cuda.cu MMA_SMEM_LIMIT).
MMA_SMEM_LIMIT = 48 * 1024 - 128


def set_pdl(on: bool) -> bool:
    """Launch the CUDA GEMVs with programmatic dependent launch (Hopper and later: a GEMV starts, and prefetches its
    weights, while the previous kernel drains). Returns whether it is on: False without the extension, on a GPU
    before sm_90, or where the extension was built without sm_90 code. Process-wide, like the tile counters of the
    in-kernel reduction, which are per device: reducing GEMVs must not run concurrently on two streams."""
    ext = cuda_ext()
    on = bool(on and ext is not None and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9)
    return bool(ext.set_pdl(on)) if ext is not None else False


def frag_ok(n: int, k: int) -> bool:
    """The frag layout (and the tensor-core kernel) needs whole 16-row groups and whole 4-block chunks."""
    return n % 16 == 0 and k % 128 == 0


def to_frag_layout(q4: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """Bundle q4_0 layout -> the tensor-core GEMV's layout, same bytes permuted (any device).

    Rows in groups of 16 (G), K in chunks of 4 blocks (c). For lane (g, t) of the warp owning group G, chunk c holds
    16 bytes for row 16G + g and 16 for row 16G + 8 + g: 4-byte word t of each of the chunk's 4 blocks, so the warp
    reads 1 KB contiguous per chunk. Scales: the 4 of each row's chunk, side by side. A 16-row slice of a frag
    tensor is the frag layout of those rows (row groups are contiguous), so stacking and row views keep working."""
    n, k = _check(q4, scale)
    if not frag_ok(n, k):
        raise ValueError(f"frag layout: N={n} must be a multiple of 16 and K={k} of 128")
    kg = k // BLOCK
    w = q4.contiguous().view(torch.int32).view(n // 16, 2, 8, kg // 4, 4, 4)  # [G, h, g, c, block j, word t]
    w = w.permute(0, 3, 1, 2, 5, 4).contiguous().view(torch.uint8).view(n, k // 2)  # [G, c, h, g, t, j]
    sc = scale.contiguous().view(n // 16, 2, 8, kg // 4, 4).permute(0, 3, 1, 2, 4).contiguous().view(n, kg)
    return w, sc


def _frag_views(q4: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """Frag tensors as words [G, c, h, g, t, j] and scales [G, c, h, g, j] (views, no copy)."""
    n, k = _check(q4, scale)
    kg = k // BLOCK
    return (q4.view(torch.int32).view(n // 16, kg // 4, 2, 8, 4, 4),
            scale.view(n // 16, kg // 4, 2, 8, 4))


def from_frag_layout(q4: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """The inverse of `to_frag_layout`."""
    n, k = _check(q4, scale)
    w, sc = _frag_views(q4.contiguous(), scale.contiguous())
    w = w.permute(0, 2, 3, 1, 5, 4).contiguous().view(torch.uint8).view(n, k // 2)  # [G, h, g, c, j, t]
    return w, sc.permute(0, 2, 3, 1, 4).contiguous().view(n, k // BLOCK)


def q4_rows(q4: Tensor, scale: Tensor, ids: Tensor, dtype: torch.dtype, frag: bool = False) -> Tensor:
    """Rows `ids` of W (packed, or frag layout), dequantized to `dtype` like `q4_dequant_ref`: [len(ids), K]. Plain
    torch indexing and arithmetic, so it compiles into the decode graph."""
    kg, ids = scale.shape[1], ids.reshape(-1).long()
    if frag:  # row r = 16G + 8h + g: its words t of each chunk's 4 blocks, back to block-major order
        w, sc = _frag_views(q4, scale)
        grp, h, g = ids // 16, (ids % 16) // 8, ids % 8
        q4 = w[grp, :, h, g].transpose(2, 3).reshape(-1, kg * 4).contiguous().view(torch.uint8)  # [S, c, j, t]
        scale = sc[grp, :, h, g].reshape(-1, kg)
    else:
        q4, scale = q4[ids], scale[ids]
    return q4_dequant_ref(q4, scale, dtype)


def split_ok(k: int, split: int, variant: int = 0) -> bool:
    """Whether `split` K slices leave none empty (slices are of 32-blocks, or of 4-block chunks for frag)."""
    units = k // BLOCK // (4 if (variant & ~GEMV_REDUCE) in FRAG_VARIANTS else 1)
    return 1 <= split <= units and -(-units // -(-units // split)) == split


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

    @triton.jit
    def _q4_gemv_kernel(x_ptr, w_ptr, s_ptr, out_ptr, N, K, KG, KG_SPLIT, BLOCK_N: tl.constexpr,
                        GROUPS: tl.constexpr):
        """out[pid_k, n] = sum over this program's K slice (KG_SPLIT blocks) of x[k] * q[n, k] * s[n, k // 32], in
        fp32. BLOCK_N rows x GROUPS 32-blocks per step, each block one 16-byte load; the [BLOCK_N, GROUPS]
        accumulator is reduced once at the end."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rn < N
        rn64 = tl.where(rmask, rn, 0).to(tl.int64)
        g = tl.arange(0, GROUPS)
        t = tl.arange(0, 16)
        w_row = w_ptr + rn64[:, None, None] * (KG * 16) + t[None, None, :]
        s_row = s_ptr + rn64[:, None] * KG
        acc = tl.zeros([BLOCK_N, GROUPS], dtype=tl.float32)
        g_start = pid_k * KG_SPLIT
        g_end = tl.minimum(g_start + KG_SPLIT, KG)
        for g0 in range(g_start, g_end, GROUPS):
            gi = g0 + g
            gmask = gi < g_end
            b = tl.load(w_row + gi[None, :, None] * 16, mask=gmask[None, :, None], other=0x88)  # [BN, G, 16]
            lo = (b & 15).to(tl.float32) - 8.0
            hi = (b >> 4).to(tl.float32) - 8.0
            xoff = gi[:, None] * 32 + t[None, :] * 2
            xe = tl.load(x_ptr + xoff, mask=gmask[:, None], other=0.0).to(tl.float32)  # [G, 16] even columns
            xo = tl.load(x_ptr + xoff + 1, mask=gmask[:, None], other=0.0).to(tl.float32)  # odd columns
            part = tl.sum(lo * xe[None, :, :] + hi * xo[None, :, :], axis=2)  # [BN, G]
            sc = tl.load(s_row + gi[None, :], mask=gmask[None, :], other=0.0).to(tl.float32)
            acc += part * sc
        tl.store(out_ptr + pid_k * N + rn, tl.sum(acc, axis=1), mask=rmask)

    _q4_gemv_tuned = triton.autotune(configs=_gemv_configs(), key=["N", "K", "KG_SPLIT"])(_q4_gemv_kernel)

    @triton.jit
    def _q4_dequant_kernel(w_ptr, s_ptr, out_ptr, N, K, KG, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr):
        """W[n, 32g + 2t] = (lo nibble - 8) * s, W[n, 32g + 2t + 1] = (hi nibble - 8) * s."""
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


def gemv_split(n: int, k: int) -> int:
    """K slices for a one-token GEMV. Narrow outputs need several to keep the GPU loading (about 1024 warps of 2
    rows each, the CUDA kernel's shape), long rows (K >= 8192) one more; at most 8, at least 16 blocks a slice.
    From the E4B-shape microbenchmark on an H200 (benchmarks/NOTES.md): more slices than this cost time."""
    kg = k // BLOCK
    split = -(-1024 // -(-n // 2)) * (2 if kg >= 256 else 1)
    split = max(1, min(8, split, kg // 16))
    return -(-kg // -(-kg // split))  # no empty slices: ceil(kg / ceil(kg / split))


def q4_gemv_partials(x: Tensor, q4: Tensor, scale: Tensor, split: int | None = None,
                     autotune: bool = True, impl: str = "auto", variant: int = 0) -> Tensor:
    """GEMV for one token: fp32 partial sums [split, N] over `split` K slices (sum(0) is x @ W.T).

    `impl`: "cuda" (the CUDA C++ kernel), "triton", or "auto" (CUDA where it builds, else Triton). `variant`: one
    of GEMV_VARIANTS (CUDA only; the FRAG_VARIANTS read `to_frag_layout` weights), optionally | GEMV_REDUCE (then
    [1, N]: the sum). Leaving the final sum to the caller lets torch.compile fuse it (and the cast) into the next
    kernel; reducing in the kernel saves that kernel where inductor would not fuse it."""
    n, k = _check(q4, scale)
    if x.shape[-1] != k or x.numel() != k:
        raise ValueError(f"q4_gemv: x {tuple(x.shape)} is not one token of width {k}")
    split = split or gemv_split(n, k)
    if not split_ok(k, split, variant):
        raise ValueError(f"q4_gemv: {split} K slices of K={k} would leave one empty (see gemv_split)")
    kg = k // BLOCK
    kg_split = -(-kg // split)
    if impl != "triton" and q4.is_cuda and cuda_ext() is not None:
        return cuda_ext().q4_gemv_partials(x, q4, scale, split, variant)
    if impl == "cuda" or variant & ~GEMV_REDUCE:
        raise RuntimeError(f"the CUDA GEMV is unavailable: {_CUDA['error'] or 'tensors are not on CUDA'}")
    if variant == GEMV_REDUCE:  # the Triton kernel's partials, summed here
        return q4_gemv_partials(x, q4, scale, split, autotune, impl).sum(0, keepdim=True)
    xc = x.contiguous()
    out = torch.empty(split, n, dtype=torch.float32, device=x.device)
    if autotune:
        def grid(meta):
            return (triton.cdiv(n, meta["BLOCK_N"]), split)

        _q4_gemv_tuned[grid](xc, q4, scale, out, n, k, kg, kg_split)
    else:
        _q4_gemv_kernel[(triton.cdiv(n, 8), split)](xc, q4, scale, out, n, k, kg, kg_split, BLOCK_N=8, GROUPS=8,
                                                    num_warps=4)
    return out


def q4_gemv_triton(x: Tensor, q4: Tensor, scale: Tensor, out: Tensor | None = None, autotune: bool = True,
                   split: int | None = None, impl: str = "auto") -> Tensor:
    """GPU GEMV: x [K] or [1, K] (or any [..., K] holding one token) -> y [..., N] in x's dtype."""
    part = q4_gemv_partials(x, q4, scale, split, autotune, impl)
    y = part.sum(0) if part.shape[0] > 1 else part[0]
    y = y.to(x.dtype).view(*x.shape[:-1], -1)
    if out is None:
        return y
    out.copy_(y)
    return out


def q4_dequant_triton(q4: Tensor, scale: Tensor, dtype: torch.dtype = torch.bfloat16,
                      out: Tensor | None = None) -> Tensor:
    n, k = _check(q4, scale)
    w = out if out is not None else torch.empty(n, k, dtype=dtype, device=q4.device)
    bn, g = 16, 8
    grid = (triton.cdiv(n, bn), triton.cdiv(k // BLOCK, g))
    _q4_dequant_kernel[grid](q4, scale, w, n, k, k // BLOCK, BLOCK_N=bn, GROUPS=g, num_warps=4)
    return w


# ---- decode attention (one query token): split-KV flash decoding in Triton -------------------------------

DECODE_ATTN_BLOCK_T = 32  # keys per inner step
DECODE_ATTN_GROUP = 16    # query rows per split program: a KV head's query heads, padded for tl.dot


if HAVE_TRITON:

    @triton.jit
    def _decode_attn_split_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, m_ptr, l_ptr, acc_ptr, T, T_SPLIT,
                                  sq_h, sk_h, sk_t, sv_h, sv_t, G: tl.constexpr, GP: tl.constexpr,
                                  D: tl.constexpr, BLOCK_T: tl.constexpr):
        """Program (h, s): the G query heads of KV head h against keys [s * T_SPLIT, (s + 1) * T_SPLIT): the running
        max m, sum l and unnormalised output acc of an online softmax (fp32; scores from half-precision products
        with fp32 accumulation, scale 1.0) -> m, l [H, S, G], acc [H, S, G, D]. Keys the mask hides are not read."""
        h = tl.program_id(0)
        sp = tl.program_id(1)
        nsp = tl.num_programs(1)
        g = tl.arange(0, GP)
        d = tl.arange(0, D)
        q = tl.load(q_ptr + (h * G + g)[:, None] * sq_h + d[None, :], mask=(g < G)[:, None], other=0.0)
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        t_begin = sp * T_SPLIT
        t_end = tl.minimum(t_begin + T_SPLIT, T)
        for t0 in range(t_begin, t_end, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            live = t < t_end
            ok = (tl.load(mask_ptr + t, mask=live, other=0) != 0) & live
            k = tl.load(k_ptr + h * sk_h + t[:, None] * sk_t + d[None, :], mask=ok[:, None], other=0.0)
            scores = tl.dot(q, tl.trans(k))  # [GP, BLOCK_T], fp32
            scores = tl.where(ok[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key yet: keep exp() finite
            alpha = tl.exp(m_i - m_use)
            p = tl.exp(scores - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + h * sv_h + t[:, None] * sv_t + d[None, :], mask=ok[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        row = (h * nsp + sp) * G + g
        live_g = g < G
        tl.store(m_ptr + row, m_i, mask=live_g)
        tl.store(l_ptr + row, l_i, mask=live_g)
        tl.store(acc_ptr + row[:, None] * D + d[None, :], acc, mask=live_g[:, None])

    @triton.jit
    def _decode_attn_combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, NSPLIT, so_h, G: tl.constexpr,
                                    D: tl.constexpr, SP: tl.constexpr, BLOCK_D: tl.constexpr):
        """Program (query head r, d block): the splits of r merged at once (rescaled to their common max) and
        normalised -> out[r, d block] in out's dtype. SP >= NSPLIT, a power of two."""
        r = tl.program_id(0)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        h, gi = r // G, r % G
        sp = tl.arange(0, SP)
        live = sp < NSPLIT
        row = (h * NSPLIT + sp) * G + gi
        m = tl.load(m_ptr + row, mask=live, other=float("-inf"))
        m_all = tl.max(m, 0)
        w = tl.exp(m - tl.where(m_all == float("-inf"), 0.0, m_all))
        den = tl.sum(tl.load(l_ptr + row, mask=live, other=0.0) * w, 0)
        num = tl.sum(tl.load(acc_ptr + row[:, None] * D + d[None, :], mask=live[:, None], other=0.0) * w[:, None], 0)
        tl.store(out_ptr + r * so_h + d, (num / den).to(out_ptr.dtype.element_ty))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def decode_attention_ok(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether `decode_attention_triton` takes these: one query token, at most DECODE_ATTN_GROUP query heads per KV
    head, a power-of-two head dim of at least 16 (tl.dot), unit stride along it, one dtype, half precision on a GPU
    (fp32 would run its products in TF32; the interpreter on CPU takes fp32 too), Triton usable."""
    d, g = q.shape[-1], q.shape[1] // k.shape[1]
    return (q.shape[0] == 1 and q.shape[2] == 1 and q.shape[1] % k.shape[1] == 0 and g <= DECODE_ATTN_GROUP
            and d >= 16 and d & (d - 1) == 0 and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
            and q.dtype == k.dtype == v.dtype and (q.dtype in (torch.float16, torch.bfloat16) or not q.is_cuda)
            and triton_usable(q))


def decode_attention_triton(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor) -> Tensor:
    """Attention of one query token (model.py's `attention` contract: q [1, Hq, 1, D]; k, v [1, Hkv, T, D], any
    strides along T and heads, e.g. views of the KV cache; `allowed` [1, T] bool; score scale 1.0; GQA in HF's head
    order) in two kernels: a split-KV online softmax over (KV head, key range) programs, then a merge over
    (query head, 64 dims) programs. Scores and softmax in fp32, unnormalised probabilities rounded to v's dtype for
    the value product (flash-attention numerics)."""
    _, hq, _, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    g, bt = hq // hkv, DECODE_ATTN_BLOCK_T
    nsplit = max(1, min(64, _cdiv(t, bt)))  # enough programs to keep the GPU loading the cache
    t_split = _cdiv(_cdiv(t, nsplit), bt) * bt  # whole key blocks per split
    nsplit = _cdiv(t, t_split)
    mask = allowed.reshape(-1)[-t:].contiguous().view(torch.uint8)
    m = torch.empty(hkv * nsplit * g, dtype=torch.float32, device=q.device)
    lsum = torch.empty_like(m)
    acc = torch.empty(hkv * nsplit * g, d, dtype=torch.float32, device=q.device)
    out = torch.empty(1, hq, 1, d, dtype=q.dtype, device=q.device)
    _decode_attn_split_kernel[(hkv, nsplit)](q, k, v, mask, m, lsum, acc, t, t_split, q.stride(1), k.stride(1),
                                             k.stride(2), v.stride(1), v.stride(2), G=g, GP=DECODE_ATTN_GROUP, D=d,
                                             BLOCK_T=bt, num_warps=8 if d >= 512 else 4)
    block_d = min(d, 64)
    _decode_attn_combine_kernel[(hq, d // block_d)](m, lsum, acc, out, nsplit, out.stride(1), G=g, D=d,
                                                    SP=triton.next_power_of_2(nsplit), BLOCK_D=block_d, num_warps=4)
    return out


# ---- dispatch + torch custom ops -------------------------------------------------------------------------

def q4_gemv(x: Tensor, q4: Tensor, scale: Tensor) -> Tensor:
    """One-token int4 GEMV: the Triton kernel where it can run, else the stock reference."""
    if triton_usable(q4):
        return q4_gemv_triton(x, q4, scale, autotune=q4.is_cuda)
    return q4_gemv_ref(x, q4, scale)


def q4_dequant(q4: Tensor, scale: Tensor, dtype: torch.dtype = torch.bfloat16, frag: bool = False) -> Tensor:
    """W [N, K] in `dtype` from packed (or, with `frag`, frag-layout) weights: the CUDA kernel (16-byte stores)
    where it builds, else Triton, else the reference; all bit-identical (one rounding of q * s)."""
    if q4.is_cuda and cuda_ext() is not None:
        return cuda_ext().q4_dequant(q4, scale, dtype, frag)
    if frag:
        q4, scale = from_frag_layout(q4, scale)
    if triton_usable(q4):
        return q4_dequant_triton(q4, scale, dtype)
    return q4_dequant_ref(q4, scale, dtype)


@torch.library.custom_op("gemma4::q4_gemv", mutates_args=())
def _op_q4_gemv(x: Tensor, q4: Tensor, scale: Tensor) -> Tensor:
    return q4_gemv(x, q4, scale)


@_op_q4_gemv.register_fake
def _(x: Tensor, q4: Tensor, scale: Tensor) -> Tensor:
    return x.new_empty(*x.shape[:-1], q4.shape[0])


@torch.library.custom_op("gemma4::q4_gemv_partials", mutates_args=())
def _op_q4_gemv_partials(x: Tensor, q4: Tensor, scale: Tensor, split: int, variant: int) -> Tensor:
    base = variant & ~GEMV_REDUCE
    if (q4.is_cuda and base) or (triton_usable(q4) and not base):
        return q4_gemv_partials(x, q4, scale, split, autotune=q4.is_cuda, variant=variant)
    if base in FRAG_VARIANTS:  # the stock fallback computes the same function from the frag layout
        q4, scale = from_frag_layout(q4, scale)
    rows = 1 if variant & GEMV_REDUCE else split
    return q4_gemv_ref(x.float(), q4, scale).view(1, -1).expand(rows, -1) / rows


@_op_q4_gemv_partials.register_fake
def _(x: Tensor, q4: Tensor, scale: Tensor, split: int, variant: int) -> Tensor:
    return x.new_empty(1 if variant & GEMV_REDUCE else split, q4.shape[0], dtype=torch.float32)


@torch.library.custom_op("gemma4::decode_attention", mutates_args=())
def _op_decode_attention(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor) -> Tensor:
    if decode_attention_ok(q, k, v):
        return decode_attention_triton(q, k, v, allowed)
    from .model import attention

    return attention(q, k, v, allowed[-1:])


@_op_decode_attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor) -> Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.custom_op("gemma4::q4_dequant", mutates_args=())
def _op_q4_dequant(q4: Tensor, scale: Tensor, dtype: torch.dtype, frag: bool) -> Tensor:
    return q4_dequant(q4, scale, dtype, frag)


@_op_q4_dequant.register_fake
def _(q4: Tensor, scale: Tensor, dtype: torch.dtype, frag: bool) -> Tensor:
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
