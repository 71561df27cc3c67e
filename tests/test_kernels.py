"""Kernels (kernels.py) and the CUDA fast path (fast.py) against the stock path.

CPU: the torch fallbacks against quant.py, and torch's CPU int4 kernel. Triton: on CUDA (marked `cuda`), or on
CPU through the Triton interpreter when TRITON_INTERPRET=1 (skipped otherwise). The fast backend: decode logits
match the stock bf16 path within bf16 tolerance, and greedy decoding passes the tiny-config oracle (margin
rule) on CUDA."""

from __future__ import annotations

import itertools
import os
import re

import numpy as np
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


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Every backend compiles the same step functions, and dynamo's recompile limit (8 per code object) counts
    across the session: past it, a later test's steps would quietly run eager. Each test starts from zero."""
    torch._dynamo.reset()


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


@pytest.mark.parametrize("variant", [0, 16])
def test_gemv_op_reduce_flag_shapes(variant):
    """The custom op's contract off the GPU (stock fallback, and the fake kernel torch.compile traces with): [split, N]
    partials, or [1, N] with GEMV_REDUCE; either way the rows sum to x @ W.T."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    n, k, split = 32, 256, 2
    q, q4, d = rand_q4(n, k, 11, "cpu")
    w = K.to_frag_layout(q4, d) if variant in K.FRAG_VARIANTS else (q4, d)
    x = torch.randn(1, k)
    want = x.double() @ q4_0_dequantize(q, d).double().t()
    for flag, rows in ((0, split), (K.GEMV_REDUCE, 1)):
        got = torch.ops.gemma4.q4_gemv_partials(x, *w, split, variant | flag)
        assert got.shape == (rows, n) and rel(got.sum(0, keepdim=True), want) < 1e-5, flag
        with FakeTensorMode() as mode:
            fake = torch.ops.gemma4.q4_gemv_partials(mode.from_tensor(x), *map(mode.from_tensor, w), split,
                                                     variant | flag)
        assert fake.shape == (rows, n) and fake.dtype == torch.float32
    # the flag does not change which splits are valid: K = 256 has 8 blocks but only 2 tensor-core chunks
    assert K.split_ok(k, 3, K.GEMV_REDUCE) and not K.split_ok(k, 3, 16 | K.GEMV_REDUCE)


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
@pytest.mark.parametrize("hq,hkv,d,t,pos,window", [(4, 2, 32, 48, 30, 16), (8, 2, 64, 100, 99, None),
                                                   (8, 1, 16, 7, 3, None), (2, 2, 32, 33, 32, 4),
                                                   (8, 2, 16, 4096, 4000, 512), (8, 2, 16, 3000, 2999, None),
                                                   (8, 2, 256, 64, 40, None), (8, 2, 512, 32, 31, 16),
                                                   (8, 2, 256, 512, 300, 512), (8, 2, 512, 4096, 4000, None)])
def test_decode_attention_triton(hq, hkv, d, t, pos, window):
    """The split-KV decode attention against model.py's `attention` in fp64: GQA groups of 1 to 8, K/V as strided
    views of a cache (as the model passes them), causal and sliding-window masks with keys past the position (and
    whole splits masked), several key blocks per split (T > 2048), peaked and diffuse softmaxes. Within
    half-precision error of fp64, and no worse than the stock path in the same dtype. (The Triton interpreter
    multiplies bf16 wrongly, so on CPU it runs in fp16 and fp32; bf16 on CUDA.)"""
    from gemma4_coreai.model import attention

    if not HAS_CUDA and d * t > 1 << 16:
        pytest.skip("too slow in the interpreter")
    dev = "cuda" if HAS_CUDA else "cpu"
    g = torch.Generator().manual_seed(t + d)
    for dt, q_scale in itertools.product((torch.bfloat16, torch.float16) if HAS_CUDA else
                                         (torch.float16, torch.float32), (1.0, d ** -0.5)):
        q = (torch.randn(1, hq, 1, d, generator=g) * q_scale).to(dt).to(dev)
        cache = torch.randn(2, 3, hkv, t + 8, 2 * d, generator=g).to(dt).to(dev)
        k, v = cache[0, 1:2, :, :t, :d], cache[1, 1:2, :, :t, :d]
        keys = torch.arange(t, device=dev)
        allowed = (keys <= pos) & ((keys > pos - window) if window else True)
        assert K.decode_attention_ok(q, k, v)
        got = K.decode_attention_triton(q, k, v, allowed.view(1, t))
        assert got.shape == q.shape and got.dtype == dt
        want = attention(q.double(), k.double(), v.double(), allowed.view(1, t))
        err = float((got.double() - want).abs().max())
        stock = float((attention(q, k, v, allowed.view(1, t)).double() - want).abs().max())
        assert err < (1e-5 if dt == torch.float32 else max(2 * stock, 1e-2)), (dt, q_scale, err, stock)


def test_decode_attention_op_in_compiled_step():
    """The opt-in decode attention as a custom op inside the fast path's compiled step (CPU inductor, kv_len
    dynamic; off the GPU the op computes model.py's attention): the step tracks the eager stock model past the
    sliding window and across two kv_len buckets, and reads the cache in place (no copy of it in the code)."""
    from hf_reference import build_reference, mini
    from torch._inductor.utils import run_and_get_code

    from gemma4_coreai.fast import fused_decode_attention, scatter_kv_write, stack_projections
    from gemma4_coreai.model import Gemma4Model, set_attention, set_kv_write

    ref = build_reference(mini())
    ctx = 24

    def make():
        return Gemma4Model(ref.cfg, ref.weights, ple_mode="tbl", max_context=ctx, linear_storage="packed",
                           ple_table=ref.ple_table, ple_scale=ref.ple_scale).eval()

    stock, fused = make(), make()
    stack_projections(fused)
    set_kv_write(fused, scatter_kv_write)
    set_attention(fused, fused_decode_attention)
    step = compiled_decode(fused)
    toks = torch.randint(3, ref.cfg.vocab_size, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.inference_mode():
        ids = torch.tensor([toks[:3]])
        stock(ids, torch.tensor(0), kv_len=ctx)
        fused(ids, torch.tensor(0), kv_len=ctx)
        for p, t in enumerate(toks[3:], 3):
            ids, pos = torch.tensor([[t]]), torch.tensor(p)
            want = stock(ids, pos, kv_len=ctx)[0, -1]
            kv_len = 8 if p < 8 else ctx
            if p == 3:
                got, code = run_and_get_code(step, ids, pos, kv_len)
                calls = [line for line in "\n".join(code).splitlines()
                         if "gemma4.decode_attention.default(" in line and not line.lstrip().startswith("#")]
                assert calls and not cache_copies("\n".join(code), fused.k_cache)
                # K and V go in as strided views of the cache inputs, not as copies of them
                assert all(line.count("reinterpret_tensor(arg") >= 2 for line in calls), calls
            else:
                got = step(ids, pos, kv_len)
            assert float((got - want).abs().max()) <= 1e-4, p


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
@pytest.mark.filterwarnings("error:torch.compile", "error:capturing the prefill")  # no silent fallback
@pytest.mark.parametrize("opts", [{"compile": False}, {"compile": True},
                                  {"compile": True, "pdl": False, "reduce": False, "compile_prefill": False},
                                  {"compile": True, "decode_attention": "stock"}, {"compile": "regional"}],
                         ids=["eager", "compiled", "compiled-no-pdl-no-reduce", "compiled-stock-attention",
                              "regional"])
def test_fast_decode_matches_stock(tiny_bundle, opts, monkeypatch):
    """Teacher-forced along the fp32 path's greedy tokens, the fast path's prefill and decode logits are as close
    to the fp32 stock path as the stock bf16 path is (bf16 tolerance), also for a prompt prefilled in pieces
    (a 1-token piece included), and its device-side greedy loop equals the host loop."""
    import gemma4_coreai.fast as fast_module
    from gemma4_coreai.backends import TorchBackend
    from gemma4_coreai.bundle import Bundle
    from gemma4_coreai.fast import FastCudaBackend

    b = Bundle.open(tiny_bundle)
    ref = TorchBackend.from_bundle(b, device="cuda", dtype="fp32", ple_mode="tbl", max_context=96)
    stock = TorchBackend.from_bundle(b, device="cuda", dtype="bf16", ple_mode="tbl", max_context=96)
    fast = FastCudaBackend(TorchBackend.from_bundle(b, device="cuda", dtype="bf16", ple_mode="tbl", max_context=96,
                                                    linear_storage="packed"), **opts)
    ids = torch.randint(3, b.config.vocab_size, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    lr, ls = ref.prefill(ids), stock.prefill(ids)
    for cuts, chunk in (((25, 26), None), ((39,), None), ((), 16)):  # pieces of 25, 1, 14; 39, 1; chunks of 16
        if chunk:
            monkeypatch.setattr(fast_module, "PREFILL_CHUNK", chunk)
        fast.reset()
        for lo, hi in zip((0, *cuts), (*cuts, len(ids)), strict=True):
            lf = fast.prefill(ids[lo:hi])
        assert fast.position == len(ids)
        assert rel(lf, lr) < max(2 * rel(ls, lr), 2e-2), (cuts, chunk)
    # compiled prefill: the pieces above went through prefill graphs (padded to 16, 32 and 64 tokens)
    graphed = {k[1] for k in fast._graphs if isinstance(k, tuple)}
    assert graphed == ({16, 32, 64} if fast._prefill_fn is not None else set())
    monkeypatch.undo()
    fast.reset()
    lf = fast.prefill(ids)
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
def test_fast_prefill_graphs_match_ungraphed(tiny_bundle):
    """Prompt pieces through prefill graphs (padded; a piece crossing a KV bucket; one too long for a graph; one
    too close to the end of the cache for its padding) give the logits and positions of the same compiled prefill
    without graphs, and decoding on from them agrees (the PDL settle after each replay changes nothing). A prefill
    that fails to compile falls back with a warning and still gives the right logits and position."""
    from gemma4_coreai.backends import TorchBackend
    from gemma4_coreai.bundle import Bundle
    from gemma4_coreai.fast import KV_BUCKET, PREFILL_GRAPH_LENGTHS, FastCudaBackend

    b = Bundle.open(tiny_bundle)
    ctx = 2 * KV_BUCKET + 100

    def make(**kw):
        return FastCudaBackend(TorchBackend.from_bundle(b, device="cuda", dtype="bf16", max_context=ctx,
                                                        linear_storage="packed"), **kw)

    graphs, plain = make(), make(cuda_graph=False)
    ids = torch.randint(3, b.config.vocab_size, (ctx,), generator=torch.Generator().manual_seed(5)).tolist()
    top = PREFILL_GRAPH_LENGTHS[-1]
    pieces = [(0, 20), (20, KV_BUCKET - 10), (KV_BUCKET - 10, KV_BUCKET + 10), (KV_BUCKET + 10, KV_BUCKET + top + 60),
              (ctx - 30, ctx - 3)]  # the last: 27 tokens, padded to 32, would pass the end of the cache
    for be in (graphs, plain):
        be.reset()
    for lo, hi in pieces:
        if lo != graphs.position:  # the last piece: skip ahead (the slots in between are never compared)
            graphs._position = plain._position = lo
        got, want = graphs.prefill(ids[lo:hi]), plain.prefill(ids[lo:hi])
        assert graphs.position == plain.position == hi
        assert rel(got, want) < 1e-2, (lo, hi)
    # graphs: (padded length, KV bucket); the piece over 512 tokens and the last one ran without
    lengths = {k[1:] for k in graphs._graphs if isinstance(k, tuple)}
    assert lengths == {(32, KV_BUCKET), (top, 2 * KV_BUCKET), (32, 2 * KV_BUCKET)}, lengths
    # each replay was followed by the PDL settle (one direct GEMV, output discarded), the plain engine never ran it
    assert (graphs._settle is not None) == graphs.pdl and plain._settle is None
    graphs.reset()
    plain.reset()
    first_g, first_p = graphs.prefill(ids[:50]), plain.prefill(ids[:50])
    assert rel(first_g, first_p) < 1e-2
    tok = int(first_p.argmax())
    for _ in range(5):
        g, p = graphs.decode(tok), plain.decode(tok)
        assert rel(g, p) < 1e-2
        tok = int(p.argmax())

    def broken(*args, **kwargs):
        raise RuntimeError("injected")

    graphs.reset()
    graphs._graphs = {k: v for k, v in graphs._graphs.items() if not isinstance(k, tuple)}
    graphs._prefill_fn = broken
    with pytest.warns(UserWarning, match="torch.compile failed .*injected.*running the prefill step eagerly"):
        got = graphs.prefill(ids[:50])
    assert graphs.position == 50 and graphs._prefill_fn is None
    # the fallback is the eager prefill: compare with eager, not with the compiled one (bf16 fusion rounding differs)
    eager = make(compile_prefill=False, cuda_graph=False)
    eager.reset()
    assert rel(got, eager.prefill(ids[:50])) < 1e-3


@requires_cuda
@pytest.mark.cuda
def test_fast_prefill_graphs_env_switch(tiny_bundle, monkeypatch):
    """GEMMA4_PREFILL_GRAPHS=0 turns the prefill graphs off (a prompt then leaves no prefill graph behind); they are
    on by default."""
    from gemma4_coreai.backends import TorchBackend
    from gemma4_coreai.bundle import Bundle
    from gemma4_coreai.fast import FastCudaBackend

    b = Bundle.open(tiny_bundle)

    def make():
        return FastCudaBackend(TorchBackend.from_bundle(b, device="cuda", dtype="bf16", max_context=64,
                                                        linear_storage="packed"))

    monkeypatch.delenv("GEMMA4_PREFILL_GRAPHS", raising=False)
    assert make().prefill_graphs
    monkeypatch.setenv("GEMMA4_PREFILL_GRAPHS", "0")
    off = make()
    assert not off.prefill_graphs
    off.prefill(list(range(3, 23)))
    assert off.position == 20 and not any(isinstance(k, tuple) for k in off._graphs)


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


# ---- the fast path's KV-cache write under torch.compile (CPU inductor: the same functionalization and
# ---- reinplacing passes as on CUDA, only the code generator differs) -----------------------------------------

def cache_copies(code: str, cache: torch.Tensor) -> list[str]:
    """Buffers of the cache's shape that inductor's generated code allocates (a functional copy of the cache)."""
    shape = ", ".join(map(str, cache.shape))
    return [line.strip() for line in code.splitlines() if re.search(rf"empty_strided\w*\(\({shape}\)", line)]


def compiled_decode(model):
    """The fast path's compiled step (fast.FastCudaBackend._step: kv_len a dynamic int), on any device."""
    return torch.compile(lambda ids, pos, n: model(ids, pos, kv_len=n)[0, -1], fullgraph=True, dynamic=True)


