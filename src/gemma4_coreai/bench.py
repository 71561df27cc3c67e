"""`gemma4-coreai bench`: prefill / decode tokens per second, peak memory and the bandwidth model.

Method (DESIGN.md §6): random prompt ids from a fixed seed (tokenizer-independent); one warm-up run per prompt
length, excluded; then `repeats` runs, each: reset, prefill the prompt, take the greedy token (time to first
token), then `gen_len - 1` greedy decode steps. prefill tok/s = prompt tokens / TTFT; decode tok/s =
(generated - 1) / time after the first token. Median over repeats, with min and max.

Bandwidth model: bytes one decode step must read = quantized linear weights (+ scales) + one embedding row + one
PLE row + the KV cache the step attends over (window-limited on sliding layers) at the mean decode position.
Floor = bytes / measured copy bandwidth; achieved fraction = floor / measured time per token.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig
from .errors import Gemma4Error

SCHEMA = "gemma4-coreai-bench/1"
ENGINES = ("auto", "fast", "stock", "cpu-int4", "cpu-int4-f32")


# ---- the bandwidth model ----------------------------------------------------------------------------------

def linear_bytes(cfg: ModelConfig) -> int:
    """Bytes of every int4 linear a decode step reads (q4 nibbles + fp16 scales), the untied head included."""
    total = 0
    shapes = dict(cfg.linear_shapes())
    shapes["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    for n, k in shapes.values():
        total += n * k // 2 + n * (k // 32) * 2
    return total


def kv_bytes(cfg: ModelConfig, context: int, dtype_bytes: int = 2) -> int:
    """K and V bytes all layers attend over at `context` cached positions (a shared layer re-reads its source)."""
    total = 0
    for s in cfg.layers:
        t = min(context, cfg.sliding_window) if s.is_sliding else context
        total += 2 * cfg.num_kv_heads * t * s.head_dim * dtype_bytes
    return total


def decode_step_bytes(cfg: ModelConfig, context: int, dtype_bytes: int = 2,
                      kv_dtype_bytes: int | None = None) -> dict[str, int]:
    """The bandwidth model: bytes one decode step reads. `dtype_bytes`: the embedding row's element size;
    `kv_dtype_bytes`: the KV cache's (default: the same; the stock CPU engine keeps an fp32 cache)."""
    parts = {
        "linears": linear_bytes(cfg),
        "embedding_row": cfg.hidden_size * dtype_bytes,
        "ple_row": cfg.ple_width + 4,
        "kv_cache": kv_bytes(cfg, context, kv_dtype_bytes or dtype_bytes),
    }
    parts["total"] = sum(parts.values())
    return parts


# ---- measurement helpers ----------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stats(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def _device_peak(dev: torch.device, peaks: dict[str, int], key: str, reset: bool = False) -> None:
    """Fold the CUDA peaks since the last reset into peaks[key] (allocated) and peaks["reserved"]; `reset` starts
    a new window. Nothing off CUDA."""
    if dev.type != "cuda":
        return
    peaks[key] = max(peaks.get(key, 0), int(torch.cuda.max_memory_allocated(dev)))
    peaks["reserved"] = max(peaks.get("reserved", 0), int(torch.cuda.max_memory_reserved(dev)))
    if reset:
        torch.cuda.reset_peak_memory_stats(dev)


def peak_rss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def copy_bandwidth(device: torch.device, nbytes: int | None = None) -> float:
    """Bytes/s of a large device copy (read + write), median of several."""
    from .fast import copy_bandwidth as cb

    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    return cb(device, nbytes)


def random_prompt(vocab_size: int, n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (n,), generator=g).tolist()


def _one_run(engine: Any, ids: list[int], gen_len: int, device: torch.device) -> tuple[float, float, list[int]]:
    """(ttft seconds, decode seconds for gen_len - 1 steps, generated tokens)."""
    engine.reset()
    _sync(device)
    t0 = time.perf_counter()
    logits = engine.prefill(ids)
    tok = int(logits.argmax())  # host sync: the first token exists
    t1 = time.perf_counter()
    toks = [tok]
    if gen_len > 1:
        if hasattr(engine, "greedy"):
            toks += engine.greedy(tok, gen_len - 1)[: gen_len - 1]
            _sync(device)
        else:
            for _ in range(gen_len - 1):
                tok = int(engine.decode(tok).argmax())
                toks.append(tok)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, toks


# ---- the benchmark ------------------------------------------------------------------------------------------

