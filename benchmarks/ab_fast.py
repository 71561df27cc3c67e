"""Same-process A/B of the fast path's switches on one bundle: decode ms/token, prefill time, kernels per decode
step and peak memory for each configuration, a short table last.

    PYTHONPATH=src python benchmarks/ab_fast.py BUNDLE [--configs NAME:key=0|1,... ...] [--json OUT]

Keys: pdl (programmatic dependent launch, GEMVs + inductor), reduce (in-kernel split-K sums), cprefill (compiled
prefill), dattn (1: the Triton decode attention, 0: model.py's), regional (1: a compiled graph per layer kind, 0:
the whole step as one graph), mk (inductor's multi_kernel: reductions up to 16x longer may be persistent, the faster
variant picked at run time), cdt (inductor's coordinate-descent tuning of its kernels' launch configs), combo
(inductor's combo kernels: independent small kernels, e.g. the q and k norms, launched as one), aggr (inductor's
aggressive fusion: fuses nodes that share no memory access too). `--context`: one or more prompt lengths to decode
after (the first one's graph is profiled). `--quick`: decode only (no prefill timings, no PDL-off re-capture). A
config with pdl=1 is also measured with the GEMVs' PDL switched off after the fact ("gemv-pdl-off": the same
compiled code and picks, graphs re-captured, greedy tokens checked equal), which separates the GEMVs' share of PDL
from inductor's. Each config prints its per-kernel profile of one decode step and its GEMV picks, and the JSON is
rewritten after each, so a time limit keeps what was done.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from diag_fast import kernel_table, prefill_ms  # noqa: E402

from gemma4_coreai import kernels  # noqa: E402
from gemma4_coreai.bundle import Bundle  # noqa: E402
from gemma4_coreai.fast import FastCudaBackend  # noqa: E402

KEYS = {"pdl": "pdl", "reduce": "reduce", "cprefill": "compile_prefill", "dattn": "decode_attention",
        "regional": "compile"}
INDUCTOR = {"mk": "triton.multi_kernel", "cdt": "coordinate_descent_tuning",  # global inductor config, per config
            "combo": "combo_kernels", "aggr": "aggressive_fusion"}


def parse(spec: str) -> tuple[str, dict[str, bool], dict[str, int]]:
    name, _, kv = spec.partition(":")
    opts, inductor = {}, {}
    for item in filter(None, kv.split(",")):
        k, _, v = item.partition("=")
        if k in INDUCTOR:
            inductor[INDUCTOR[k]] = int(v)
        elif k == "dattn":
            opts[KEYS[k]] = "triton" if v == "1" else "stock"
        elif k == "regional":
            opts[KEYS[k]] = "regional" if v == "1" else True
        else:
            opts[KEYS[k]] = v == "1"
    return name, opts, inductor


def set_inductor(values: dict[str, int]) -> dict[str, object]:
    """Set inductor config entries ("a.b" paths); returns the old values."""
    import torch._inductor.config as cfg

    old = {}
    for path, v in values.items():
        *parents, leaf = path.split(".")
        obj = cfg
        for part in parents:
            obj = getattr(obj, part)
        old[path] = getattr(obj, leaf)
        setattr(obj, leaf, type(old[path])(v))
    return old


def decode_ms(fb: FastCudaBackend, ids: list[int], steps: int = 200) -> float:
    times = []
    for _ in range(3):
        fb.reset()
        first = int(fb.prefill(ids).argmax())
        torch.cuda.synchronize()
        t = time.perf_counter()
        fb.greedy(first, steps)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) / steps * 1e3)
    return sorted(times)[1]


def tokens(fb: FastCudaBackend, ids: list[int], n: int = 32) -> list[int]:
    fb.reset()
    return fb.greedy(int(fb.prefill(ids).argmax()), n)


def decode_at(fb: FastCudaBackend, ids: list[int], contexts: list[int]) -> dict:
    """decode_ms after each context (the first also as "decode_ms"), and the first one's per-kernel profile."""
    row = {}
    for c in reversed(contexts):  # the first context last: its graph is the one profiled
        row[f"decode_ms@{c}"] = decode_ms(fb, ids[:c])
    row["decode_ms"] = row[f"decode_ms@{contexts[0]}"]
    g = fb._graphs[fb._bucket(fb.position - 1)]  # the graph of the last step taken
    _, busy, n, top = kernel_table(g.replay, top=24)
    row.update(kernels_per_step=n, kernel_ms=round(busy, 3), top_kernels=top)
    for name, k, t in top:  # the per-kernel profile of one step, by total time
        print(f"   {t:8.3f} ms {k:5d}x  {name}")
    return row


