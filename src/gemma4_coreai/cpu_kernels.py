"""Native CPU q4_0 matmul (AVX2 + FMA + F16C) for the torch backend's opt-in `cpu-int4` linear strategy.

torch's own CPU int4 kernel moves ~1.6 GB/s of weights on an AVX2 machine (benchmarks/NOTES.md), far from memory
speed, so the CPU path gets a small C++ extension (`q4_gemv.cpp`, next to this file), built on first use with
`torch.utils.cpp_extension.load` (-O3 -mavx2 -mfma -mf16c -fopenmp) and cached in torch's extensions directory.
It reads the bundle's packed q4_0 layout directly (no repack, no extra copy of the weights).

Two activation modes:
- "q8" (default of the strategy; approximate, like llama.cpp's q4_0 x q8_0): each 32-block of the activations is
  quantized to int8 with scale max|x|/127 once per call; integer dot products (maddubs/madd) and fp32
  accumulation. The output differs from the fp32 reference by the activation rounding (~0.5% relative per dot).
- "f32" (exact activations): nibbles converted to fp32 in registers and FMA'd with the fp32 activations: the stock
  function up to fp32 summation order.

The stock path (`model.dequant_linear`) stays the default everywhere; `install(model, mode)` swaps the linear
function of every `Q4Linear` that keeps packed weights. The kernel is also a dispatcher op,
`torch.ops.gemma4_cpu.q4_mm` (with a fake implementation), which the linear function calls while being traced, so
that a compiled decode step (`backends.TorchBackend(compile=True)`) keeps it opaque. If the extension cannot be
built (no compiler, no AVX2), `load()` returns None with one warning and callers keep the stock path.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import Tensor

MODES = {"q8": 0, "f32": 1}
SOURCE = Path(__file__).with_name("q4_gemv.cpp")
_EXT = None
_TRIED = False
_ERROR: str | None = None


def cpu_supported() -> bool:
    """x86-64 with AVX2, FMA and F16C (read from /proc/cpuinfo; False where it cannot be read)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    have = set(flags.split(":", 1)[1].split())
    return {"avx2", "fma", "f16c"} <= have


def load(verbose: bool = False):
    """The compiled extension, building it on first use; None (with one warning) where that is not possible."""
    global _EXT, _TRIED, _ERROR
    if _TRIED:
        return _EXT
    _TRIED = True
    if not cpu_supported():
        _ERROR = "this CPU lacks AVX2/FMA/F16C (or /proc/cpuinfo is unreadable)"
    else:
        try:
            from torch.utils.cpp_extension import load as _load

            flags = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-std=c++17"]
            os.environ.setdefault("MAX_JOBS", "2")
            _EXT = _load(name="gemma4_q4_cpu", sources=[str(SOURCE)], extra_cflags=flags,
                         extra_ldflags=["-fopenmp"], verbose=verbose)
            torch.library.register_fake("gemma4_cpu::q4_mm")(_q4_mm_fake)
        except Exception as e:  # noqa: BLE001 - any build failure means: keep the stock path
            _ERROR = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
    if _EXT is None:
        warnings.warn(f"gemma4-coreai: the native CPU int4 kernel is unavailable ({_ERROR}); "
                      f"using the stock dequantize + matmul path", RuntimeWarning, stacklevel=2)
    return _EXT


def _q4_mm_fake(x: Tensor, q4: Tensor, scale: Tensor, mode: int) -> Tensor:
    """Shape of `torch.ops.gemma4_cpu.q4_mm` for torch.compile: [M, K] -> [M, N] fp32."""
    return x.new_empty(x.shape[0], q4.shape[0])


def available() -> bool:
    return load() is not None


def last_error() -> str | None:
    return _ERROR


def q4_mm(x: Tensor, q4: Tensor, scale: Tensor, mode: str = "q8") -> Tensor:
    """x [..., K] -> [..., N] = x @ W.T with W the q4_0 weight (uint8 [N, K/2] + fp16/fp32 scale [N, K/32]).

    Computed in fp32 by the native kernel and cast back to x's dtype. Raises RuntimeError if unavailable."""
    ext = load()
    if ext is None:
        raise RuntimeError(f"native CPU int4 kernel unavailable: {_ERROR}")
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).to(torch.float32).contiguous()
    y = ext.q4_mm(x2, q4.contiguous(), scale.contiguous(), MODES[mode])
    return y.view(*shape[:-1], -1).to(x.dtype)


def make_linear_fn(mode: str = "q8"):
    """A `Q4Linear.linear_fn` running the native kernel on the module's packed weights."""
    if mode not in MODES:
        raise ValueError(f"unknown cpu-int4 mode {mode!r}: expected one of {', '.join(MODES)}")
    if load() is None:
        raise RuntimeError(f"native CPU int4 kernel unavailable: {_ERROR}")
    code = MODES[mode]

    ext = _EXT
    fp32 = torch.float32

    def cpu_int4_linear(m, x: Tensor) -> Tensor:
        shape = x.shape
        if torch.compiler.is_compiling():  # traced: the dispatcher op, opaque to inductor
            y = torch.ops.gemma4_cpu.q4_mm(x.reshape(-1, shape[-1]).to(fp32).contiguous(), m.q4, m.scale, code)
            return y.view(*shape[:-1], -1).to(x.dtype)
        if x.dtype is fp32 and x.is_contiguous():  # the common case, kept short: ~300 calls per E4B token
            return ext.q4_mm(x.view(-1, shape[-1]), m.q4, m.scale, code).view(*shape[:-1], -1)
        y = ext.q4_mm(x.reshape(-1, shape[-1]).to(fp32).contiguous(), m.q4, m.scale, code)
        return y.view(*shape[:-1], -1).to(x.dtype)

    cpu_int4_linear.mode = mode
    return cpu_int4_linear


def install(model: torch.nn.Module, mode: str = "q8") -> int:
    """Route every packed-storage `Q4Linear` of `model` through the native kernel; returns how many.

    Needs `load()` to have succeeded. Modules with other storage keep their linear function."""
    from .model import Q4Linear

    if load() is None:
        raise RuntimeError(f"native CPU int4 kernel unavailable: {_ERROR}")
    fn = make_linear_fn(mode)
    n = 0
    for mod in model.modules():
        if isinstance(mod, Q4Linear) and mod.q4 is not None and mod.q4.device.type == "cpu":
            if not mod.q4.is_contiguous():
                mod.q4 = mod.q4.contiguous()
            if mod.scale.dtype not in (torch.float16, torch.float32) or not mod.scale.is_contiguous():
                mod.scale = mod.scale.to(torch.float32).contiguous()
            mod.linear_fn = fn
            n += 1
    return n
