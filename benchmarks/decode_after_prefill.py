"""Decode speed as a function of the prefill that ran just before it, on one fast engine in one process.

    PYTHONPATH=src python benchmarks/decode_after_prefill.py BUNDLE [--prompt-len 128] [--gen-len 256] [--probes]
        [--gaps] [--max-context 4352]

Session 9 found decode 8.7% slower (2.617 against 2.408 ms per token on an H200, E4B shape) after a prompt prefilled
through its CUDA graph than after the same compiled prefill called directly; the same decode graphs run in both
cases (RESULTS.md). This prints one row per sequence of prefills: the median over 3 runs of the time per token
of `gen_len - 1` greedy steps (one device loop, as `bench` times decode), the first token and the SM clock. Use it
to find the cause, and to check a fix: the rows should agree. `--probes` adds rows that each change one thing after a
graphed prefill (NOTES.md, session 9: which state the slowdown lives in), and the host time of one decode replay.
Session 10 (NOTES.md): the tiny synthetic model shows it too (0.201 against 0.178 ms), and a 2-token compiled prefill
called directly after the graphed one restores the fast decode. `--gaps` profiles one decode step after each prefill
kind and prints the kernel boundaries whose gap (start minus the previous kernel's end; negative: PDL overlap)
changed most. Session 11 (NOTES.md): the gaps showed lost PDL overlap; neither the L1/shared-memory preference
(cuCtxSetCacheConfig) nor the GEMVs' shared-memory carveout changed anything; a few GEMVs launched directly after the
graph replay restore the fast decode. The engine now does that (`FastCudaBackend._settle_pdl`); the row "prefill
graph, no PDL settle" shows the state it prevents.
"""

from __future__ import annotations

import argparse
import ctypes
import time
from collections import defaultdict
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
    ap.add_argument("--gaps", action="store_true", help="also the kernel boundaries whose gap changed most")
    ap.add_argument("--max-context", type=int, default=4352)
    a = ap.parse_args()
    eng = make_engine(Bundle.open(a.bundle), torch.device("cuda"), "fast", None, a.max_context)
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

    def after_graph(op: Callable[[], object]) -> int:  # a graphed prefill, then `op` before the decode loop
        tok = prefill(True)
        op()
        return tok

    def direct_prefill(tokens: list[int], start: int, kv_len: int, ple: torch.Tensor | None) -> torch.Tensor:
        dev = eng.device  # the compiled prefill called directly, as `_prefill_chunk` does without its graph
        with torch.inference_mode():
            return eng._prefill_fn(torch.tensor([tokens], device=dev), torch.tensor(start, device=dev), ple, kv_len,
                                   torch.tensor(len(tokens) - 1, device=dev))

    def without_settle() -> int:  # the graphed prefill as before session 11's fix
        eng._settle_pdl = lambda: None  # shadows the method on this instance
        try:
            return prefill(True)
        finally:
            del eng._settle_pdl

    def sleep() -> None:
        torch.cuda.synchronize()
        time.sleep(1.0)

    def recapture() -> None:  # the decode graphs captured anew: state of the graph exec?
        for k in [k for k in eng._graphs if not isinstance(k, tuple)]:
            del eng._graphs[k]
        eng.warm(range(eng.position, eng.position + a.gen_len, 256))

    def direct_step() -> None:  # one compiled decode step launched directly (greedy rewrites ids, pos, slot)
        with torch.inference_mode():
            eng._captured_step(eng._bucket(eng.position))

    def direct_prefill_bucket() -> int:  # the whole prompt, called directly with the graph's kv_len (a bucket)
        eng.reset()
        logits = direct_prefill(ids, 0, eng._bucket(len(ids) - 1), None)
        eng._position = len(ids)
        return int(logits.argmax())

    def dummy_direct_prefill(n_tok: int) -> None:  # at the next position: the decode overwrites those K/V slots first
        pad, n = [0] * n_tok, eng.position
        direct_prefill(pad, n, n + n_tok, eng.inner._ple_rows(pad))

    def dummy_eager_prefill() -> None:  # the stock (uncompiled) prefill of 2 tokens at the next position
        n = eng.position
        eng.inner._position = n
        with torch.inference_mode():
            eng.inner.prefill([0, 0])
        eng._position = n

    kv: dict[str, torch.Tensor] = {}

    def graphed_with_ungraphed_kv() -> int:  # the KV cache of the ungraphed prefill copied over the graphed one's
        if not kv:
            prefill(False)
            kv.update(k=eng.model.k_cache.clone(), v=eng.model.v_cache.clone())
        return after_graph(lambda: (eng.model.k_cache.copy_(kv["k"]), eng.model.v_cache.copy_(kv["v"])))

    cfg, dev = eng.config, eng.device
    x2 = torch.randn(2, cfg.hidden_size, dtype=torch.bfloat16, device=dev)
    w_up = torch.randn(cfg.hidden_size, cfg.intermediate_size, dtype=torch.bfloat16, device=dev)
    q16 = torch.randn(1, cfg.num_heads, 16, cfg.global_head_dim, dtype=torch.bfloat16, device=dev)
    mask16 = torch.ones(16, 16, dtype=torch.bool, device=dev).tril()

    def masked_sdpa() -> torch.Tensor:  # the kernel a masked prefill attention picks (not flash)
        return torch.nn.functional.scaled_dot_product_attention(q16, q16, q16, attn_mask=mask16)

    side = torch.cuda.Stream()
    cases: list[tuple[str, Callable[[], int], torch.cuda.Stream | None]] = [
        ("prefill graph (untimed warm-up)", lambda: prefill(True), None),
        ("prefill graph", lambda: prefill(True), None),
        ("compiled prefill, no graph", lambda: prefill(False), None),
        ("graph, then no graph", lambda: (prefill(True), prefill(False))[1], None),
        ("no graph, then graph", lambda: (prefill(False), prefill(True))[1], None),
        ("prefill graph, then 1 s of sleep", lambda: after_graph(sleep), None),
        ("prefill graph, no PDL settle", without_settle, None),
    ]
    if a.probes:
        cases += [
            ("graph, decode graphs recaptured", lambda: after_graph(recapture), None),
            ("graph, decode on a new stream", lambda: prefill(True), side),
            ("graph, one direct decode step", lambda: after_graph(direct_step), None),
            ("no graph, kv_len of the bucket", direct_prefill_bucket, None),
            ("graph, KV of the no-graph prefill", graphed_with_ungraphed_kv, None),
            ("graph, then 2-token direct prefill", lambda: after_graph(lambda: dummy_direct_prefill(2)), None),
            ("graph, then 16-token direct prefill", lambda: after_graph(lambda: dummy_direct_prefill(16)), None),
            ("graph, then 2-token eager prefill", lambda: after_graph(dummy_eager_prefill), None),
            ("graph, then cuBLAS mm of 2 rows", lambda: after_graph(lambda: x2 @ w_up), None),
            ("graph, then masked SDPA, 16 tokens", lambda: after_graph(masked_sdpa), None),
            ("graph, then persisting L2 reset", lambda: after_graph(reset_persisting_l2), None),
        ]
    print(f"{'before the decode loop':36s} {'ms/token':>9s} {'first token':>12s} {'SM MHz':>7s} {'mem MHz':>7s}")
    for name, run, stream in cases:
        ms, tok = [], 0
        for _ in range(3):
            tok = run()
            ms.append(decode_ms(tok, stream))
        print(f"{name:36s} {sorted(ms)[1]:9.3f} {tok:12d} {torch.cuda.clock_rate():7d} {memory_clock():>7}",
              flush=True)
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
    if a.gaps:
        slow, fast = (step_kernels(eng, lambda g=graphs: prefill(g)) for graphs in (True, False))
        report_gaps(slow, fast)