def make_engine(bundle: Any, device: torch.device, engine: str, ple_mode: str | None, max_context: int,
                dtype: str | None = None, compile: bool = True) -> Any:
    from .backends import TorchBackend

    if engine == "auto":
        engine = "fast" if device.type == "cuda" else "stock"
    if engine == "fast":
        if device.type != "cuda":
            raise Gemma4Error("engine 'fast' needs --device cuda (the CPU runs the stock engine)")
        from .fast import FastCudaBackend

        return FastCudaBackend.from_bundle(bundle, max_context=max_context, ple_mode=ple_mode or "tbl", compile=compile)
    if engine in ("cpu-int4", "cpu-int4-f32"):
        if device.type != "cpu":
            raise Gemma4Error(f"engine {engine!r} needs --device cpu")
        return TorchBackend.from_bundle(bundle, device=device, dtype=dtype, ple_mode=ple_mode, max_context=max_context,
                                        linear_strategy=engine, compile=compile)
    return TorchBackend.from_bundle(bundle, device=device, dtype=dtype, ple_mode=ple_mode, max_context=max_context)


def bench(bundle_path: str | Path, *, device: str = "cpu", prompt_lens: list[int] | tuple[int, ...] = (128,),
          gen_len: int = 32, repeats: int = 3, warmup: int = 1, ple_mode: str | None = None, engine: str = "auto",
          dtype: str | None = None, seed: int = 0, compile: bool = True, measure_bandwidth: bool = True,
          progress: bool = False) -> dict[str, Any]:
    """Benchmark a bundle; returns the JSON-able record (see module docstring)."""
    from .backends import resolve_device
    from .bundle import Bundle

    if not prompt_lens:
        raise Gemma4Error("bench: no prompt lengths given")
    for name, value, low in (("prompt_len", min(prompt_lens), 1), ("gen_len", gen_len, 1), ("repeats", repeats, 1),
                             ("warmup", warmup, 0)):
        if value < low:
            raise Gemma4Error(f"bench: {name} must be >= {low} (got {value})")
    if engine not in ENGINES:
        raise Gemma4Error(f"unknown engine {engine!r}: expected one of {', '.join(ENGINES)}")
    dev = resolve_device(device)
    b = Bundle.open(bundle_path)
    cfg = b.config
    max_ctx = max(prompt_lens) + gen_len
    if max_ctx > cfg.max_position_embeddings:  # the engine's cache is sized to the run, not the bundle's context
        raise Gemma4Error(f"--prompt-len {max(prompt_lens)} + --gen-len {gen_len} = {max_ctx} tokens exceed the "
                          f"model's {cfg.max_position_embeddings} positions (max_position_embeddings)")
    # The copy-bandwidth probe (2 x 1 GiB on CUDA) runs before the model exists, and is freed, so that the peak
    # device memory figures below are the model's alone. On the CPU it runs after the runs, once the peak host RSS
    # has been read: ru_maxrss only grows, and the probe's 2 x 256 MiB would count as the model's.
    bw = copy_bandwidth(dev) if measure_bandwidth and dev.type == "cuda" else None
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    t_load = time.perf_counter()
    eng = make_engine(b, dev, engine, ple_mode, max_ctx, dtype, compile)
    _sync(dev)
    load_s = time.perf_counter() - t_load

    # Device memory: the whole process's peak (load, compile and warm-up included), the peak once loaded, and the
    # peak of the measured runs alone (counters reset after each length's warm-up: what serving at that context
    # holds).
    peaks: dict[str, int] = {}
    _device_peak(dev, peaks, "load")
    cache = getattr(getattr(eng, "model", None), "k_cache", None)
    kv_itemsize = cache.element_size() if isinstance(cache, torch.Tensor) else None
    results = []
    for plen in prompt_lens:
        ids = random_prompt(cfg.vocab_size, plen, seed)
        if hasattr(eng, "warm"):
            eng.warm(range(plen, plen + gen_len, 256))
        for _ in range(warmup):
            _one_run(eng, ids, gen_len, dev)
        _device_peak(dev, peaks, "all", reset=True)
        ttfts, decs, runs = [], [], []
        for _ in range(repeats):
            ttft, dec, toks = _one_run(eng, ids, gen_len, dev)
            ttfts.append(ttft)
            decs.append(dec)
            runs.append(toks)
        mean_ctx = plen + (gen_len - 1) / 2
        model_bytes = decode_step_bytes(cfg, int(round(mean_ctx)), kv_dtype_bytes=kv_itemsize)
        row: dict[str, Any] = {
            "prompt_len": plen, "gen_len": gen_len,
            "ttft_s": _stats(ttfts),
            "prefill_tps": _stats([plen / t for t in ttfts]),
            "deterministic": all(r == runs[0] for r in runs),
            "bytes_per_decode_step": model_bytes,
        }
        if gen_len > 1:
            tps = [(gen_len - 1) / d for d in decs]
            row["decode_tps"] = _stats(tps)
            ms = 1e3 / row["decode_tps"]["median"]
            row["decode_ms_per_token"] = ms
        _device_peak(dev, peaks, "runs")
        results.append(row)
        if progress:
            print(_row_line(row), file=sys.stderr)

    mem: dict[str, Any] = {"peak_host_rss_bytes": peak_rss_bytes()}
    if measure_bandwidth and bw is None:
        bw = copy_bandwidth(dev)
    for row in results:  # the bandwidth floor: the model's bytes per step at the measured copy bandwidth
        if bw and "decode_ms_per_token" in row:
            floor_ms = row["bytes_per_decode_step"]["total"] / bw * 1e3
            row.update(floor_ms_per_token=floor_ms, floor_tps=1e3 / floor_ms,
                       fraction_of_floor=floor_ms / row["decode_ms_per_token"])
    if dev.type == "cuda":
        mem["peak_device_allocated_bytes"] = max(peaks["all"], peaks["runs"])
        mem["peak_device_load_allocated_bytes"] = peaks["load"]
        mem["peak_device_runs_allocated_bytes"] = peaks["runs"]
        mem["peak_device_reserved_bytes"] = peaks["reserved"]
    dev_info: dict[str, Any] = {"type": dev.type, "torch": torch.__version__}
    if dev.type == "cuda":
        dev_info["name"] = torch.cuda.get_device_name(dev)
        dev_info["cuda"] = torch.version.cuda
        try:
            import triton

            dev_info["triton"] = triton.__version__
        except ImportError:
            pass
    else:
        dev_info["name"] = platform.processor() or platform.machine()
        dev_info["threads"] = torch.get_num_threads()
    return {
        "schema": SCHEMA,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "bundle": str(bundle_path),
        "variant": cfg.variant,
        "device": dev_info,
        "engine": eng.describe() if hasattr(eng, "describe") else type(eng).__name__,
        "ple_mode": getattr(eng, "ple_mode", ple_mode),
        "settings": {"prompt_lens": list(prompt_lens), "gen_len": gen_len, "repeats": repeats, "warmup": warmup,
                     "seed": seed, "max_context": max_ctx},
        "load_s": load_s,
        "compile_s": getattr(eng, "compile_s", 0.0),
        "tune_s": getattr(eng, "tune_s", None),
        "gemv_kernels": eng.gemv_report() if hasattr(eng, "gemv_report") else None,
        "copy_bandwidth_Bps": bw,
        "memory": mem,
        "results": results,
    }


