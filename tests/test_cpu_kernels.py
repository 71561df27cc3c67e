"""The native CPU int4 kernel (cpu_kernels.py + q4_gemv.cpp) against the stock dequantize reference.

- mode "f32" (fp32 activations): equals x @ dequant(W).T up to fp32 summation order.
- mode "q8" (q8_0 activations, like llama.cpp): equals an exact float64 emulation of the q8 arithmetic, and
  stays within the activation rounding of the fp32 reference.
- the `cpu-int4` linear strategies keep the tiny models' greedy tokens on the fp32 reference (margin rule).

Skipped when the extension cannot be built here (no compiler, or a CPU without AVX2/FMA/F16C). The first build
takes ~45 s on 2 cores; later runs load it from torch's extension cache.
"""

from __future__ import annotations

import functools

import pytest
import torch

from gemma4_coreai import cpu_kernels
from gemma4_coreai.kernels import q4_dequant_ref

pytestmark = pytest.mark.skipif(cpu_kernels.load() is None,
                                reason=f"native CPU int4 kernel unavailable: {cpu_kernels.last_error()}")

SHAPES = [  # (M, N, K): E4B widths, odd N (tile remainders), K with fewer than / not a multiple of 8 blocks
    (1, 37, 2560), (1, 19, 10240), (3, 33, 10240), (1, 1, 32), (2, 5, 64), (1, 7, 416), (5, 9, 416),
    (6, 11, 2560), (9, 3, 256), (128, 6, 512),
]


