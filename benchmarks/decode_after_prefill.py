"""Decode speed as a function of the prefill that ran just before it, on one fast engine in one process.

    PYTHONPATH=src python benchmarks/decode_after_prefill.py BUNDLE [--prompt-len 128] [--gen-len 256] [--probes]

Session 9 found decode 8.7% slower (2.617 against 2.408 ms per token on an H200, E4B shape) after a prompt prefilled
through its CUDA graph than after the same compiled prefill called directly; the same decode graphs run in both
cases (RESULTS.md). This prints one row per sequence of prefills: the median over 3 runs of the time per token
of `gen_len - 1` greedy steps (one device loop, as `bench` times decode), the first token and the SM clock. Use it
to find the cause, and to check a fix: the rows should agree. `--probes` adds rows that each change one thing after a
graphed prefill (NOTES.md, session 9: which state the slowdown lives in), and the host time of one decode replay.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from gemma4_coreai.bench import make_engine, random_prompt
from gemma4_coreai.bundle import Bundle


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--prompt-len", type=int, default=128, help="at most 512, so that a prefill graph applies")
    ap.add_argument("--gen-len", type=int, default=256)
    ap.add_argument("--probes", action="store_true", help="also the rows that locate the slowdown")
    a = ap.parse_args()
    eng = make_engine(Bundle.open(a.bundle), torch.device("cuda"), "fast", None, 4352)
    print(eng.describe(), flush=True)
    ids = random_prompt(eng.config.vocab_size, a.prompt_len, 0)

    def prefill(graphs: bool) -> int:
        eng.reset()
        eng.prefill_graphs = graphs
        return int(eng.prefill(ids).argmax())

    def decode_ms(first: int, stream: torch.cuda.Stream | None = None) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.cuda.stream(stream or torch.cuda.current_stream()):
            eng.greedy(first, a.gen_len - 1)
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / (a.gen_len - 1) * 1e3

    def sleep_after() -> int:
        tok = prefill(True)
        torch.cuda.synchronize()
        time.sleep(1.0)
        return tok

    def recaptured() -> int:  # the decode graphs captured anew after the graphed prefill: state of the graph exec?
        tok = prefill(True)
        for k in [k for k in eng._graphs if not isinstance(k, tuple)]:
            del eng._graphs[k]
        eng.warm(range(eng.position, eng.position + a.gen_len, 256))
        return tok

    def direct_step_after() -> int:  # one compiled decode step launched directly (greedy rewrites ids, pos, slot)
        tok = prefill(True)
        with torch.inference_mode():
            eng._captured_step(eng._bucket(eng.position))
        return tok

    def direct_prefill_bucket() -> int:  # the compiled prefill called directly with the graph's kv_len (a bucket)
        eng.reset()
        n = len(ids)
        dev = eng.device
        x = torch.tensor([ids], dtype=torch.long, device=dev)
        pos, last = torch.tensor(0, device=dev), torch.tensor(n - 1, device=dev)
        with torch.inference_mode():
            logits = eng._prefill_fn(x, pos, None, eng._bucket(n - 1), last)
        eng._position = n
        return int(logits.argmax())

    kv: dict[str, torch.Tensor] = {}

    def graphed_with_ungraphed_kv() -> int:  # the KV cache of the ungraphed prefill copied over the graphed one's
        if not kv:
            prefill(False)
            kv.update(k=eng.model.k_cache.clone(), v=eng.model.v_cache.clone())
        tok = prefill(True)
        eng.model.k_cache.copy_(kv["k"])
        eng.model.v_cache.copy_(kv["v"])
        return tok

    side = torch.cuda.Stream()
    cases: list[tuple[str, Callable[[], int], torch.cuda.Stream | None]] = [
        ("prefill graph (untimed warm-up)", lambda: prefill(True), None),
        ("prefill graph", lambda: prefill(True), None),
        ("compiled prefill, no graph", lambda: prefill(False), None),
        ("graph, then no graph", lambda: (prefill(True), prefill(False))[1], None),
        ("no graph, then graph", lambda: (prefill(False), prefill(True))[1], None),
        ("prefill graph, then 1 s of sleep", sleep_after, None),
    ]
    if a.probes:
        cases += [
            ("graph, decode graphs recaptured", recaptured, None),
            ("graph, decode on a new stream", lambda: prefill(True), side),
            ("graph, one direct decode step", direct_step_after, None),
            ("no graph, kv_len of the bucket", direct_prefill_bucket, None),
            ("graph, KV of the no-graph prefill", graphed_with_ungraphed_kv, None),
        ]
    print(f"{'before the decode loop':36s} {'ms/token':>9s} {'first token':>12s} {'SM MHz':>7s}")
    for name, run, stream in cases:
        ms, tok = [], 0
        for _ in range(3):
            tok = run()
            ms.append(decode_ms(tok, stream))
        print(f"{name:36s} {sorted(ms)[1]:9.3f} {tok:12d} {torch.cuda.clock_rate():7d}", flush=True)
    if a.probes:  # host cost of one decode replay (queued, no sync), after each prefill kind
        for graphs in (True, False):
            prefill(graphs)
            g = eng._graphs[eng._bucket(eng.position)]
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(32):
                g.replay()
            host_us = (time.perf_counter() - t) / 32 * 1e6
            torch.cuda.synchronize()
            print(f"host time of one decode replay after {'a graphed' if graphs else 'an ungraphed'} prefill: "
                  f"{host_us:.1f} us")


if __name__ == "__main__":
    main()
