"""Convert's q4_0 path on one E4B-sized chunk (8192 x 2560, bf16) of a checkpoint made from bf16, fp16 or fp32
block scales: wall time of `quant.linear_entries` with the lattice report, its exact fraction and the scale dtype
it stores. A QAT-clean checkpoint (bf16 scales) takes the `m / -8` path only; the others go through
`quant.refine_scales` for the blocks it misses.

    PYTHONPATH=src python benchmarks/quant_scales.py [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from gemma4_coreai import quant


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    n, k = 8192, 2560
    q = torch.randint(-8, 8, (n, k // 32, 32), generator=g)
    q[..., 3] = -8  # the largest magnitude on -8 d, as q4_0 puts it
    print("| scales made in | seconds | exact fraction | stored scale dtype |\n| --- | ---: | ---: | --- |")
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        d = (torch.rand(n, k // 32, 1, generator=g) * 0.02 + 1e-3).to(dtype).float()
        w = (q.float() * d).reshape(n, k).bfloat16()
        t = time.perf_counter()
        report = quant.LatticeReport()
        entries = quant.linear_entries("x.weight", w, report)
        print(f"| {name} | {time.perf_counter() - t:.2f} | {report.summary()['exact_fraction']:.4f} | "
              f"{str(entries['x.scale'].dtype)[6:]} |")


if __name__ == "__main__":
    main()
