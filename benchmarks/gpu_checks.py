"""Environment check + int4 GEMV microbenchmarks at the E4B shapes (one GPU). Prints a table last.

    PYTHONPATH=src python benchmarks/gpu_checks.py [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from gemma4_coreai.fast import copy_bandwidth, gemv_microbench
from gemma4_coreai.kernels import FRAG_VARIANTS, GEMV_VARIANTS

# [N, K] of every E4B linear kind (see ModelConfig.linear_shapes): per-layer counts in the last column.
E4B_SHAPES = {
    "q_proj sliding": (2048, 2560, 35), "q_proj full": (4096, 2560, 7),
    "k/v_proj sliding": (512, 2560, 40), "k/v_proj full": (1024, 2560, 8),
    "o_proj sliding": (2560, 2048, 35), "o_proj full": (2560, 4096, 7),
    "gate/up": (10240, 2560, 84), "down": (2560, 10240, 42),
    "q/k/v stacked sliding": (3072, 2560, 20), "q/k/v stacked full": (6144, 2560, 4),
    "gate/up stacked": (20480, 2560, 42),
    "ple gate": (256, 2560, 42), "ple proj": (2560, 256, 42),
    "ple model proj": (10752, 2560, 1), "lm_head": (262144, 2560, 1),
}
# What the fast path runs per token (fast.stack_projections): q/k/v stacked on the 24 KV-owning layers (q alone on
# the 18 KV-shared ones), gate/up stacked everywhere.
FAST_PATH_COUNTS = {"q_proj sliding": 15, "q_proj full": 3, "k/v_proj sliding": 0, "k/v_proj full": 0,
                    "gate/up": 0, "q/k/v stacked sliding": 20, "q/k/v stacked full": 4, "gate/up stacked": 42}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": torch.cuda.get_device_name()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        import transformers

        info["transformers"] = transformers.__version__
        import transformers.models.gemma4  # noqa: F401

        info["gemma4_in_transformers"] = True
    except ImportError:
        info["gemma4_in_transformers"] = False
    bw = copy_bandwidth("cuda")
    info["copy_GBps"] = bw / 1e9
    print(json.dumps(info), flush=True)
    rows = gemv_microbench([(n, k) for n, k, _ in E4B_SHAPES.values()])
    out = {"env": info, "gemv": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)

    def best_of(r, variants):
        got = [(t, v, sp) for v, ps in r["variants"].items() if v in variants for sp, t in ps.items()]
        return min(got) if got else (float("nan"), None, None)

    core = [v for v in GEMV_VARIANTS if v not in FRAG_VARIANTS and not GEMV_VARIANTS[v].startswith("read-only")]
    probe = [v for v in GEMV_VARIANTS if GEMV_VARIANTS[v].startswith("read-only")]
    tot = {"default": 0.0, "core": 0.0, "mma": 0.0, "best": 0.0, "probe": 0.0, "tinygemm": 0.0, "bf16": 0.0,
           "bytes": 0}
    print(f"\n{'shape':<21} {'N':>7} {'K':>6} {'x/tok':>5} {'default':>8} {'best core (v:split)':>20} "
          f"{'read-only':>9} {'best mma (v:split)':>19} {'best GB/s':>9} {'%copy':>5} {'triton':>7} {'tinygemm':>8} "
          f"{'bf16':>6} {'max err':>8}")
    for (name, (_, _, count)), r in zip(E4B_SHAPES.items(), rows, strict=True):
        per_tok = FAST_PATH_COUNTS.get(name, count)
        c, m, ro = best_of(r, core), best_of(r, FRAG_VARIANTS), best_of(r, probe)
        best = min(c[0], m[0]) if m[1] is not None else c[0]
        errs = [e for e in r["rel_err"].values() if e is not None]
        gbps = r["bytes"] / best / 1e3
        for key, val in (("default", r["default_us"] or c[0]), ("core", c[0]), ("mma", m[0] if m[1] is not None
                         else c[0]), ("best", best), ("probe", ro[0]), ("tinygemm", r["tinygemm_us"] or float("nan")),
                         ("bf16", r["bf16_cublas_us"])):
            tot[key] += val * per_tok
        tot["bytes"] += r["bytes"] * per_tok
        print(f"{name:<21} {r['N']:>7} {r['K']:>6} {per_tok:>5} {r['default_us'] or float('nan'):>8.1f} "
              f"{c[0]:>10.1f} ({c[1]}:{c[2]}){'':>3} {ro[0]:>9.1f} {m[0]:>9.1f} ({m[1]}:{m[2]}){'':>2} "
              f"{gbps:>9.0f} {100 * gbps * 1e9 / bw:>4.0f}% {r['triton_us']:>7.1f} "
              f"{r['tinygemm_us'] or float('nan'):>8.1f} {r['bf16_cublas_us']:>6.1f} {max(errs):>8.1e}")
    print(f"per token as the fast path runs them (q/k/v and gate/up stacked), kernel time only, ms: default "
          f"{tot['default'] / 1e3:.3f}, best CUDA-core {tot['core'] / 1e3:.3f}, best tensor-core {tot['mma'] / 1e3:.3f}"
          f", best of both {tot['best'] / 1e3:.3f}, read-only probe {tot['probe'] / 1e3:.3f}, tinygemm "
          f"{tot['tinygemm'] / 1e3:.3f}, bf16 cuBLAS {tot['bf16'] / 1e3:.3f}; {tot['bytes'] / 1e9:.3f} GB -> floor "
          f"{tot['bytes'] / bw * 1e3:.3f} ms at {bw / 1e9:.0f} GB/s copy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