def reset_persisting_l2() -> None:
    """cuCtxResetPersistingL2Cache: demote every persisting L2 line to normal."""
    rc = ctypes.CDLL("libcuda.so.1").cuCtxResetPersistingL2Cache()
    if rc != 0:
        raise SystemExit(f"cuCtxResetPersistingL2Cache failed: CUresult {rc}")


def memory_clock() -> str:
    """The memory clock in MHz from NVML, or "-" where pynvml is missing."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        return str(pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM))
    except Exception:  # noqa: BLE001 - a probe column, not worth failing the run for
        return "-"


def step_kernels(eng, prefill: Callable[[], int], steps: int = 8) -> list[tuple[str, float, float]]:
    """(name, start, end) in us of the kernels of the last of `steps` decode steps after `prefill` (torch.profiler;
    the kernels inside CUDA graphs are traced)."""
    from torch.profiler import ProfilerActivity, profile

    tok = prefill()
    eng.greedy(tok, 4)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        eng.greedy(tok, steps)
        torch.cuda.synchronize()
    kernels = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
               if e.device_type.name == "CUDA" and not any(w in e.name.lower() for w in ("memcpy", "memset"))]
    kernels.sort(key=lambda k: k[1])
    return kernels[-(len(kernels) // steps):]


def report_gaps(slow: list[tuple[str, float, float]], fast: list[tuple[str, float, float]]) -> None:
    """Pair the two steps' kernels by position; print span, kernel time and the boundaries whose gap grew most."""
    def span(k: list[tuple[str, float, float]]) -> str:
        return f"{k[-1][2] - k[0][1]:.1f} us span, {sum(e - s for _, s, e in k):.1f} us in kernels, {len(k)} kernels"

    if not slow or not fast:
        print("torch.profiler traced no kernels (CUPTI unavailable?): no gap table")
        return
    print(f"one decode step after a graphed prefill: {span(slow)}; after an ungraphed one: {span(fast)}")
    if [k[0] for k in slow] != [k[0] for k in fast]:
        print("the kernel sequences differ: no pairing")
        return
    gaps: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    for i in range(1, len(slow)):
        g = gaps[f"{slow[i - 1][0][:38]} -> {slow[i][0][:38]}"]
        g[0] += slow[i][1] - slow[i - 1][2]
        g[1] += fast[i][1] - fast[i - 1][2]
        g[2] += 1
    print(f"{'boundary (previous -> next kernel)':78s} {'n':>4s} {'gap slow':>9s} {'gap fast':>9s} (us, summed)")
    for key, (gs, gf, n) in sorted(gaps.items(), key=lambda kv: kv[1][1] - kv[1][0])[:12]:
        print(f"{key:78s} {n:4d} {gs:9.1f} {gf:9.1f}")
    print(f"{'all boundaries':78s} {len(slow) - 1:4d} {sum(g[0] for g in gaps.values()):9.1f} "
          f"{sum(g[1] for g in gaps.values()):9.1f}")


if __name__ == "__main__":
    main()