# ---- output -------------------------------------------------------------------------------------------------

def _row_line(r: dict[str, Any]) -> str:
    s = (f"{r['prompt_len']:>7} {r['gen_len']:>5} {r['prefill_tps']['median']:>12.1f} "
         f"[{r['prefill_tps']['min']:.0f}-{r['prefill_tps']['max']:.0f}]")
    if "decode_tps" in r:
        s += f" {r['decode_tps']['median']:>10.1f} [{r['decode_tps']['min']:.1f}-{r['decode_tps']['max']:.1f}]"
        if "fraction_of_floor" in r:
            s += f"  {r['floor_tps']:>8.0f} {100 * r['fraction_of_floor']:>5.1f}%"
    return s


def format_table(rec: dict[str, Any]) -> str:
    gb = 1024 ** 3
    lines = [f"{rec['engine']} on {rec['device'].get('name', rec['device']['type'])} "
             f"({rec['variant']}, torch {rec['device']['torch']})"]
    bw = rec.get("copy_bandwidth_Bps")
    if bw:
        lines.append(f"copy bandwidth {bw / 1e9:.1f} GB/s; load {rec['load_s']:.1f} s, "
                     f"compile+capture {rec['compile_s']:.1f} s")
    lines.append(f"{'prompt':>7} {'gen':>5} {'prefill tok/s':>12} {'(min-max)':>10} {'decode tok/s':>10} "
                 f"{'(min-max)':>12} {'floor':>8} {'of floor':>6}")
    lines += [_row_line(r) for r in rec["results"]]
    m = rec["memory"]
    mem = f"peak host RSS {m['peak_host_rss_bytes'] / gb:.2f} GiB"
    if "peak_device_allocated_bytes" in m:
        mem += (f"; peak device {m['peak_device_allocated_bytes'] / gb:.2f} GiB allocated (after loading "
                f"{m['peak_device_load_allocated_bytes'] / gb:.2f}, measured runs "
                f"{m['peak_device_runs_allocated_bytes'] / gb:.2f}), {m['peak_device_reserved_bytes'] / gb:.2f} GiB "
                "reserved")
    lines.append(mem)
    if rec["results"]:
        mb = rec["results"][0]["bytes_per_decode_step"]
        lines.append(f"bytes per decode step (prompt {rec['results'][0]['prompt_len']}): "
                     f"{mb['total'] / 1e9:.3f} GB (linears {mb['linears'] / 1e9:.3f}, "
                     f"KV {mb['kv_cache'] / 1e6:.1f} MB)")
    return "\n".join(lines)


