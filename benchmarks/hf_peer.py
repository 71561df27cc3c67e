"""Hugging Face transformers bf16 peer: prefill and greedy decode on the same synthetic checkpoint, one GPU.

    python benchmarks/hf_peer.py CKPT_DIR --prompt-len 128 4096 --gen-len 32 --json OUT.json
prefill tok/s = prompt / time of generate(max_new_tokens=1); decode tok/s = (gen - 1) / (time of
generate(max_new_tokens=gen) - that). Median of --repeats, warm-up excluded.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt")
    ap.add_argument("--prompt-len", type=int, nargs="+", default=[128, 4096])
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import transformers
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.ckpt, dtype=torch.bfloat16, device_map="cuda").eval()
    load_s = time.perf_counter() - t0
    cfg = model.config
    vocab = getattr(cfg, "vocab_size", None) or cfg.get_text_config().vocab_size
    rows = []

    def gen(ids, n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - t, out

    for plen in args.prompt_len:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (1, plen), generator=g).cuda()
        gen(ids, 2)  # warm-up
        pre, dec = [], []
        for _ in range(args.repeats):
            t1, _ = gen(ids, 1)
            tn, _ = gen(ids, args.gen_len)
            pre.append(plen / t1)
            dec.append((args.gen_len - 1) / max(tn - t1, 1e-9))
        rows.append({"prompt_len": plen, "gen_len": args.gen_len, "prefill_tps": statistics.median(pre),
                     "decode_tps": statistics.median(dec), "prefill_all": pre, "decode_all": dec})
        print(f"hf bf16 prompt {plen}: prefill {rows[-1]['prefill_tps']:.0f} tok/s, decode "
              f"{rows[-1]['decode_tps']:.1f} tok/s", flush=True)
    rec = {"engine": f"transformers {transformers.__version__} bf16 (sdpa)", "device": torch.cuda.get_device_name(),
           "load_s": load_s, "peak_device_bytes": torch.cuda.max_memory_allocated(), "results": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rec, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
