"""Kernels (kernels.py) and the CUDA fast path (fast.py) against the stock path.

CPU: the torch fallbacks against quant.py, and torch's CPU int4 kernel. Triton: on CUDA (marked `cuda`), or on
CPU through the Triton interpreter when TRITON_INTERPRET=1 (skipped otherwise). The fast backend: decode logits
match the stock bf16 path within bf16 tolerance, and greedy decoding passes the tiny-config oracle (margin
rule) on CUDA."""

from __future__ import annotations

import os

import pytest
import torch

from gemma4_coreai import kernels as K
from gemma4_coreai.quant import pack_int4, q4_0_dequantize

HAS_CUDA = torch.cuda.is_available()
INTERP = os.environ.get("TRITON_INTERPRET") == "1" and K.HAVE_TRITON
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
triton_dev = pytest.mark.skipif(not (HAS_CUDA and K.HAVE_TRITON) and not INTERP,
                                reason="needs Triton on CUDA (or TRITON_INTERPRET=1)")


def rand_q4(n: int, k: int, seed: int, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g)
    d = ((torch.rand(n, k // 32, generator=g) + 0.25) * 0.02 * torch.sign(torch.randn(n, k // 32, generator=g)))
    d = d.half()
    return q, pack_int4(q).to(device), d.to(device)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


def test_dequant_ref_matches_quant():
    q, q4, d = rand_q4(24, 96, 0)
    assert torch.equal(K.q4_dequant_ref(q4, d), q4_0_dequantize(q, d))


def test_gemv_ref():
    q, q4, d = rand_q4(40, 128, 1)
    x = torch.randn(1, 128)
    want = x.double() @ q4_0_dequantize(q, d).double().t()
    assert rel(K.q4_gemv_ref(x, q4, d), want) < 1e-6


def test_cpu_int4_mm_fp32_exact():
    q, q4, d = rand_q4(48, 256, 2)
    packed, sz = K.cpu_int4_pack(q4, d, torch.float32)
    x = torch.randn(3, 256)
    want = x.double() @ q4_0_dequantize(q, d).double().t()
    assert rel(K.cpu_int4_mm(x, packed, sz), want) < 1e-5


@triton_dev
@pytest.mark.cuda
@pytest.mark.parametrize("n,k", [(37, 256), (64, 512), (2560, 2560), (300, 10240)])
def test_triton_gemv(n, k):
    dev = "cuda" if HAS_CUDA else "cpu"
    if not HAS_CUDA and n * k > 1 << 18:
        pytest.skip("too slow in the interpreter")
    q, q4, d = rand_q4(n, k, n + k, dev)
    for dt in (torch.float32, torch.bfloat16):
        x = torch.randn(1, k).to(dt).to(dev)
        want = x.double().cpu() @ q4_0_dequantize(q, d.cpu()).double().t()
        y = torch.full((1, n), float("nan"), dtype=dt, device=dev)
        K.q4_gemv_triton(x, q4, d, out=y, autotune=HAS_CUDA)
        assert not torch.isnan(y).any()
        assert rel(y, want) < (1e-5 if dt == torch.float32 else 8e-3)
        assert rel(torch.ops.gemma4.q4_gemv(x, q4, d), want) < (1e-5 if dt == torch.float32 else 8e-3)


@triton_dev
@pytest.mark.cuda
@pytest.mark.parametrize("n,k", [(37, 256), (2560, 10240)])
def test_triton_dequant_exact(n, k):
    dev = "cuda" if HAS_CUDA else "cpu"
    if not HAS_CUDA and n * k > 1 << 18:
        pytest.skip("too slow in the interpreter")
    q, q4, d = rand_q4(n, k, 7, dev)
    # the interpreter rounds fp32 -> bf16 differently from the GPU (round-to-nearest-even): fp32 only there
    for dt in (torch.float32, torch.bfloat16) if HAS_CUDA else (torch.float32,):
        w = K.q4_dequant_triton(q4, d, dt)
        assert torch.equal(w.cpu(), q4_0_dequantize(q, d.cpu(), dt))


# ---- the fast backend on CUDA ------------------------------------------------------------------------------

@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("compile", [False, True])
def test_fast_decode_matches_stock(tiny_bundle, compile):
    """Teacher-forced along the fp32 path's greedy tokens, the fast path's prefill and decode logits are as close
    to the fp32 stock path as the stock bf16 path is (bf16 tolerance), and its device-side greedy loop equals
    the host loop."""
    from gemma4_coreai.backends import TorchBackend
    from gemma4_coreai.bundle import Bundle
    from gemma4_coreai.fast import FastCudaBackend

    b = Bundle.open(tiny_bundle)
    ref = TorchBackend.from_bundle(b, device="cuda", dtype="fp32", ple_mode="tbl", max_context=96)
    stock = TorchBackend.from_bundle(b, device="cuda", dtype="bf16", ple_mode="tbl", max_context=96)
    fast = FastCudaBackend.from_bundle(b, max_context=96, compile=compile)
    ids = torch.randint(3, b.config.vocab_size, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    lr, ls, lf = ref.prefill(ids), stock.prefill(ids), fast.prefill(ids)
    e_stock, e_fast = [rel(ls, lr)], [rel(lf, lr)]
    tok = int(lr.argmax())
    for _ in range(30):  # past the sliding window (16)
        lr, ls, lf = ref.decode(tok), stock.decode(tok), fast.decode(tok)
        e_stock.append(rel(ls, lr))
        e_fast.append(rel(lf, lr))
        tok = int(lr.argmax())
    assert max(e_fast) < max(2 * max(e_stock), 2e-2), (e_fast, e_stock)
    # device-side greedy loop == host loop
    fast.reset()
    first = int(fast.prefill(ids).argmax())
    dev_toks = fast.greedy(first, 20)
    fast.reset()
    t = int(fast.prefill(ids).argmax())
    host = []
    for _ in range(20):
        t = int(fast.decode(t).argmax())
        host.append(t)
    assert dev_toks == host


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("name", ["tiny", "heterogeneous"])
def test_fast_oracle_margin_rule(name):
    """Greedy tokens of the fast path agree with the fp32 reference (ties under the margin excepted)."""
    pytest.importorskip("transformers.models.gemma4")
    import test_model as tm

    from gemma4_coreai.fast import FastCudaBackend

    ref = tm.reference(name)
    ids = tm.prompt(ref)
    want, want_logits = tm.greedy(tm.backend(ref), ids)
    inner = tm.backend(ref, device="cuda", dtype="bf16", ple_mode="tbl", linear_storage="packed")
    got, got_logits = tm.greedy(FastCudaBackend(inner, compile=True), ids)
    tm.assert_greedy_agrees(got, want, want_logits, tm.HALF_TIE_GAP)
