"""Where does the fast path's time go? Decode: one CUDA-graph replay under torch.profiler (kernels per step, kernel
time vs wall time, top kernels), then the GEMV kernel picked per shape. Prefill: timed per chunk size, and one
batched prefill profiled the same way.

    PYTHONPATH=src python benchmarks/diag_fast.py [BUNDLE | tiny | e4b] [--prompt N] [--context N ..] [--chunks N ..]

Several `--context` values profile decode at each in one process (one compile), e.g. `--context 128 4096
--chunks` (no chunk sizes: no prefill timing) to see what a long cache adds to a step.

A shape name synthesises and converts a bundle in a temporary directory first (E4B: ~3 min, 21 GB of disk).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from gemma4_coreai import fast
from gemma4_coreai.bundle import Bundle, convert
from gemma4_coreai.fast import FastCudaBackend
from gemma4_coreai.synth import synthesize


def kernel_table(fn, top: int = 12) -> tuple[float, float, int, list[tuple[str, int, float]]]:
    """Run fn() under the profiler: (wall ms, summed kernel ms, kernel count, [(name, count, ms)] by total time)."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1e3
    kern = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    agg: dict[str, list[float]] = {}
    for e in kern:
        a = agg.setdefault(e.name[:70], [0, 0.0])
        a[0] += 1
        a[1] += e.device_time_total / 1e3
    rows = sorted(((n, int(c), t) for n, (c, t) in agg.items()), key=lambda r: -r[2])[:top]
    return wall, sum(e.device_time_total for e in kern) / 1e3, len(kern), rows


def prefill_ms(fb: FastCudaBackend, ids: list[int]) -> float:
    """Best of 3 prefills of `ids` in ms, after one untimed prefill (which compiles on the first call)."""
    fb.reset()
    fb.prefill(ids)
    times = []
    for _ in range(3):
        fb.reset()
        torch.cuda.synchronize()
        t = time.perf_counter()
        fb.prefill(ids)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return min(times) * 1e3


def show(title: str, res: tuple[float, float, int, list[tuple[str, int, float]]]) -> None:
    wall, busy, n, rows = res
    print(f"\n{title}: wall {wall:.3f} ms, kernel time {busy:.3f} ms, {n} kernels")
    for name, c, t in rows:
        print(f"   {t:8.3f} ms {c:5d}x  {name}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle", nargs="?", default="tiny")
    ap.add_argument("--prompt", type=int, default=4096, help="prefill length to profile")
    ap.add_argument("--context", type=int, nargs="+", default=[128], help="decode positions to profile")
    ap.add_argument("--chunks", type=int, nargs="*", default=[fast.PREFILL_CHUNK],
                    help="prefill chunk sizes to time (fast.PREFILL_CHUNK is the default; none: skip prefill)")
    args = ap.parse_args()
    path = Path(args.bundle)
    if not path.exists():
        d = Path(tempfile.mkdtemp())
        t0 = time.perf_counter()
        synthesize(args.bundle, d / "ckpt", progress=False)
        path = convert(d / "ckpt", d / "bundle", progress=False)
        print(f"synth + convert {args.bundle}: {time.perf_counter() - t0:.0f} s")
    b = Bundle.open(path)
    cfg = b.config
    longest = max(args.prompt, *args.context)
    max_ctx = min(b.max_context, longest + 512)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        fb = FastCudaBackend.from_bundle(b, max_context=max_ctx)
        load = time.perf_counter() - t0
        ids = torch.randint(3, cfg.vocab_size, (longest,), generator=torch.Generator().manual_seed(0)).tolist()
        t0 = time.perf_counter()
        fb.reset()
        first = int(fb.prefill(ids[:args.context[0]]).argmax())
        fb.greedy(first, 4)
        build = time.perf_counter() - t0
    for x in w:
        print("WARNING:", str(x.message)[:400])
    print(f"{fb.describe()}; load {load:.1f} s, first decode build (compile + autotune + capture) {build:.1f} s")

    for ctx in args.context:
        fb.reset()
        first = int(fb.prefill(ids[:ctx]).argmax())
        fb.greedy(first, 4)  # captures this bucket's graph outside the timing
        fb.reset()
        first = int(fb.prefill(ids[:ctx]).argmax())
        torch.cuda.synchronize()
        t = time.perf_counter()
        fb.greedy(first, 200)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t) / 200 * 1e3
        print(f"decode at ~{ctx}: {ms:.3f} ms/token ({1e3 / ms:.1f} tok/s, greedy loop, 200 steps)")
        g = fb._graphs[fb._bucket(fb.position)]
        show(f"one decode step at {fb.position} (graph replay, {cfg.num_layers} layers)",
             kernel_table(g.replay, top=16))

    for r in fb.gemv_report():
        print(f"gemv N={r['N']:>6} K={r['K']:>5}: {r['kernel']:<10} split {r['split']:>2} layout {r['layout']:<6} "
              f"{r['us'] or float('nan'):6.1f} us ({r['candidates']} timed)")
    long_ids = ids[:args.prompt]
    for chunk in args.chunks:
        fast.PREFILL_CHUNK = chunk
        torch.cuda.reset_peak_memory_stats()
        best = prefill_ms(fb, long_ids) / 1e3
        print(f"\nprefill {args.prompt} tokens in chunks of {chunk}: {best * 1e3:.1f} ms ({args.prompt / best:,.0f} "
              f"tok/s), peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
        if chunk == args.chunks[0]:
            fb.reset()
            show(f"prefill {args.prompt}", kernel_table(lambda: fb.prefill(long_ids)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
