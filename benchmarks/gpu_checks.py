"""Environment check + int4 GEMV microbenchmarks at the E4B shapes (one GPU). Prints a table last.

    PYTHONPATH=src python benchmarks/gpu_checks.py [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from gemma4_coreai.fast import copy_bandwidth, gemv_microbench

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
    total = {"gemv_fast_path": 0.0, "gemv": 0.0, "triton": 0.0, "tinygemm": 0.0, "bf16": 0.0, "bytes": 0}
    for (name, (_, _, count)), r in zip(E4B_SHAPES.items(), rows, strict=True):
        r["name"], r["count"] = name, count
        total["gemv_fast_path"] += r["gemv_us"] * FAST_PATH_COUNTS.get(name, count)
        if "stacked" not in name:  # the per-token totals below: every linear separate
            total["gemv"] += r["gemv_us"] * count
            total["triton"] += r["triton_us"] * count
            total["tinygemm"] += (r["tinygemm_us"] or float("nan")) * count
            total["bf16"] += r["bf16_cublas_us"] * count
            total["bytes"] += r["bytes"] * count
    out = {"env": info, "gemv": rows, "per_token_linears": total}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    print(f"\n{'shape':<21} {'N':>7} {'K':>6} {'x/tok':>5} {rows[0]['impl'] + ' us':>9} {'GB/s':>6} {'%copy':>5} "
          f"{'triton us':>9} {'tinygemm us':>11} {'bf16 us':>8} {'rel err':>8}  split: us")
    for r in rows:
        tg = f"{r['tinygemm_us']:.1f}" if r["tinygemm_us"] is not None else "-"
        print(f"{r['name']:<21} {r['N']:>7} {r['K']:>6} {r['count']:>5} {r['gemv_us']:>9.1f} "
              f"{r['gemv_GBps']:>6.0f} {100 * r['gemv_GBps'] * 1e9 / bw:>4.0f}% {r['triton_us']:>9.1f} {tg:>11} "
              f"{r['bf16_cublas_us']:>8.1f} {r['rel_err']:>8.1e}  "
              + " ".join(f"{sp}:{t:.1f}" for sp, t in r["per_split_us"].items()))
    print(f"per-token linears (sum over E4B, kernel time only): {rows[0]['impl']} {total['gemv'] / 1e3:.3f} ms, "
          f"triton {total['triton'] / 1e3:.3f} ms, tinygemm "
          f"{total['tinygemm'] / 1e3:.3f} ms, bf16 cuBLAS {total['bf16'] / 1e3:.3f} ms; "
          f"bytes {total['bytes'] / 1e9:.3f}"
          f" GB -> floor {total['bytes'] / bw * 1e3:.3f} ms at {bw / 1e9:.0f} GB/s copy")
    print(f"per-token linears as the fast path runs them (stacked): {rows[0]['impl']} "
          f"{total['gemv_fast_path'] / 1e3:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