@pytest.mark.parametrize("strategy", ["stock", "fast"])
def test_kv_write_in_place_under_inductor(strategy):
    """The stock KV write (slice view + index_copy_: what Core AI export needs) makes inductor allocate and fill a
    whole new cache per owning layer (~20 GB per E4B token: NOTES.md); the fast path's `scatter_kv_write` writes
    into the cache buffer itself (checked here together with `stack_projections`: the fast path's whole model
    transform compiles with fullgraph). Both compute the same function: eager logits and caches are
    bit-identical, and the compiled step tracks eager within fp32 fusion rounding."""
    from hf_reference import build_reference, mini
    from torch._inductor.utils import run_and_get_code

    from gemma4_coreai.fast import scatter_kv_write, stack_projections
    from gemma4_coreai.model import Gemma4Model, set_kv_write

    ref = build_reference(mini())
    ctx = 24

    def make(fast=False):
        m = Gemma4Model(ref.cfg, ref.weights, ple_mode="tbl", max_context=ctx, linear_storage="packed",
                        ple_table=ref.ple_table, ple_scale=ref.ple_scale).eval()
        if fast:
            stack_projections(m)
            set_kv_write(m, scatter_kv_write)
        return m

    fast = strategy == "fast"
    stock, swapped, compiled = make(), make(fast), make(fast)
    step = compiled_decode(compiled)
    toks = torch.randint(3, ref.cfg.vocab_size, (10,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.inference_mode():
        # A 3-token prefill (S > 1 writes several positions), then S=1 steps past the sliding window (4).
        ids = torch.tensor([toks[:3]])
        assert torch.equal(stock(ids, torch.tensor(0), kv_len=ctx), swapped(ids, torch.tensor(0), kv_len=ctx))
        compiled(ids, torch.tensor(0), kv_len=ctx)
        for p, t in enumerate(toks[3:], 3):
            ids, pos = torch.tensor([[t]]), torch.tensor(p)
            want = stock(ids, pos, kv_len=ctx)[0, -1]
            assert torch.equal(swapped(ids, pos, kv_len=ctx)[0, -1], want)
            if p == 3:
                got, code = run_and_get_code(step, ids, pos, ctx)
                code = "\n".join(code)
            else:
                got = step(ids, pos, ctx)
            assert float((got - want).abs().max()) <= 1e-4
    assert torch.equal(stock.k_cache, swapped.k_cache) and torch.equal(stock.v_cache, swapped.v_cache)
    assert torch.allclose(compiled.k_cache, stock.k_cache, atol=1e-5)
    assert torch.allclose(compiled.v_cache, stock.v_cache, atol=1e-5)
    big = cache_copies(code, compiled.k_cache)
    owning = sum(spec.owns_kv for spec in ref.cfg.layers)
    if fast:
        assert big == [], big
        # one GEMM per stacked group: q/k/v -> 1 on owning layers, gate/up -> 1 everywhere
        linears = sum(1 for _ in make().q4_linears())
        assert code.count("extern_kernels.mm(") == linears - 2 * owning - ref.cfg.num_layers
    else:
        assert big, "expected the stock write to copy the cache"  # documents why the fast path swaps the write


@pytest.mark.parametrize("name", ["tiny", "e2b_like", "heterogeneous"])
def test_stack_projections_exact_and_shares_memory(name):
    """Stacked q/k/v and gate/up (stock dequant strategy, fp32): prefill and decode logits bit-identical to the
    separate products, one linear call per group, and no new weight memory (the originals become views)."""
    from hf_reference import CONFIGS, build_reference

    from gemma4_coreai.fast import stack_projections
    from gemma4_coreai.model import Gemma4Model, dequant_linear, gather_ple_rows, set_linear_fn

    ref = build_reference(CONFIGS[name]())
    cfg = ref.cfg
    ids = torch.randint(3, cfg.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))
    rows = gather_ple_rows(ref.ple_table, ref.ple_scale, ids, cfg.ple_dim)
    a, b = (Gemma4Model(cfg, ref.weights, max_context=32, linear_storage="packed") for _ in range(2))

    def weight_bytes(m):
        return sum(s.nbytes() for s in {t.untyped_storage().data_ptr(): t.untyped_storage() for t in m.buffers()}
                   .values())

    before = weight_bytes(b)
    stack_projections(b)
    assert weight_bytes(b) == before
    calls = []
    set_linear_fn(b, lambda mod, x: calls.append(mod.name) or dequant_linear(mod, x))
    with torch.no_grad():
        assert torch.equal(a(ids, torch.tensor(0), rows), b(ids, torch.tensor(0), rows))
        assert torch.equal(a(ids[:, :1], torch.tensor(20), rows[:, :1]), b(ids[:, :1], torch.tensor(20), rows[:, :1]))
    # per forward: PLE model projection + lm_head, and per layer q(kv) + o + gate/up + down + the two PLE ones
    assert len(calls) == 2 * (2 + 6 * cfg.num_layers)
    assert "layers.0.self_attn.stacked_proj" in calls and "layers.0.mlp.stacked_proj" in calls


def test_sdpa_attention_matches_stock():
    """The fast path's prefill attention (one fused SDPA call) computes model.attention's function: GQA in HF's
    head order, score scale 1.0, causal and sliding masks; one query row falls through to the stock code."""
    from gemma4_coreai.fast import sdpa_attention
    from gemma4_coreai.model import attention, attention_mask

    g = torch.Generator().manual_seed(5)
    for s, t, window in ((7, 7, None), (5, 12, 4), (1, 9, 3)):
        q = torch.randn(1, 8, s, 16, generator=g)
        k, v = torch.randn(1, 2, t, 16, generator=g), torch.randn(1, 2, t, 16, generator=g)
        allowed = attention_mask(torch.arange(t - s, t), t, window)
        want = attention(q, k, v, allowed)
        assert float((sdpa_attention(q, k, v, allowed) - want).abs().max()) < 1e-5


@pytest.mark.parametrize("frag", [False, True])
def test_fast_strategies_prefill_matches_stock(frag):
    """With the fast path's strategies in (frag layout where shapes allow it, stacked projections, scatter KV
    write, SDPA attention, its linear function: on CPU the custom ops' stock fallbacks), chunked prefill then
    decode logits equal the stock model's in fp32 (summation order aside)."""
    from hf_reference import build_reference, tiny

    from gemma4_coreai.fast import fast_linear, scatter_kv_write, sdpa_attention, stack_projections, use_frag_layout
    from gemma4_coreai.model import Gemma4Model, set_attention, set_kv_write, set_linear_fn

    ref = build_reference(tiny())
    a, b = (Gemma4Model(ref.cfg, ref.weights, ple_mode="tbl", max_context=48, linear_storage="packed",
                        ple_table=ref.ple_table, ple_scale=ref.ple_scale).eval() for _ in range(2))
    if frag:  # the tiny config has both: K = 128, 256 convert; the PLE projection (K = 32) stays packed
        n_frag = use_frag_layout(b)
        layouts = {lin.layout for _, lin in b.q4_linears()}
        assert n_frag > 0 and layouts == {"frag", "packed"}
    stack_projections(b)
    set_kv_write(b, scatter_kv_write)
    set_attention(b, sdpa_attention)
    set_linear_fn(b, fast_linear)
    ids = torch.randint(3, ref.cfg.vocab_size, (1, 31), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        for start, chunk in ((0, ids[:, :20]), (20, ids[:, 20:30]), (30, ids[:, 30:])):
            want = a(chunk, torch.tensor(start), kv_len=48, last_only=True)
            got = b(chunk, torch.tensor(start), kv_len=start + chunk.shape[1], last_only=True)
            assert float((got - want).abs().max()) < 1e-4


def test_tune_gemv_moves_winning_shapes_to_frag(monkeypatch):
    """The tuner's bookkeeping, on CPU with a stand-in timer: every candidate's call (on the real weights or their
    temporary frag copies, through the custom op's stock fallback) computes x @ W.T; shapes where a tensor-core
    variant is timed fastest move to the frag layout with their stacked parts re-pointed, the PLE projection
    (K = 32) stays packed, and the model's prefill and decode logits are unchanged."""
    from hf_reference import build_reference, tiny

    import gemma4_coreai.fast as fast
    from gemma4_coreai.model import Gemma4Model, set_linear_fn

    ref = build_reference(tiny())
    a, b = (Gemma4Model(ref.cfg, ref.weights, ple_mode="tbl", max_context=48, linear_storage="packed",
                        ple_table=ref.ple_table, ple_scale=ref.ple_scale).eval() for _ in range(2))
    fast.stack_projections(b)
    first = {}  # the first linear of each shape: the tuner's first timing set
    for _, lin in b.q4_linears():
        if lin.q4._base is None:
            first.setdefault((lin.out_features, lin.in_features), (lin.q4, lin.scale))
    seen = set()

    def timer(calls, key):
        n, k, v, sp, lay = key
        seen.add(lay)
        x = calls[0].__defaults__[-1]
        with torch.inference_mode():
            got = calls[0]().sum(0)
        assert torch.allclose(got, K.q4_gemv_ref(x, *first[(n, k)])[0], atol=1e-4), key
        return 1.0 + sp / 100 + (0.0 if lay == "frag" else 0.5)

    monkeypatch.setattr(fast, "cuda_ext", lambda: object())  # candidates as where the CUDA kernel builds
    report = fast.tune_gemv(b, torch.float32, timer=timer, reduce=True)
    assert seen == {"packed", "frag"}
    for (n, k), r in report.items():
        assert r["layout"] == ("frag" if K.frag_ok(n, k) else "packed") and r["pick"][1] == 1, ((n, k), r)
        assert r["reduce"] and not r["pick"][0] & K.GEMV_REDUCE, r
    for _, lin in b.q4_linears():
        assert lin.layout == ("frag" if K.frag_ok(lin.out_features, lin.in_features) else "packed"), lin.name
        if lin.q4._base is None:  # the linears the fast path calls reduce in the kernel
            assert lin.gemv[0] & K.GEMV_REDUCE, lin.name
    set_linear_fn(b, fast.fast_linear)
    ids = torch.randint(3, ref.cfg.vocab_size, (1, 21), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        for start, chunk in ((0, ids[:, :20]), (20, ids[:, 20:])):
            want_l = a(chunk, torch.tensor(start), kv_len=48, last_only=True)
            got_l = b(chunk, torch.tensor(start), kv_len=48, last_only=True)
            assert float((got_l - want_l).abs().max()) < 1e-4


def test_tune_gemv_cache(monkeypatch, tmp_path):
    """Tuning picks kept across processes: a second model on the same cache is not timed at all and gets the same
    kernels, splits and layouts; an entry that is no longer a candidate is timed again and replaced; the file
    keeps one section per header, survives a corrupt file, and GEMMA4_GEMV_TUNE=fresh ignores it."""
    from hf_reference import build_reference, tiny

    import gemma4_coreai.fast as fast
    from gemma4_coreai.model import Gemma4Model

    ref = build_reference(tiny())

    def model():
        m = Gemma4Model(ref.cfg, ref.weights, ple_mode="tbl", max_context=48, linear_storage="packed",
                        ple_table=ref.ple_table, ple_scale=ref.ple_scale).eval()
        fast.stack_projections(m)
        return m

    timed = []

    def timer(calls, key):
        timed.append(key)
        n, k, v, sp, lay = key
        return 1.0 + sp / 100 + (0.0 if lay == "frag" else 0.5)

    def picks(m):
        return {lin.name: (lin.gemv, lin.layout) for _, lin in m.q4_linears() if lin.q4._base is None}

    monkeypatch.setattr(fast, "cuda_ext", lambda: object())
    monkeypatch.delenv("GEMMA4_GEMV_TUNE", raising=False)
    path = tmp_path / "cache" / "gemv-tuning.json"
    c1 = fast.GemvTuningCache("gpu A", path)
    a = model()
    rep_a = fast.tune_gemv(a, torch.float32, timer=timer, reduce=True, cache=c1.picks)
    c1.save()
    # every shape with more than one candidate was timed and cached (the K = 32 PLE projection has one)
    assert timed and len(c1.picks) == sum(r["tried"] > 1 for r in rep_a.values()) > 0
    assert not list(path.parent.glob(".*.tmp"))
    timed.clear()
    c2 = fast.GemvTuningCache("gpu A", path)
    b = model()
    rep_b = fast.tune_gemv(b, torch.float32, timer=timer, reduce=True, cache=c2.picks)
    assert not timed and picks(b) == picks(a)
    assert all(r["tried"] == (0 if rep_a[shape]["tried"] > 1 else 1) for shape, r in rep_b.items())
    stale = next(iter(c2.picks))
    c2.picks[stale] = [16, 999, "frag", 1.0]  # not a candidate any more
    fast.tune_gemv(model(), torch.float32, timer=timer, reduce=True, cache=c2.picks)
    assert timed and {(n, k) for n, k, *_ in timed} == {tuple(map(int, stale.split()[0].split("x")))}
    assert c2.picks[stale][1] != 999
    c2.save()
    other = fast.GemvTuningCache("gpu B", path)
    assert other.picks == {}
    other.picks["x"] = [0, 1, "packed", 2.0]
    other.save()
    assert fast.GemvTuningCache("gpu A", path).picks == c2.picks  # sections side by side
    monkeypatch.setenv("GEMMA4_GEMV_TUNE", "fresh")
    assert fast.GemvTuningCache("gpu A", path).picks == {}
    monkeypatch.delenv("GEMMA4_GEMV_TUNE")
    path.write_text("{not json")
    assert fast.GemvTuningCache("gpu A", path).picks == {}
    fast.GemvTuningCache("gpu A", tmp_path / "file" / "x.json").save()  # nothing to save: no error
    (tmp_path / "ro").write_text("")  # a file where the directory should be: saving is skipped quietly
    blocked = fast.GemvTuningCache("gpu A", tmp_path / "ro" / "x.json")
    blocked.picks["y"] = [0, 1, "packed", 1.0]
    blocked.save()


@pytest.mark.parametrize("frag", [False, True])
def test_embedding_from_int4_head(frag):
    """On a QAT-like model (embedding on the q4_0 lattice) the head's rows, gathered and dequantized from either
    layout, are bit-identical to the 16-bit table, so the fast path frees the table and the logits do not move;
    a head that differs from the table by one value keeps the table."""
    from hf_reference import build_reference, tiny

    from gemma4_coreai.fast import embed_from_head, fast_linear, use_frag_layout
    from gemma4_coreai.model import Gemma4Model, set_linear_fn

    ref = build_reference(tiny())
    a, b = (Gemma4Model(ref.cfg, ref.weights, ple_mode="tbl", max_context=48, linear_storage="packed",
                        ple_table=ref.ple_table, ple_scale=ref.ple_scale).eval() for _ in range(2))
    if frag:  # frag weights need the fast path's linear function
        use_frag_layout(b)
        set_linear_fn(b, fast_linear)
        assert b.lm_head.layout == "frag"
    ids = torch.tensor([[0, 5, 17, 300, ref.cfg.vocab_size - 1, 5]])
    assert torch.equal(K.q4_rows(b.lm_head.q4, b.lm_head.scale, ids, a.embed_tokens.dtype, frag),
                       a.embed_tokens[ids[0]])
    assert embed_from_head(b, rows_per_check=100)
    assert b.embed_tokens.numel() == 0
    with torch.inference_mode():
        assert torch.equal(b.embed(ids), a.embed(ids))
        want = a(ids, torch.tensor(0), kv_len=ids.shape[1])
        assert float((b(ids, torch.tensor(0), kv_len=ids.shape[1]) - want).abs().max()) < 1e-5
    c = Gemma4Model(ref.cfg, ref.weights, ple_mode="tbl", max_context=48, linear_storage="packed",
                    ple_table=ref.ple_table, ple_scale=ref.ple_scale).eval()
    c.embed_tokens = c.embed_tokens.clone()
    c.embed_tokens[7, 3] += 1
    assert not embed_from_head(c) and c.embed_tokens.numel() > 0


def test_embedding_from_head_with_the_table_held_elsewhere():
    """`FastCudaBackend.from_bundle` builds the model with an empty stand-in for the 16-bit embedding and passes the
    table (on the host) to `embed_from_head`: it switches to the head when the table is on the lattice, so the GPU
    never holds the table, and reports False for a table that is not (the backend then installs it)."""
    from hf_reference import build_reference, tiny

    from gemma4_coreai.fast import EMBEDDING, _Without, embed_from_head
    from gemma4_coreai.model import Gemma4Model

    ref = build_reference(tiny())
    table = ref.weights[EMBEDDING]
    def build(weights):
        return Gemma4Model(ref.cfg, weights, ple_mode="tbl", max_context=48, linear_storage="packed",
                           ple_table=ref.ple_table, ple_scale=ref.ple_scale).eval()

    a = build(ref.weights)
    b, c = (build(_Without(ref.weights, EMBEDDING, table[:0])) for _ in range(2))
    assert b.embed_tokens.shape == (0, table.shape[1])
    assert embed_from_head(b, rows_per_check=100, table=table)
    ids = torch.tensor([[0, 5, 17, 300, ref.cfg.vocab_size - 1]])
    with torch.inference_mode():
        assert torch.equal(b.embed(ids), a.embed(ids))
    off = table.clone()
    off[ref.cfg.vocab_size - 1, 0] += 1  # in the last chunk
    assert not embed_from_head(c, rows_per_check=100, table=off) and c.embed_tokens.numel() == 0


def test_compile_layers_one_graph_per_layer_kind():
    """Regional compilation (`compile_layers`, the fast path's compile="regional"), on CPU with the tiny model: the
    compiled layers track the eager model over decode steps, and dynamo builds one graph per layer kind (sliding or
    full, own or shared KV cache) for the one-token calls, not one per layer: the KV slot stays symbolic."""
    from hf_reference import build_reference, tiny
    from torch._dynamo.utils import counters

    from gemma4_coreai.fast import compile_layers, scatter_kv_write, uncompile_layers
    from gemma4_coreai.model import Gemma4Model, set_kv_write

    ref = build_reference(tiny())

    def build():
        m = Gemma4Model(ref.cfg, ref.weights, ple_mode="tbl", max_context=48, linear_storage="packed",
                        ple_table=ref.ple_table, ple_scale=ref.ple_scale).eval()
        set_kv_write(m, scatter_kv_write)
        return m

    torch._dynamo.reset()
    counters.clear()
    eager, regional = build(), build()
    step = compile_layers(regional)(lambda ids, pos, n: regional(ids, pos, kv_len=n))
    ids = torch.randint(3, ref.cfg.vocab_size, (16,), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        for m in (eager, regional):
            with torch.compiler.set_stance("force_eager"):  # the prompt eagerly: only one-token graphs get built
                m(ids[None, :10], torch.tensor(0), kv_len=10)
        for p in range(10, 16):
            want = eager(ids[None, p:p + 1], torch.tensor(p), kv_len=p + 1)
            got = step(ids[None, p:p + 1], torch.tensor(p), p + 1)
            assert float((got - want).abs().max()) < 1e-3, p
    kinds = {(spec.kind, spec.owns_kv) for spec in ref.cfg.layers}
    assert len(kinds) > 1 and len(ref.cfg.layers) > len(kinds)
    assert counters["stats"]["unique_graphs"] == len(kinds)
    # outside the wrapper (verify's forward_all, the eager prefill) the fast path forces eager: no graph per layer
    with torch.inference_mode(), torch.compiler.set_stance("force_eager"):
        regional(ids[None, :12], torch.tensor(0), kv_len=12)
    assert counters["stats"]["unique_graphs"] == len(kinds)
    uncompile_layers(regional)
    assert all(layer._compiled_call_impl is None for layer in regional.layers)


def test_embedding_from_head_follows_a_later_layout_change():
    """The fast backend switches the embedding before tuning, which may then move the head to the frag layout:
    the gather reads the head's layout at call time, so rows stay bit-identical."""
    from hf_reference import build_reference, tiny

    from gemma4_coreai.fast import _to_frag, embed_from_head
    from gemma4_coreai.model import Gemma4Model

    ref = build_reference(tiny())
    a, b = (Gemma4Model(ref.cfg, ref.weights, ple_mode="tbl", max_context=48, linear_storage="packed",
                        ple_table=ref.ple_table, ple_scale=ref.ple_scale).eval() for _ in range(2))
    assert embed_from_head(b)
    _to_frag(b.lm_head)
    ids = torch.tensor([[0, 5, 17, 300, ref.cfg.vocab_size - 1]])
    with torch.inference_mode():
        assert torch.equal(b.embed(ids), a.embed(ids))


def test_frag_layout_feeds_mma_fragments():
    """The frag layout against the tensor-core kernel's contract, emulated on CPU: lane (g, t) of the warp owning
    rows 16G.. loads 16 bytes per row half per 4-block chunk; its nibbles, unpacked as q4_gemv_cuda.cu does, placed
    in mma.m16n8k16's A fragment (PTX ISA layout), with x permuted into the B fragment the same way, give x @ W.T.
    And the layout round-trips, and 16-row slices of it are the layout of those rows."""
    n, k = 32, 256
    q, q4, d = rand_q4(n, k, 7)
    x = torch.randn(k).bfloat16().float()
    fw, fs = K.to_frag_layout(q4, d)
    assert fw.shape == q4.shape and fs.shape == d.shape and not torch.equal(fw, q4)
    back = K.from_frag_layout(fw, fs)
    assert torch.equal(back[0], q4) and torch.equal(back[1], d)
    assert torch.equal(K.to_frag_layout(q4[16:], d[16:])[0], fw[16:])
    words = fw.view(torch.int32).view(-1, 4).numpy().astype(np.int64) & 0xFFFFFFFF  # [uint4 index, j]
    scales = fs.float().view(-1).numpy()
    nc = k // 128

    def pair(w, shift):  # nib2bf16: nibbles at bits shift and shift + 16 -> (low half, high half) = q
        return ((w >> shift) & 15) - 8, ((w >> (shift + 16)) & 15) - 8

    acc = np.zeros(n)
    for grp in range(n // 16):
        for c in range(nc):
            for j in range(4):
                blk = 4 * c + j
                dmat = np.zeros((16, 8))
                # the block's two mma steps: A regs from nibble shifts (0, 4) then (8, 12), B from x pairs
                for sh0, sh1, xi in ((0, 4, (0, 4, 1, 5)), (8, 12, (2, 6, 3, 7))):
                    a_mat, b_mat = np.zeros((16, 16)), np.zeros((16, 8))
                    for lane in range(32):
                        g, t = lane >> 2, lane & 3
                        ra = words[((grp * nc + c) * 2 + 0) * 32 + lane, j]
                        rb = words[((grp * nc + c) * 2 + 1) * 32 + lane, j]
                        xs = x[blk * 32 + 8 * t: blk * 32 + 8 * t + 8].numpy()
                        # A fragment (PTX ISA): reg0 row g k 2t.., reg1 row g+8 k 2t.., reg2 row g k 2t+8.., reg3
                        a_mat[g, 2 * t:2 * t + 2], a_mat[g + 8, 2 * t:2 * t + 2] = pair(ra, sh0), pair(rb, sh0)
                        a_mat[g, 2 * t + 8:2 * t + 10] = pair(ra, sh1)
                        a_mat[g + 8, 2 * t + 8:2 * t + 10] = pair(rb, sh1)
                        # B fragment: reg0 k 2t.. column g, reg1 k 2t+8.. column g (x in every column)
                        b_mat[2 * t:2 * t + 2, g] = xs[xi[0]], xs[xi[1]]
                        b_mat[2 * t + 8:2 * t + 10, g] = xs[xi[2]], xs[xi[3]]
                    dmat += a_mat @ b_mat
                assert np.allclose(dmat, dmat[:, :1])  # every column the same sum
                for g in range(8):  # lane (g, 0) scales and accumulates rows g and g + 8
                    for row, h in ((g, 0), (g + 8, 1)):
                        sc = scales[((grp * nc + c) * 2 + h) * 32 + g * 4 + j]
                        acc[grp * 16 + row] += dmat[row, 0] * sc
    want = (x.double() @ q4_0_dequantize(q, d.float()).double().t()).numpy()
    assert np.allclose(acc, want, rtol=1e-9, atol=1e-9)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["cuda", "triton"])
@pytest.mark.parametrize("n,k", [(37, 256), (300, 2560), (2560, 10240)])
def test_gpu_gemv_partials(impl, n, k):
    """Both GPU GEMVs, every K split, x in fp32/bf16/fp16, scales fp16/fp32: the partials sum to x @ W.T (fp32
    accumulation of exact products), every output written (an unwritten one would show as a wrong sum)."""
    q, q4, d = rand_q4(n, k, n * k, "cuda")
    kg = k // 32
    for sdt in (torch.float16, torch.float32):
        dd = d.to(sdt)
        want_w = q4_0_dequantize(q, dd.cpu().float()).double()
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            x = torch.randn(1, k).to(dt)
            want = x.double() @ want_w.t()
            for split in sorted({1, 2, 3, K.gemv_split(n, k)}):
                if -(-kg // -(-kg // split)) != split:
                    continue
                part = K.q4_gemv_partials(x.cuda(), q4, dd, split, impl=impl)
                assert part.shape == (split, n) and part.dtype == torch.float32
                assert not torch.isnan(part).any()
                assert rel(part.sum(0).cpu(), want) < 2e-6, (sdt, dt, split)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("n,k", [(48, 384), (2560, 2560), (96, 10240)])
def test_gpu_gemv_variants(n, k):
    """Every CUDA kernel variant (bf16 x; the tensor-core ones on the frag layout), scales fp16/fp32, every valid
    split up to 8: the partials sum to x @ W.T within fp32 accumulation error; the read-only probe is skipped."""
    if K.cuda_ext() is None:
        pytest.skip(f"the CUDA GEMV did not build: {K._CUDA['error']}")
    q, q4, d = rand_q4(n, k, n + k, "cuda")
    x = torch.randn(1, k).bfloat16()
    for sdt in (torch.float16, torch.float32):
        dd = d.to(sdt)
        want = x.double() @ q4_0_dequantize(q, dd.cpu().float()).double().t()
        fq4, fd = K.to_frag_layout(q4, dd)
        for v, name in K.GEMV_VARIANTS.items():
            if name.startswith("read-only"):
                continue
            w = (fq4, fd) if v in K.FRAG_VARIANTS else (q4, dd)
            for split in (1, 2, 3, 5, 8):
                if not K.split_ok(k, split, v):
                    continue
                part = K.q4_gemv_partials(x.cuda(), *w, split, variant=v)
                assert part.shape == (split, n) and not torch.isnan(part).any()
                assert rel(part.sum(0).cpu(), want) < 1e-5, (name, sdt, split)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("n,k", [(48, 384), (2560, 2560), (96, 10240), (262144, 256), (37, 256), (300, 10240)])
def test_gpu_gemv_reduce_and_pdl(n, k):
    """The in-kernel split-K sum (variant | GEMV_REDUCE): for every variant and split, with and without programmatic
    dependent launch, [1, N] equal to the partials' in-order sum, bit for bit (same fp32 products, same order);
    repeated launches agree (the tile counters reset themselves), also replayed inside one CUDA graph. N = 262144
    spans more row tiles than one wave of CTAs; N = 37 and 300 leave idle warps and part-filled row tiles."""
    if K.cuda_ext() is None:
        pytest.skip(f"the CUDA GEMV did not build: {K._CUDA['error']}")
    q, q4, d = rand_q4(n, k, 7 * n + k, "cuda")
    x = torch.randn(1, k).bfloat16().cuda()
    fq4, fd = K.to_frag_layout(q4, d) if K.frag_ok(n, k) else (None, None)
    try:
        for pdl in (False, True):
            K.set_pdl(pdl)
            for v, name in K.GEMV_VARIANTS.items():
                if name.startswith("read-only") or (v in K.FRAG_VARIANTS and fq4 is None):
                    continue
                w = (fq4, fd) if v in K.FRAG_VARIANTS else (q4, d)
                for split in (1, 2, 3, 7):
                    if not K.split_ok(k, split, v):
                        continue
                    part = K.q4_gemv_partials(x, *w, split, variant=v)
                    want = part[0].clone()
                    for i in range(1, split):
                        want += part[i]
                    for _ in range(2):
                        got = K.q4_gemv_partials(x, *w, split, variant=v | K.GEMV_REDUCE)
                        assert got.shape == (1, n) and torch.equal(got[0], want), (name, split, pdl)
        K.set_pdl(True)
        v = 17 if fq4 is not None else 3
        w = (fq4, fd) if fq4 is not None else (q4, d)
        want = K.q4_gemv_partials(x, *w, 2, variant=v).sum(0)
        graph, outs = torch.cuda.CUDAGraph(), []
        with torch.cuda.graph(graph):
            for _ in range(3):
                outs.append(torch.ops.gemma4.q4_gemv_partials(x, *w, 2, v | K.GEMV_REDUCE))
        for _ in range(2):
            graph.replay()
            torch.cuda.synchronize()
            for o in outs:
                assert rel(o[0].cpu().double(), want.cpu().double()) < 1e-6
    finally:
        K.set_pdl(False)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("n,k", [(37, 96), (48, 384), (2560, 2560)])
def test_gpu_dequant_exact(n, k):
    """The CUDA dequantize (packed, and frag where the shape allows it) is bit-identical to the reference in every
    output dtype, scales fp16 and fp32."""
    if K.cuda_ext() is None:
        pytest.skip(f"the CUDA GEMV did not build: {K._CUDA['error']}")
    _, q4, d = rand_q4(n, k, 3 * n + k, "cuda")
    for sdt in (torch.float16, torch.float32):
        dd = d.to(sdt)
        for dt in (torch.bfloat16, torch.float16, torch.float32):
            want = K.q4_dequant_ref(q4, dd, dt)
            assert torch.equal(K.q4_dequant(q4, dd, dt), want), (sdt, dt)
            if K.frag_ok(n, k):
                assert torch.equal(K.q4_dequant(*K.to_frag_layout(q4, dd), dt, frag=True), want), (sdt, dt)


def test_fast_backend_refuses_bad_switches(tiny_bundle, monkeypatch):
    """One clear line for a switch the fast path does not know, and for an inner backend it cannot wrap (checked
    before anything is loaded onto a GPU)."""
    from gemma4_coreai.backends import TorchBackend
    from gemma4_coreai.bundle import Bundle
    from gemma4_coreai.errors import Gemma4Error
    from gemma4_coreai.fast import FastCudaBackend

    inner = TorchBackend.from_bundle(Bundle.open(tiny_bundle), device="cpu", max_context=32, linear_storage="packed")
    with pytest.raises(Gemma4Error, match="unknown decode attention 'flash': expected one of stock, triton"):
        FastCudaBackend(inner, decode_attention="flash")
    monkeypatch.setenv("GEMMA4_DECODE_ATTENTION", "paged")
    with pytest.raises(Gemma4Error, match="unknown decode attention 'paged'"):
        FastCudaBackend(inner)
    monkeypatch.delenv("GEMMA4_DECODE_ATTENTION")
    with pytest.raises(Gemma4Error, match="unknown compile mode 'layers': expected True, False or 'regional'"):
        FastCudaBackend(inner, compile="layers")
    monkeypatch.setenv("GEMMA4_COMPILE", "per-layer")  # the environment's choice is checked the same way
    with pytest.raises(Gemma4Error, match="unknown compile mode 'per-layer'"):
        FastCudaBackend(inner)
    monkeypatch.delenv("GEMMA4_COMPILE")
    with pytest.raises(Gemma4Error, match="needs a CUDA torch backend"):
        FastCudaBackend(inner)