# ---- CLI (wired into cli.py with `add_bench_parser(sub)`; it sets func=run_bench) -------------------------

def add_bench_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "bench", help="prefill/decode tokens per second, peak memory, bandwidth model",
        description="Benchmark a bundle: random prompt ids from a fixed seed, warm-up excluded, median over "
                    "repeats (min/max too). prefill tok/s = prompt tokens / time to first token; decode tok/s = "
                    "(generated - 1) / time after the first token. Also reports peak device memory, peak host "
                    "RSS, the bandwidth model's bytes per decode step, the measured copy bandwidth and the "
                    "achieved fraction of the floor.")
    p.add_argument("bundle", type=Path, metavar="BUNDLE", help="bundle directory (from convert)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--prompt-len", type=int, nargs="+", default=[128], metavar="N",
                   help="prompt lengths to measure (default 128); the KV cache is sized to the longest + --gen-len, "
                        "which may pass the bundle's max context (not the model's positions)")
    p.add_argument("--gen-len", type=int, default=32, metavar="N", help="tokens generated per run (default 32)")
    p.add_argument("--repeats", type=int, default=3, metavar="N", help="measured runs per prompt length (default 3)")
    p.add_argument("--warmup", type=int, default=1, metavar="N", help="excluded warm-up runs (default 1)")
    p.add_argument("--ple-mode", choices=("provider", "tbl"), default=None,
                   help="PLE table handling (default: tbl on cuda, provider on cpu)")
    p.add_argument("--engine", choices=ENGINES, default="auto",
                   help="fast (CUDA: Triton int4 + CUDA graphs), stock (model.py eager), auto (default: fast on "
                        "cuda, stock on cpu), cpu-int4 (CPU: native AVX2 int4 kernel, q8 activations like llama.cpp, "
                        "approximate; decode steps compiled with torch.compile), cpu-int4-f32 (the same kernel with "
                        "fp32 activations)")
    p.add_argument("--dtype", default=None, help="stock engine compute dtype (fp32, bf16, fp16)")
    p.add_argument("--no-compile", action="store_true",
                   help="fast engine: CUDA graphs without torch.compile; cpu-int4 engines: eager decode steps")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="prompt seed in [0, 2**63) (default 0)")
    p.add_argument("--json", action="store_true", help="print the JSON record instead of the table")
    p.add_argument("-o", "--out", type=Path, default=None, metavar="FILE",
                   help="also write the JSON record here (checked before the benchmark runs)")
    p.add_argument("--force", action="store_true", help="replace FILE if it exists")
    p.set_defaults(func=run_bench)
    return p


def run_bench(args: argparse.Namespace) -> int:
    from .checkpoint import refuse_overwriting_source, write_text_atomic
    from .cli import check_out_path

    if args.out is not None:
        check_out_path(args.out, force=args.force, file=True)
        refuse_overwriting_source(args.out, args.bundle)
    rec = bench(args.bundle, device=args.device, prompt_lens=args.prompt_len, gen_len=args.gen_len,
                repeats=args.repeats, warmup=args.warmup, ple_mode=args.ple_mode, engine=args.engine,
                dtype=args.dtype, seed=args.seed, compile=not args.no_compile, progress=not args.json)
    text = json.dumps(rec, indent=2)
    if args.out is not None:
        write_text_atomic(args.out, text + "\n")
    print(text if args.json else format_table(rec))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m gemma4_coreai.bench BUNDLE ...` (same options and checks as `gemma4-coreai bench`)."""
    from .cli import main as cli_main

    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