def measure(fb: FastCudaBackend, ids: list[int], contexts: list[int], long: int, quick: bool = False) -> dict:
    t0 = time.perf_counter()
    fb.reset()
    fb.greedy(int(fb.prefill(ids[:contexts[0]]).argmax()), 4)
    row = {"first_run_s": round(time.perf_counter() - t0, 1)}
    row.update(decode_at(fb, ids, contexts))
    for plen in () if quick else (128, long):
        torch.cuda.reset_peak_memory_stats()
        row[f"prefill{plen}_ms"] = prefill_ms(fb, ids[:plen])
        row[f"peak{plen}_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if not quick and fb.prefill_graphs:  # the same compiled prefill without its graphs: what they save
        fb.prefill_graphs = False
        row["prefill128_nographs_ms"] = prefill_ms(fb, ids[:128])
        fb.prefill_graphs = True
    return row


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--configs", nargs="+", default=["new:pdl=1,reduce=1,cprefill=1",
                                                     "base:pdl=0,reduce=0,cprefill=0",
                                                     "dattn:pdl=1,reduce=1,cprefill=1,dattn=1"])
    ap.add_argument("--context", type=int, nargs="+", default=[128])
    ap.add_argument("--long", type=int, default=4096)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--quick", action="store_true", help="decode only: no prefill timings, no PDL-off re-capture")
    args = ap.parse_args()
    b = Bundle.open(args.bundle)
    first_tokens: list[int] | None = None
    ids = torch.randint(3, b.config.vocab_size, (max(args.long, *args.context),),
                        generator=torch.Generator().manual_seed(0)).tolist()
    rows = {}
    for spec in args.configs:
        name, opts, inductor = parse(spec)
        old_inductor = set_inductor(inductor)
        fb = FastCudaBackend.from_bundle(b, max_context=min(b.max_context, max(args.long, *args.context) + 512),
                                         **opts)
        print(f"{name}: {fb.describe()} (tune {fb.tune_s:.1f} s)", flush=True)
        for r in fb.gemv_report():
            us = r["us"] or float("nan")
            print(f"   gemv N={r['N']:>6} K={r['K']:>5}: {r['kernel']:<10} split {r['split']:>2} {us:6.1f} us")
        rows[name] = measure(fb, ids, args.context, args.long, args.quick)
        rows[name]["gemv"] = fb.gemv_report()
        want = tokens(fb, ids[:args.context[0]])
        rows[name]["tokens"] = want  # greedy tokens after the context, to compare across processes
        rows[name]["tokens_match_first"] = sum(a == b for a, b in zip(want, first_tokens or want, strict=True))
        first_tokens = first_tokens or want
        shown = {k: v for k, v in rows[name].items() if k not in ("top_kernels", "gemv", "tokens")}
        print(f"{name}: {shown}", flush=True)
        # the same compiled code with the GEMVs' PDL off: graphs re-captured, the math unchanged
        if fb.pdl and not args.quick:
            kernels.set_pdl(False)
            fb._graphs.clear()
            fb._pool = None  # a fresh pool: torch refuses to capture into one whose graphs were all freed
            row = {"decode_ms": decode_ms(fb, ids[:args.context[0]]),
                   "same_tokens": tokens(fb, ids[:args.context[0]]) == want}
            rows[f"{name}/gemv-pdl-off"] = row
            print(f"{name}/gemv-pdl-off: {row}", flush=True)
        if args.json:  # after every configuration: a time limit keeps what was measured
            args.json.write_text(json.dumps(rows, indent=1))
        del fb
        set_inductor(old_inductor)
        # dynamo's cache is keyed on the step's code and guards on object ids, not on inductor's config: without
        # a reset, a later config whose guards pass (a new backend at a freed one's address) reuses this graph
        torch._dynamo.reset()
        gc.collect()
        torch.cuda.empty_cache()
    cols = [f"decode_ms@{c}" for c in args.context] + [
        "kernels_per_step", "kernel_ms", "prefill128_ms", "prefill128_nographs_ms", f"prefill{args.long}_ms",
        f"peak{args.long}_gib", "first_run_s"]
    print("\n| config | " + " | ".join(cols) + " |")
    print("|" + " --- |" * (len(cols) + 1))
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c, "-"))
                                         for c in cols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
