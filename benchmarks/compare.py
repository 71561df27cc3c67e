"""Ratios of our bench record against llama-bench's JSON and the HF peer's JSON (same run, same card).

    python benchmarks/compare.py --ours ours.json --llama llama.json --hf hf.json [--md OUT.md]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load(p: str | None):
    if not p or not Path(p).is_file():
        return None
    try:
        return json.loads(Path(p).read_text())
    except json.JSONDecodeError:
        return None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ours", required=True)
    ap.add_argument("--llama")
    ap.add_argument("--hf")
    ap.add_argument("--md")
    a = ap.parse_args()
    ours, llama, hf = load(a.ours), load(a.llama), load(a.hf)
    if ours is None:
        print("no record of ours")
        return 1
    by_len = {r["prompt_len"]: r for r in ours["results"]}
    lpp = {r["n_prompt"]: r["avg_ts"] for r in (llama or []) if r.get("n_gen") == 0}
    ltg = next((r["avg_ts"] for r in (llama or []) if r.get("n_prompt") == 0), None)
    hfr = {r["prompt_len"]: r for r in (hf or {}).get("results", [])}
    lines = [f"card: {ours['device'].get('name')}  date: {ours['date']}  engine: {ours['engine']}",
             f"copy bandwidth {ours['copy_bandwidth_Bps'] / 1e9:.0f} GB/s; peak device memory "
             f"{ours['memory'].get('peak_device_allocated_bytes', 0) / 2**30:.2f} GiB allocated "
             f"({ours['memory'].get('peak_device_reserved_bytes', 0) / 2**30:.2f} GiB reserved; measured runs "
             f"alone {ours['memory'].get('peak_device_runs_allocated_bytes', 0) / 2**30:.2f} GiB)", "",
             "| metric | gemma4-coreai | llama.cpp Q4_0 | HF bf16 | ours / llama.cpp | ours / HF |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]

    def row(name, ours_v, l_v, h_v):
        def f(v):
            return "-" if v is None else f"{v:,.1f}"

        def r(x, y):
            return "-" if x is None or not y else f"{x / y:.2f}x"
        lines.append(f"| {name} | {f(ours_v)} | {f(l_v)} | {f(h_v)} | {r(ours_v, l_v)} | {r(ours_v, h_v)} |")

    for plen in sorted(by_len):
        r = by_len[plen]
        h = hfr.get(plen)
        row(f"prefill tok/s @ {plen}", r["prefill_tps"]["median"], lpp.get(plen), h and h["prefill_tps"])
    for plen in sorted(by_len):
        r = by_len[plen]
        h = hfr.get(plen)
        if "decode_tps" in r:
            row(f"decode tok/s @ prompt {plen} (+{r['gen_len']})", r["decode_tps"]["median"],
                ltg if plen == min(by_len) else None, h and h["decode_tps"])
    lines.append("")
    lines.append("llama.cpp decode = llama-bench tg256 (from an empty context); fraction of the bandwidth floor "
                 "for ours: " + ", ".join(f"{p}: {100 * by_len[p].get('fraction_of_floor', 0):.0f}%"
                                          for p in sorted(by_len)))
    text = "\n".join(lines)
    print(text)
    if a.md:
        Path(a.md).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