def rand_q4(n: int, k: int, seed: int, scale_dtype=torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q4 = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
    scale = ((torch.rand(n, k // 32, generator=g) - 0.5) * 0.05).to(scale_dtype)
    return q4, scale


def q8_emulation(x: torch.Tensor, q4: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float64 model of the q8 mode: xq = round(x / d), d = max|x| / 127 per 32-block (fp32 arithmetic)."""
    m, k = x.shape
    xb = x.view(m, k // 32, 32)
    d = xb.abs().amax(-1) / 127
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    xq = torch.round(xb * inv.unsqueeze(-1))
    xdq = (xq.double() * d.double().unsqueeze(-1)).view(m, k)
    return xdq @ q4_dequant_ref(q4, scale, torch.float32).double().t()


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32])
def test_f32_mode_matches_reference(m, n, k, scale_dtype):
    q4, scale = rand_q4(n, k, seed=m * 1000 + n, scale_dtype=scale_dtype)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k))
    want = x.double() @ q4_dequant_ref(q4, scale, torch.float32).double().t()
    got = cpu_kernels.q4_mm(x, q4, scale, "f32")
    assert got.shape == (m, n) and got.dtype == torch.float32
    tol = 1e-5 * float((x.abs().double() @ q4_dequant_ref(q4, scale).abs().double().t()).max()) + 1e-6
    assert float((got.double() - want).abs().max()) <= tol


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32])
def test_q8_mode_matches_emulation_and_reference(m, n, k, scale_dtype):
    q4, scale = rand_q4(n, k, seed=m * 1000 + n + 7, scale_dtype=scale_dtype)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k + 1))
    x[0, :32] = 0  # an all-zero block (scale 0)
    got = cpu_kernels.q4_mm(x, q4, scale, "q8").double()
    mag = float((x.abs().double() @ q4_dequant_ref(q4, scale).abs().double().t()).max())
    assert float((got - q8_emulation(x, q4, scale)).abs().max()) <= 1e-5 * mag + 1e-6
    ref = x.double() @ q4_dequant_ref(q4, scale).double().t()
    assert float((got - ref).abs().max()) <= 2e-2 * mag  # activation rounding only (1/254 per element, at most)


def test_batched_shapes_and_dtype():
    q4, scale = rand_q4(24, 256, seed=5)
    x = torch.randn(2, 3, 256)
    for mode in cpu_kernels.MODES:
        y = cpu_kernels.q4_mm(x, q4, scale, mode)
        assert y.shape == (2, 3, 24)
        assert torch.allclose(y.view(6, 24), cpu_kernels.q4_mm(x.view(6, 256), q4, scale, mode))
    yb = cpu_kernels.q4_mm(x.bfloat16(), q4, scale, "f32")
    assert yb.dtype == torch.bfloat16


def test_rejects_bad_shapes():
    q4, scale = rand_q4(4, 64, seed=1)
    with pytest.raises(RuntimeError):
        cpu_kernels.q4_mm(torch.randn(1, 96), q4, scale)


# ---- end to end: the linear strategy on the tiny reference models ------------------------------------------

@pytest.mark.parametrize("strategy,name", [("cpu-int4", "tiny"), ("cpu-int4", "heterogeneous"),
                                           ("cpu-int4-f32", "tiny")])
def test_greedy_agrees_with_fp32_reference(strategy, name):
    """Greedy tokens with the native kernel agree with the fp32 stock path (ties under the margin excepted);
    the fp32-activation variant is also logit-close."""
    pytest.importorskip("transformers.models.gemma4")
    import test_model as tm

    ref = tm.reference(name)
    ids = tm.prompt(ref)
    want, want_logits = tm.greedy(tm.backend(ref), ids)
    be = tm.backend(ref, linear_strategy=strategy)
    assert be.linear_strategy == strategy and "via " + strategy in be.describe()
    got, got_logits = tm.greedy(be, ids)
    if strategy == "cpu-int4-f32":
        assert got == want
        assert float((got_logits - want_logits).abs().max()) < 1e-3
    else:
        tm.assert_greedy_agrees(got, want, want_logits, tm.TIE_GAP)


def test_strategy_is_opt_in_and_cpu_only():
    import test_model as tm

    from gemma4_coreai.errors import Gemma4Error

    ref = tm.reference("tiny")
    be = tm.backend(ref)
    assert be.linear_strategy == "stock" and "via" not in be.describe()
    with pytest.raises(Gemma4Error):
        tm.backend(ref, linear_strategy="cpu-int4", linear_storage="dense")
    with pytest.raises(Gemma4Error):
        tm.backend(ref, linear_strategy="nope")


# ---- the compiled decode step (TorchBackend(compile=True): torch.compile, the kernel an opaque op) ------------
# On the 4-layer `mini` model (both layer types, KV sharing, window 4): one compile, ~35 s on 2 cores (fresh cache).

@functools.cache
def mini_reference():
    from hf_reference import build_reference, mini

    return build_reference(mini())


def _decode_synced(eager, compiled, ids: list[int], toks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill both backends, then decode `toks` one by one (teacher-forced); before each step the eager
    backend's KV cache is set to the compiled one's, so each step is compared from the same state."""
    for be in (eager, compiled):
        be.reset()
        be.prefill(ids)
    got, want = [], []
    for t in toks:
        eager.model.k_cache.copy_(compiled.model.k_cache)
        eager.model.v_cache.copy_(compiled.model.v_cache)
        want.append(eager.decode(t))
        got.append(compiled.decode(t))
    return torch.stack(got), torch.stack(want)


@pytest.mark.parametrize("mode", [True, "regional"])
def test_compiled_decode_matches_eager(mode):
    """The cpu-int4 engine's compiled step (q8 activations; cpu-int4-f32 differs only in the op's mode argument),
    whole or per layer (regional), against its eager step: 12 one-token steps from position 3, across the sliding
    window (4), each from the same
    KV-cache state. Within fp32 fusion rounding, except where inductor's 1-ulp differences move an activation
    across an int8 rounding boundary (one quantization level, visible in the logits): such steps must be rare and
    stay within the q8 rounding scale. Then the greedy tokens (prompt past the window, 32 tokens) agree with the
    fp32 stock path (margin rule)."""
    import test_model as tm

    ref = mini_reference()
    ids, toks = tm.prompt(ref, seed=3)[:3], tm.prompt(ref, seed=4)[:12]
    eager = tm.backend(ref, linear_strategy="cpu-int4")
    compiled = tm.backend(ref, linear_strategy="cpu-int4", compile=mode)
    assert "compiled decode" in compiled.describe() and "compiled" not in eager.describe()
    assert ("per layer" in compiled.describe()) == (mode == "regional")
    got, want = _decode_synced(eager, compiled, ids, toks)
    assert compiled._step is not None  # no fallback to eager happened
    diff = (got - want).abs().amax(-1)
    assert int((diff <= 1e-4).sum()) >= len(toks) // 2, diff
    assert float(diff.max()) <= 0.05 * float(want.abs().max()), diff
    prompt = tm.prompt(ref, seed=2)  # fp32 top-2 gaps all > 0.8 on this prompt: no near-ties to excuse
    want_toks, want_logits = tm.greedy(tm.backend(ref), prompt)
    tm.assert_greedy_agrees(tm.greedy(compiled, prompt)[0], want_toks, want_logits, tm.TIE_GAP)


def test_compile_falls_back_to_eager_once():
    import test_model as tm

    ref = mini_reference()
    be = tm.backend(ref, linear_strategy="cpu-int4-f32", compile=True)
    want = tm.backend(ref, linear_strategy="cpu-int4-f32")

    def broken(*args):
        raise RuntimeError("no compiler here")

    be._step = broken
    for b in (be, want):
        b.prefill(tm.prompt(ref)[:5])
    with pytest.warns(RuntimeWarning, match="decoding eagerly"):
        got = be.decode(3)
    assert be._step is None and "compiled" not in be.describe()
    assert torch.equal(got, want.decode(3))


def test_compile_needs_the_native_kernel():
    import test_model as tm

    from gemma4_coreai.errors import Gemma4Error

    with pytest.raises(Gemma4Error, match="compile"):
        tm.backend(mini_reference(), compile=True)


def test_unknown_compile_mode_is_refused(monkeypatch):
    """A compile mode it does not know, given directly or through GEMMA4_COMPILE, is one clear line, before any
    compiling; GEMMA4_COMPILE does not turn compiling on where it was off."""
    import test_model as tm

    from gemma4_coreai.errors import Gemma4Error

    with pytest.raises(Gemma4Error, match="unknown compile mode 'fast': expected True, False or 'regional'"):
        tm.backend(mini_reference(), linear_strategy="cpu-int4", compile="fast")
    monkeypatch.setenv("GEMMA4_COMPILE", "layers")
    with pytest.raises(Gemma4Error, match="unknown compile mode 'layers'"):
        tm.backend(mini_reference(), linear_strategy="cpu-int4", compile=True)
    monkeypatch.setenv("GEMMA4_COMPILE", "regional")
    assert tm.backend(mini_reference(), linear_strategy="cpu-int4")._step is None
