"""Diagnose the fast decode step on a small synthetic bundle: did torch.compile take, kernels per step, step time.

    PYTHONPATH=src python benchmarks/diag_fast.py [SHAPE]      (default tiny)
"""

from __future__ import annotations

import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from gemma4_coreai.bundle import Bundle, convert
from gemma4_coreai.fast import FastCudaBackend
from gemma4_coreai.synth import synthesize


def main() -> int:
    shape = sys.argv[1] if len(sys.argv) > 1 else "tiny"
    d = Path(tempfile.mkdtemp())
    synthesize(shape, d / "ckpt", progress=False)
    b = Bundle.open(convert(d / "ckpt", d / "bundle", progress=False))
    for comp in (True, False):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            fb = FastCudaBackend.from_bundle(b, max_context=512, compile=comp)
            fb.reset()
            first = int(fb.prefill(list(range(3, 67))).argmax())
            fb.greedy(first, 4)
            build = time.perf_counter() - t0
        for x in w:
            print("WARNING:", str(x.message)[:400])
        fb.reset()
        first = int(fb.prefill(list(range(3, 67))).argmax())
        torch.cuda.synchronize()
        t = time.perf_counter()
        fb.greedy(first, 200)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t) / 200 * 1e3
        g = next(iter(fb._graphs.values()))
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            g.replay()
            torch.cuda.synchronize()
        kern = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        names = {}
        for e in kern:
            names[e.name[:60]] = names.get(e.name[:60], 0) + 1
        top = sorted(names.items(), key=lambda kv: -kv[1])[:8]
        print(f"compile={comp} use_compile_after={fb.use_compile} build {build:.1f}s step {ms:.3f} ms "
              f"kernels/step {len(kern)} layers {b.config.num_layers}")
        for n, c in top:
            print(f"   {c:5d} {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
