"""The fast CUDA path: model.py's Gemma4Model with strategies plugged in, not a second copy of the math.

- Load-time transform (`stack_projections`): q/k/v and gate/up stacked into one packed linear per group.
- Load-time layout (`to_frag_layout`): where the CUDA kernel builds, every linear whose shape allows it gets its
  bytes permuted into the tensor-core GEMV's layout (same memory, no copy kept).
- Linear strategy (`fast_linear`): one token -> the int4 GEMV (`torch.ops.gemma4.q4_gemv_partials`: the CUDA C++
  kernel, or Triton where nvcc is missing; weights streamed once; fp32 sums over K slices, added in the kernel's
  epilogue (`GEMV_REDUCE`) or by whichever fused kernel reads the partials), its variant and K split picked per
  shape by timing the candidates on the model's own weights at load (`tune_gemv`); several tokens (prefill) ->
  dequantize to bf16 with a CUDA kernel, then a tensor-core GEMM (cuBLAS through F.linear).
- Attention strategy (`fused_decode_attention`): prefill through one fused SDPA kernel; decode through a Triton
  split-KV kernel pair reading the cache in place (`sdpa_attention` keeps model.py's for decode: "stock").
- Decode step: `torch.compile` (inductor fuses the norms, RoPE, masks and softmax between the GEMVs; its
  multi-kernel mode lets the 2560-wide RMSNorm reductions run persistent, see `inductor_options`), then one
  CUDA graph per KV-length bucket, replayed with no host synchronisation inside a step. The graph also takes
  the greedy argmax and advances the device-side token and position, so `greedy(n)` queues n steps and
  synchronises once. On Hopper every kernel of the step launches with programmatic dependent launch (the GEMVs
  through `set_pdl`, inductor's through `inductor_options`), so each starts while the previous one drains.
- Prefill: `torch.compile` as well, one graph for every prompt length (dynamic shapes), in chunks of
  PREFILL_CHUNK tokens; pieces up to 512 tokens padded to a few fixed lengths and replayed as CUDA graphs.
- Token embedding (`embed_from_head`): where the int4 output head is a lossless copy of the 16-bit embedding (QAT
  checkpoints), rows are gathered from the head and the 16-bit table is freed (E4B: 1.34 GB).
- PLE in tbl mode: the int8 table is a resident buffer gathered in the graph (provider mode copies the host
  row into a static buffer before each replay).
- KV cache: model.py's unified buffers, allocated once for `max_context`, written by `scatter_kv_write` (one
  index_put_ on the whole buffer, which inductor keeps in place and fuses into the kernel producing K/V; the
  stock slice-view `index_copy_` costs a copy of the whole cache per layer under torch.compile).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import types
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import kernels  # noqa: F401  (registers torch.ops.gemma4.*)
from .backends import TorchBackend, _BundleTensors, _compile_mode, compile_layers, error_line, uncompile_layers
from .checkpoint import write_text_atomic
from .errors import Gemma4Error
from .kernels import (
    FRAG_VARIANTS,
    GEMV_REDUCE,
    MMA_SMEM_LIMIT,
    cuda_ext,
    frag_ok,
    gemv_split,
    q4_rows,
    set_pdl,
    split_ok,
    to_frag_layout,
)
from .model import Gemma4Model, Q4Linear, attention, dequantize_ple, set_attention, set_kv_write, set_linear_fn

KV_BUCKET = 512
# Tokens per batched prefill forward: bounds activation memory. E4B at 4096 tokens on an H200 (NOTES.md, session 3):
# chunks of 4096 took 105.7 ms against 147.9 ms for two of 2048 (eager launches dominate), peak +0.41 GiB.
PREFILL_CHUNK = 4096
# Prompt pieces up to the largest of these are padded at the end to the next one and replayed as a CUDA graph (one
# per length and KV bucket, captured on first use): a short prompt's prefill is otherwise mostly launch time.
PREFILL_GRAPH_LENGTHS = (16, 32, 64, 128, 256, 512)
# Direct GEMV launches after each prefill-graph replay (`_settle_pdl`): E4B needs at least 4 (1 was enough on
# the tiny model), 8 leaves margin for a few microseconds.
SETTLE_LAUNCHES = 8


def fast_linear(m: Q4Linear, x: torch.Tensor) -> torch.Tensor:
    """Linear strategy for the CUDA fast path (module storage must be 'packed'; `m.gemv` = (variant, split) from
    `tune_gemv`, `m.layout` = "frag" where the weights were permuted for the tensor-core kernel)."""
    if x.numel() == m.in_features:  # one token: bandwidth-bound GEMV straight from int4
        variant, split = getattr(m, "gemv", None) or default_gemv(m.out_features, m.in_features, _layout(m))
        # fp32 partial sums over K slices; the sum and the cast fuse into whatever kernel reads the result
        part = torch.ops.gemma4.q4_gemv_partials(x, m.q4, m.scale, split, variant)
        y = part[0] if part.shape[0] == 1 else part.sum(0)  # [1, N] when the kernel added its slices itself
        return y.to(x.dtype).view(*x.shape[:-1], m.out_features)
    w = torch.ops.gemma4.q4_dequant(m.q4, m.scale, x.dtype, _layout(m) == "frag")  # prefill: tensor-core GEMM
    return F.linear(x, w)


def _layout(m: Q4Linear) -> str:
    return getattr(m, "layout", "packed")


def default_gemv(n: int, k: int, layout: str) -> tuple[int, int]:
    """Untimed (variant, split): the tensor-core kernel for frag weights (about 2048 warps of 16 rows, at least 2
    chunks a K slice), else the CUDA-core default with `gemv_split`."""
    if layout != "frag":
        return 0, gemv_split(n, k)
    nc = k // 128
    split = max(1, min(16, -(-2048 // (n // 16)), nc // 2))
    return 17, -(-nc // -(-nc // split))


def _frag_allowed(lin: Q4Linear) -> bool:
    # a stacked linear's parts are row views: each must start on a 16-row group to stay a valid frag tensor
    return frag_ok(lin.out_features, lin.in_features) and all(p.out_features % 16 == 0
                                                              for p in getattr(lin, "parts", ()))


def _to_frag(lin: Q4Linear) -> None:
    """Replace a linear's weights by their frag layout; the parts of a stacked linear become row views of the new
    tensors (16-row slices of a frag tensor are the frag layout of those rows), so no second copy stays alive."""
    lin.q4, lin.scale = to_frag_layout(lin.q4, lin.scale)
    lin.layout = "frag"
    row = 0
    for part in getattr(lin, "parts", ()):
        part.q4, part.scale = lin.q4[row:row + part.out_features], lin.scale[row:row + part.out_features]
        part.layout = "frag"
        row += part.out_features


def use_frag_layout(model: Gemma4Model) -> int:
    """Every linear whose shape allows it to the frag layout (tests; the fast backend lets `tune_gemv` decide per
    shape). Returns how many were converted."""
    count = 0
    for _, lin in model.q4_linears():
        lin.layout = getattr(lin, "layout", "packed")
        if lin.q4 is not None and lin.q4._base is None and lin.layout == "packed" and _frag_allowed(lin):
            _to_frag(lin)
            count += 1
    return count


def embed_from_head(model: Gemma4Model, rows_per_check: int = 16384, table: torch.Tensor | None = None) -> bool:
    """If the int4 output head dequantizes to exactly the 16-bit token embedding (a QAT checkpoint: the embedding
    lies on the q4_0 lattice, so the head is its lossless copy), gather embedding rows from the head and free the
    16-bit table (E4B: 1.34 GB). Checked chunk by chunk at load; returns whether it switched. `table`: the table
    when the model holds none yet (`FastCudaBackend.from_bundle` keeps it on the host; chunks are copied over)."""
    head = model.lm_head
    table = model.embed_tokens if table is None else table
    if head.q4 is None or table.shape != (head.out_features, head.in_features):
        return False
    dev = head.q4.device
    for i in range(0, table.shape[0], rows_per_check):
        ids = torch.arange(i, min(i + rows_per_check, table.shape[0]), device=dev)
        rows = q4_rows(head.q4, head.scale, ids, table.dtype, _layout(head) == "frag")
        if not torch.equal(rows, table[i:i + rows_per_check].to(dev)):
            return False
    dtype = table.dtype
    model.embed_tokens = torch.empty(0, dtype=dtype, device=dev)

    def embed(self: Gemma4Model, input_ids: torch.Tensor) -> torch.Tensor:
        head = self.lm_head
        return q4_rows(head.q4, head.scale, input_ids, dtype, _layout(head) == "frag").view(*input_ids.shape, -1)

    model.embed = types.MethodType(embed, model)
    return True


def _tuning_header(device: torch.device, pdl: bool) -> str:
    """What GEMV timings depend on besides the shape: the GPU model, torch, the kernel source, the launch mode."""
    from .kernels import _CUDA

    src = Path(__file__).with_name("q4_gemv_cuda.cu")
    kernel = hashlib.sha1(src.read_bytes()).hexdigest()[:12] if _CUDA["ext"] is not None else "triton"
    return f"{torch.cuda.get_device_name(device)} | torch {torch.__version__} | kernel {kernel} | pdl {int(pdl)}"


def inductor_options(pdl: bool, decode: bool = False) -> dict[str, Any]:
    """torch.compile options of the fast path's steps: programmatic dependent launch for inductor's Triton kernels
    where this torch has it (each kernel waits for its producer inside, so its launch overlaps the previous one);
    for the decode step also multi-kernel mode, which lets reductions up to 16x inductor's usual limit (1024) be
    persistent, with the looped version kept and the faster one picked on the first run. The decode step's
    RMSNorms over 2560 values are otherwise loops that re-read their input (H200: decode 2-5% faster, RESULTS.md;
    not used for prefill, where it measured no better)."""
    import torch._inductor.config as inductor_config

    options: dict[str, Any] = {}
    if pdl and hasattr(inductor_config.triton, "enable_pdl"):
        options["triton.enable_pdl"] = True
    if decode and hasattr(inductor_config.triton, "multi_kernel"):
        options["triton.multi_kernel"] = 1
    return options


def _graph_us(calls: Sequence[Any], rounds: int = 3) -> float:
    """Median GPU microseconds per call of `calls` (zero-argument callables) replayed as one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in calls[:3]:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / len(calls))
    return float(np.median(times))


FRAG_SPLITS = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 20, 32)


def gemv_candidates(n: int, k: int, layout: str, x_dtype: torch.dtype) -> list[tuple[int, int]]:
    """(variant, split) pairs worth timing for one weight shape and layout."""
    if layout == "frag":
        return [(v, sp) for v in FRAG_VARIANTS for sp in FRAG_SPLITS
                if split_ok(k, sp, v) and -(-k // 128 // sp) * 256 <= MMA_SMEM_LIMIT]
    if cuda_ext() is None:  # Triton: it autotunes its own tiles; keep the split heuristic
        return [(0, gemv_split(n, k))]
    variants = (0, 1, 3, 4, 5, 7) if x_dtype == torch.bfloat16 else (0,)
    return [(v, sp) for v in variants for sp in (1, 2, 3, 4, 6, 8) if split_ok(k, sp, v)]


def tune_gemv(model: Gemma4Model, x_dtype: torch.dtype = torch.bfloat16, frag: bool = True,
              timer: Any = None, reduce: bool = False,
              cache: dict[str, Any] | None = None) -> dict[tuple[int, int], Any]:
    """Pick each linear's GEMV kernel, K split and weight layout by timing every candidate on the model's own
    weights (CUDA graphs over the linears of one shape, rotating so that L2 does not hold them; the frag layout
    timed on temporary copies), then set `lin.gemv` = (variant, split) and move the shape's weights to the frag
    layout where a tensor-core variant won (`frag`: allow that). One entry per (N, K): {"pick": (variant, split),
    "layout", "us", "tried" (0: taken from `cache`), "reduce"}. GEMMA4_GEMV_TUNE=0 skips the timing: the default
    CUDA-core kernel everywhere. Views (parts of stacked projections) are not called by the fast path and are
    skipped. `timer(calls, key)` (tests) replaces the CUDA-graph timing; key = (N, K, variant, split, layout).
    `reduce`: every pick (and every timed candidate) adds its K slices in the kernel (variant | GEMV_REDUCE; CUDA
    kernel only). `cache`: picks of earlier timings on the same GPU and code (`GemvTuningCache`), used instead of
    timing where they are still candidates; new picks are added to it."""
    timer = timer or (lambda calls, key: _graph_us(calls))

    groups: dict[tuple[int, int], list[Q4Linear]] = {}
    for _, lin in model.q4_linears():
        lin.layout = getattr(lin, "layout", "packed")
        if lin.q4 is not None and lin.q4._base is None:
            groups.setdefault((lin.out_features, lin.in_features), []).append(lin)
    tune = os.environ.get("GEMMA4_GEMV_TUNE", "1") != "0"
    flag = GEMV_REDUCE if reduce else 0
    report = {}
    for (n, k), lins in groups.items():
        layouts = {lin.layout for lin in lins}
        layout = layouts.pop() if len(layouts) == 1 else "mixed"
        can_frag = frag and layout == "packed" and all(_frag_allowed(lin) for lin in lins)
        if layout == "mixed":  # not produced by the fast path; keep every linear on its own default
            for lin in lins:
                v, sp = default_gemv(n, k, lin.layout)
                lin.gemv = (v | flag, sp)
            continue
        cands = [(v, sp, lay) for lay in ((layout, "frag") if can_frag else (layout,))
                 for v, sp in gemv_candidates(n, k, lay, x_dtype)]
        ckey = f"{n}x{k} {layout} {str(x_dtype).removeprefix('torch.')} reduce={int(bool(flag))} frag={int(can_frag)}"
        cached = (cache or {}).get(ckey)
        hit = bool(tune and cached and tuple(cached[:3]) in cands)
        if hit:
            pick = tuple(cached[:3])
            times = {pick: cached[3]}
        elif not tune or len(cands) == 1:
            pick = (*default_gemv(n, k, layout), layout)
            times = {pick: None}
        else:
            per_set = n * k // 2 * 1.125
            sets = lins[:max(1, min(len(lins), math.ceil(256e6 / per_set)))]
            weights = {layout: [(m.q4, m.scale) for m in sets]}
            if can_frag:  # timed on temporary copies; the winner's weights move below
                weights["frag"] = [to_frag_layout(m.q4, m.scale) for m in sets]
            x = torch.randn(1, k, device=sets[0].q4.device).to(x_dtype)
            times = {}
            with torch.inference_mode():
                for v, sp, lay in cands:
                    calls = [lambda w=w, v=v | flag, sp=sp, x=x: torch.ops.gemma4.q4_gemv_partials(x, *w, sp, v)
                             for w in weights[lay]] * max(1, 8 // len(sets))
                    times[(v, sp, lay)] = timer(calls, (n, k, v, sp, lay))
            del weights
            pick = min(times, key=times.get)
            if cache is not None:
                cache[ckey] = [*pick, times[pick]]
        if pick[2] == "frag" and layout == "packed":
            for lin in lins:
                _to_frag(lin)
        for lin in lins:
            lin.gemv = (pick[0] | flag, pick[1])
        report[(n, k)] = {"pick": pick[:2], "layout": pick[2], "us": times[pick],
                          "tried": 0 if hit else len(times), "reduce": bool(flag)}
    return report


class GemvTuningCache:
    """`tune_gemv`'s picks kept across processes, in a JSON file (default: $GEMMA4_CACHE_DIR, else
    $XDG_CACHE_HOME/gemma4-coreai, else ~/.cache/gemma4-coreai; gemv-tuning.json), one section per GPU model, torch
    version, kernel source and launch mode (`header`). An unreadable file is ignored and rewritten; a file that
    cannot be written only costs the timing next time. GEMMA4_GEMV_TUNE=fresh re-times and overwrites."""

    def __init__(self, header: str, path: Path | None = None):
        if path is None:
            root = os.environ.get("GEMMA4_CACHE_DIR") or os.path.join(
                os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gemma4-coreai")
            path = Path(root) / "gemv-tuning.json"
        self.path, self.header = Path(path), header
        try:
            self._all = json.loads(self.path.read_text())
            if not isinstance(self._all, dict):
                self._all = {}
        except (OSError, ValueError):
            self._all = {}
        fresh = os.environ.get("GEMMA4_GEMV_TUNE") == "fresh"
        self.picks: dict[str, Any] = {} if fresh else dict(self._all.get(header) or {})
        self._saved = None if fresh else dict(self.picks)

    def save(self) -> None:
        if self.picks == self._saved:
            return
        self._all[self.header] = self.picks
        try:
            write_text_atomic(self.path, json.dumps(self._all, indent=1, sort_keys=True))
            self._saved = dict(self.picks)
        except OSError:  # a read-only cache location: the picks are simply re-tuned next time
            pass


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Attention strategy for the fast path: several query rows (prefill) -> one fused SDPA kernel (no [S, T]
    fp32 score tensors in memory); one row (decode, compiled) -> model.py's `attention`. Same contract: score
    scale 1.0, GQA by repeating K/V heads in HF's order, `allowed` [S, T] bool."""
    if q.shape[2] == 1:
        return attention(q, k, v, allowed)
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=1.0)


def fused_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           allowed: torch.Tensor) -> torch.Tensor:
    """The fast path's attention strategy (`FastCudaBackend(decode_attention="triton")`, the default): prefill as
    `sdpa_attention`; one query row through `torch.ops.gemma4.decode_attention` (two Triton kernels, split-KV flash
    decoding reading the cache views in place) instead of two cuBLAS GEMMs, a mask and a softmax. Same contract as
    `attention`."""
    if q.shape[2] != 1:
        return sdpa_attention(q, k, v, allowed)
    return torch.ops.gemma4.decode_attention(q, k, v, allowed)


DECODE_ATTENTION = {"stock": sdpa_attention, "triton": fused_decode_attention}


def scatter_kv_write(cache: torch.Tensor, slot: int, positions: torch.Tensor, kv: torch.Tensor) -> None:
    """KV-write strategy for the fast path: kv [1, kv_heads, S, hd] -> cache[slot, 0, :, positions, :hd] as one
    index_put_ on the cache itself (every index a broadcast tensor, no view of the cache). torch.compile turns
    it into a scatter into the cache buffer, fused with the K/V producer; a write through a view (model.py's
    `index_copy_kv_write`) is functionalized into a fresh copy of the whole cache instead. Not for Core AI export
    (its runtime crashes on a rank-broadcast index_put)."""
    _, h, s, d = kv.shape
    p = positions.long()
    idx = (p.new_full((1, 1, 1), slot), p.new_zeros((1, 1, 1)), torch.arange(h, device=p.device).view(h, 1, 1),
           p.view(1, s, 1), torch.arange(d, device=p.device).view(1, 1, d))
    cache.index_put_(idx, kv[0].to(cache.dtype))


def stack_projections(model: Gemma4Model) -> None:
    """Load-time transform: the projections that read one input (q/k/v on KV-owning layers, gate/up) become one
    packed Q4Linear each, rows stacked, so a decode step runs one GEMV per group instead of three or two. The
    layer's `projections` then splits the stacked product; model.py's math is untouched. The original modules
    keep their weights as views of the stacked buffers (no extra memory). Needs packed storage."""
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if attn.owns_kv:
            _stack(attn, (attn.q_proj, attn.k_proj, attn.v_proj))
        _stack(mlp, (mlp.gate_proj, mlp.up_proj))


def _stacked_projections(self: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return self.stacked_proj(x).split(self.stacked_proj.split_sizes, dim=-1)


def _stack(parent: torch.nn.Module, parts: Sequence[Q4Linear]) -> None:
    if any(p.q4 is None for p in parts):
        raise Gemma4Error("stack_projections needs packed linear storage")
    layouts = {_layout(p) for p in parts}
    if len(layouts) > 1:  # frag and packed rows cannot share one kernel call: leave this group unstacked
        return
    scale_dtype = torch.float32 if any(p.scale.dtype == torch.float32 for p in parts) else parts[0].scale.dtype
    stacked = Q4Linear(parts[0].name.rsplit(".", 1)[0] + ".stacked_proj", torch.cat([p.q4 for p in parts]),
                       torch.cat([p.scale.to(scale_dtype) for p in parts]), "packed", torch.float32,
                       parts[0].q4.device)
    stacked.split_sizes = [p.out_features for p in parts]
    stacked.layout = layouts.pop()
    stacked.parts = list(parts)  # plain list (not submodules): the row views, for `_to_frag`
    row = 0
    for p in parts:
        p.q4, p.scale = stacked.q4[row:row + p.out_features], stacked.scale[row:row + p.out_features]
        row += p.out_features
    parent.stacked_proj = stacked
    parent.projections = types.MethodType(_stacked_projections, parent)


EMBEDDING = "embed_tokens.weight"


class _Without:
    """A weights mapping with one tensor replaced by a stand-in (`from_bundle`: the embedding by an empty one)."""

    def __init__(self, weights: Any, key: str, stand_in: torch.Tensor):
        self._weights, self._key, self._stand_in = weights, key, stand_in

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._stand_in if key == self._key else self._weights[key]


class FastCudaBackend:
    """Same API as TorchBackend (`prefill`, `decode`, `reset`, `max_context`, `position`) plus `greedy(n)`."""

    name = "fast"

    def __init__(self, inner: TorchBackend, *, compile: bool | str = True, cuda_graph: bool = True, stack: bool = True,
                 sdpa: bool = True, frag: bool = True, compile_prefill: bool = True, pdl: bool | None = None,
                 reduce: bool | None = None, decode_attention: str | None = None,
                 embedding: torch.Tensor | None = None):
        """Wrap a TorchBackend built on CUDA in bf16 with linear_storage='packed' (see `from_bundle`); `compile`:
        True (the whole step as one graph; GEMMA4_COMPILE=regional makes it "regional"), "regional"
        (`compile_layers`: a graph per layer kind, compiled several times faster) or False (eager); `stack`:
        apply `stack_projections` (one GEMV for q/k/v, one for gate/up); `sdpa`: fused attention in prefill;
        `frag`: the tensor-core GEMV where the CUDA kernel builds (`use_frag_layout`); `compile_prefill`: batched
        prefill through torch.compile too (with `compile`); `pdl`: programmatic dependent launch for the GEMVs and
        inductor's kernels on Hopper+ (default: on, GEMMA4_PDL=0 turns it off); `reduce`: GEMVs add their K slices
        in-kernel (default: on with the CUDA kernel, GEMMA4_GEMV_REDUCE=0 turns it off); `decode_attention`:
        "stock" (model.py's attention in the decode step) or "triton" (`fused_decode_attention`, with `sdpa`;
        default: GEMMA4_DECODE_ATTENTION, else "triton"); `embedding`: the 16-bit token embedding where `inner` was
        built without it (`from_bundle` keeps it on the host, so the GPU never holds it beside the int4 head that
        usually replaces it)."""
        if decode_attention is None:
            decode_attention = os.environ.get("GEMMA4_DECODE_ATTENTION", "triton")
        if decode_attention not in DECODE_ATTENTION:
            raise Gemma4Error(f"unknown decode attention {decode_attention!r}: expected one of "
                              f"{', '.join(DECODE_ATTENTION)} (GEMMA4_DECODE_ATTENTION)")
        compile = _compile_mode(compile)
        if inner.device.type != "cuda" or inner.model.lm_head.storage != "packed":
            raise Gemma4Error("the fast path needs a CUDA torch backend with packed int4 linears")
        self.inner = inner
        self.model = self.inner.model
        ple_mode = inner.ple_mode
        self.config, self.max_context, self.ple_mode = self.inner.config, self.inner.max_context, ple_mode
        self.device, self.dtype = self.inner.device, self.inner.dtype
        for _, lin in self.model.q4_linears():
            lin.q4 = lin.q4.contiguous()
            lin.scale = lin.scale.contiguous()
        if stack:
            stack_projections(self.model)
        # Before tuning: the 16-bit table goes first, so tuning's temporary frag copies never coexist with it.
        self.embed_from_head = embed_from_head(self.model, table=embedding)
        if not self.embed_from_head and embedding is not None:  # not a QAT embedding: the table is needed
            self.model.embed_tokens = embedding.to(self.device)
        torch.cuda.empty_cache()
        t0 = time.perf_counter()
        frag = frag and inner.dtype == torch.bfloat16 and cuda_ext() is not None
        if reduce is None:
            reduce = os.environ.get("GEMMA4_GEMV_REDUCE", "1") != "0"
        self.reduce = bool(reduce and cuda_ext() is not None)
        self.pdl = set_pdl(os.environ.get("GEMMA4_PDL", "1") != "0" if pdl is None else pdl)
        self.gemv_cache = GemvTuningCache(_tuning_header(self.device, self.pdl))
        self.gemv_tuning = tune_gemv(self.model, inner.dtype, frag=frag, reduce=self.reduce,
                                     cache=self.gemv_cache.picks)
        self.gemv_cache.save()
        self.tune_s = time.perf_counter() - t0
        self.frag = any(r["layout"] == "frag" for r in self.gemv_tuning.values())
        torch.cuda.empty_cache()
        set_linear_fn(self.model, fast_linear)
        set_kv_write(self.model, scatter_kv_write)
        if sdpa:
            set_attention(self.model, DECODE_ATTENTION[decode_attention])
        self.decode_attention = decode_attention if sdpa else "stock"
        self.use_compile, self.use_graph = compile, cuda_graph
        dev = self.device
        self._ids = torch.zeros(1, 1, dtype=torch.long, device=dev)
        self._pos = torch.zeros((), dtype=torch.long, device=dev)
        cfg = self.config
        self._ple = (torch.zeros(1, 1, cfg.num_layers, cfg.ple_dim, dtype=torch.float32, device=dev)
                     if ple_mode == "provider" else None)
        self._ple_host = (torch.zeros(cfg.ple_width, dtype=torch.float32).pin_memory()
                          if ple_mode == "provider" else None)
        self._logits = torch.zeros(cfg.vocab_size, dtype=torch.float32, device=dev)
        self._tokens = torch.zeros(self.max_context + 1, dtype=torch.long, device=dev)
        self._graphs: dict[Any, torch.cuda.CUDAGraph] = {}  # decode: KV bucket; prefill: ("prefill", length, bucket)
        self._prefill_ids: dict[int, torch.Tensor] = {}  # padded prompt piece per graphed length
        self._settle: tuple[Q4Linear, torch.Tensor] | None = None  # `_settle_pdl`'s linear and input
        self._prefill_pos = torch.zeros((), dtype=torch.long, device=dev)
        self._prefill_last = torch.zeros((), dtype=torch.long, device=dev)
        # GEMMA4_PREFILL_GRAPHS=0: off (before `_settle_pdl`, decode after a graphed prefill ran 8.7% slower); also off
        # after a failed capture (`_capture`)
        self.prefill_graphs = (cuda_graph and ple_mode == "tbl"
                               and os.environ.get("GEMMA4_PREFILL_GRAPHS", "1") != "0")
        self._pool = None
        self._step_fn = self._step
        options = inductor_options(self.pdl)
        self.regional = compile == "regional"
        if self.regional:
            traced = compile_layers(self.model, options)
            self._step_fn = traced(self._step)
            self._prefill_fn = traced(self._prefill_step) if compile_prefill else None
        elif compile:
            self._step_fn = torch.compile(self._step, fullgraph=True, dynamic=True,
                                          options=inductor_options(self.pdl, decode=True))
            self._prefill_fn = (torch.compile(self._prefill_step, dynamic=True, options=options)
                                if compile_prefill else None)
        else:
            self._prefill_fn = None
        self._position = 0
        self.compile_s = 0.0

    @classmethod
    def from_bundle(cls, bundle: Any, *, max_context: int | None = None, ple_mode: str = "tbl",
                    device: str = "cuda", **kw: Any) -> FastCudaBackend:
        """Load a bundle onto the GPU in bf16 with packed int4 linears; `kw`: the switches of `__init__`. The 16-bit
        embedding stays on the host until `embed_from_head` has decided whether the int4 head replaces it."""
        if not torch.cuda.is_available():
            raise Gemma4Error("the fast path needs a CUDA GPU (use the stock torch backend on CPU)")
        weights = _BundleTensors(bundle)
        embedding = weights[EMBEDDING]
        inner = TorchBackend(bundle.config, _Without(weights, EMBEDDING, embedding[:0]), bundle.ple_table(),
                             bundle.ple_scale(), device=device, dtype=torch.bfloat16, ple_mode=ple_mode,
                             max_context=max_context or bundle.max_context, linear_storage="packed")
        return cls(inner, embedding=embedding, **kw)

    # -- the decode step (what the graph captures) and the batched prefill step --
    def _step(self, ids: torch.Tensor, pos: torch.Tensor, ple: torch.Tensor | None, kv_len: int) -> torch.Tensor:
        return self.model(ids, pos, ple, kv_len=kv_len)[0, -1]

    def _prefill_step(self, ids: torch.Tensor, pos: torch.Tensor, ple: torch.Tensor | None, kv_len: int,
                      last: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(ids, pos, ple, kv_len=kv_len, last_only=True, last_index=last)[0, -1]

    def _captured_step(self, kv_len: int) -> None:
        logits = self._step_fn(self._ids, self._pos, self._ple, kv_len)
        self._logits.copy_(logits)
        nxt = logits.argmax()
        self._tokens.index_copy_(0, self._pos.view(1), nxt.view(1))  # token chosen after position pos
        self._ids.copy_(nxt.view(1, 1))
        self._pos.add_(1)

    def _bucket(self, position: int) -> int:
        return min(self.max_context, (position // KV_BUCKET + 1) * KV_BUCKET)

    def _graph(self, kv_len: int) -> torch.cuda.CUDAGraph | None:
        """The decode step's graph for this KV-length bucket (captured on first use)."""
        if not self.use_graph:
            return None
        if kv_len not in self._graphs:
            saved_ids, saved_pos = self._ids.clone(), self._pos.clone()

            def rewind() -> None:  # the step advances the token and position; each warm-up starts from the same
                self._ids.copy_(saved_ids)
                self._pos.copy_(saved_pos)

            self._graphs[kv_len] = self._capture(lambda: self._captured_step(kv_len), "decode", rewind)
        return self._graphs[kv_len]

    def _capture(self, run: Callable[[], None], what: str,
                 rewind: Callable[[], None] | None = None) -> torch.cuda.CUDAGraph | None:
        """`run` (reading and writing only static buffers) as a CUDA graph in the shared pool, after three warm-up
        calls on a side stream (compile, autotune). A compiler failure there makes `what` ("decode" / "prefill")
        eager from then on; the decode step is then captured eagerly, the prefill not at all (None). A prefill
        that fails to capture turns prefill graphs off (None); it still runs compiled."""
        t0 = time.perf_counter()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        gave_up = False
        with torch.cuda.stream(s), torch.inference_mode():
            for _ in range(3):
                if rewind:
                    rewind()
                try:
                    run()
                except torch.OutOfMemoryError:
                    raise
                except Exception as e:  # noqa: BLE001 - a compiler failure must not lose the run
                    if what == "decode" and self._step_fn == self._step:  # (bound methods: ==, not is)
                        raise  # already eager: not the compiler's failure
                    warnings.warn(f"torch.compile failed ({error_line(e)}); running the {what} step eagerly",
                                  stacklevel=3)
                    self._give_up_compile(what)
                    if what == "prefill":
                        gave_up = True
                        break
        torch.cuda.current_stream().wait_stream(s)  # also after a failure: the eager rerun writes the same slots
        torch.cuda.synchronize()
        if gave_up:
            return None
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g, pool=self._pool), torch.inference_mode():
                run()
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - an op that cannot be captured must not lose the run
            if what == "decode":
                raise
            torch.cuda.synchronize()
            warnings.warn(f"capturing the prefill as a CUDA graph failed ({error_line(e)}); prefilling without "
                          "graphs", stacklevel=3)
            self.prefill_graphs = False
            return None
        torch.cuda.synchronize()
        if rewind:
            rewind()
        self.compile_s += time.perf_counter() - t0
        return g

    def gemv_report(self) -> list[dict[str, Any]]:
        """The GEMV kernel picked per weight shape at load (`tune_gemv`), for benchmark records."""
        from .kernels import GEMV_VARIANTS

        return [{"N": n, "K": k, "layout": r["layout"], "kernel": GEMV_VARIANTS[r["pick"][0]], "split": r["pick"][1],
                 "reduce": r["reduce"], "us": r["us"], "candidates": r["tried"], "cached": r["tried"] == 0}
                for (n, k), r in self.gemv_tuning.items()]

    def warm(self, positions: Sequence[int]) -> None:
        """Build (compile + capture) the graphs that decoding at these positions will use."""
        for p in positions:
            self._graph(self._bucket(p))

    # -- API --
    @property
    def position(self) -> int:
        return self._position

    def describe(self) -> str:
        compiled = "torch.compile per layer" if self.regional else "torch.compile"
        how = (f"{compiled} + CUDA graphs" if self.use_compile and self.use_graph else
               "CUDA graphs" if self.use_graph else compiled if self.use_compile else "eager")
        from .kernels import _CUDA

        gemv = ("CUDA C++ + tensor-core" if self.frag else "CUDA C++") if _CUDA["ext"] is not None else "Triton"
        extra = "".join((", in-kernel split-K sums" if self.reduce else "", ", PDL" if self.pdl else "",
                         ", Triton decode attention" if self.decode_attention == "triton" else "",
                         ", compiled prefill" if self._prefill_fn is not None else "",
                         f" (CUDA graphs up to {PREFILL_GRAPH_LENGTHS[-1]} tokens)"
                         if self._prefill_fn is not None and self.prefill_graphs else "",
                         ", embedding from the int4 head" if self.embed_from_head else ""))
        return f"fast cuda bf16 {self.ple_mode} ({gemv} int4 GEMV, {how}{extra}, max context {self.max_context})"

    def _give_up_compile(self, what: str) -> None:
        """After a compiler failure in `what` ("decode" or "prefill"), that one runs eagerly from now on; in regional
        mode both do, since they share the compiled layers."""
        if what == "decode" or self.regional:
            self._step_fn, self.use_compile = self._step, False
        if what == "prefill" or self.regional:
            self._prefill_fn = None
        if self.regional:
            uncompile_layers(self.model)

    def reset(self) -> None:
        self._position = 0
        self.inner.reset()

    def forward_all(self, ids: Sequence[int]) -> torch.Tensor:
        """Teacher-forced logits [S, V] (restarts; the batched prefill path)."""
        self._position = 0
        out = self.inner.forward_all(ids)  # many tokens: eager layers in regional mode too (TorchBackend._forward)
        self._position = self.inner.position
        return out

    def prefill(self, ids: Sequence[int]) -> torch.Tensor:
        """Batched prefill (dequantize + tensor-core GEMMs, SDPA attention), in chunks of PREFILL_CHUNK tokens;
        compiled (one dynamic-length graph, built on the first call) unless `compile_prefill` is off."""
        ids = list(ids)
        if not ids:
            raise Gemma4Error("need at least one token")
        for i in range(0, len(ids), PREFILL_CHUNK):
            logits = self._prefill_chunk(ids[i:i + PREFILL_CHUNK])
        return logits

    def _prefill_chunk(self, ids: list[int]) -> torch.Tensor:
        if len(ids) == 1:  # one token: the decode graph (a one-token prefill would be a second compile)
            return self.decode(ids[0])
        b = self.inner
        b._position = start = self._position
        ids = b._check(ids)
        logits = self._prefill_graphed(ids, start) if self._prefill_fn is not None else None
        if logits is None and self._prefill_fn is not None:
            x = torch.tensor([ids], dtype=torch.long).to(self.device, non_blocking=True)
            pos = torch.tensor(start, dtype=torch.long).to(self.device, non_blocking=True)
            last = torch.tensor(len(ids) - 1, dtype=torch.long).to(self.device, non_blocking=True)
            with torch.inference_mode():
                try:  # `last` as in the graphs, so that one compiled prefill serves both
                    logits = self._prefill_fn(x, pos, b._ple_rows(ids), start + len(ids), last)
                except torch.OutOfMemoryError:
                    raise
                except Exception as e:  # noqa: BLE001 - a compiler failure must not lose the run
                    warnings.warn(f"torch.compile of the prefill failed ({error_line(e)}); prefilling eagerly",
                                  stacklevel=3)
                    self._give_up_compile("prefill")
        if logits is None:
            logits = b.prefill(ids)  # eager layers in regional mode too (TorchBackend._forward)
        self._position = start + len(ids)
        return logits

    def _prefill_graphed(self, ids: list[int], start: int) -> torch.Tensor | None:
        """Prefill a piece of at most PREFILL_GRAPH_LENGTHS[-1] tokens by replaying the graph of the next length up
        (tbl mode, compiled prefill, room in the cache for the padding); None where none applies. The padding
        (token 0) is attended by nothing real: its K/V goes to later cache slots, which the next step overwrites
        before reading, and the logits are those of the last real token (`last_index`)."""
        length = next((n for n in PREFILL_GRAPH_LENGTHS if n >= len(ids)), None)
        if not self.prefill_graphs or length is None or start + length > self.max_context:
            return None
        kv_len = self._bucket(start + length - 1)
        buf = self._prefill_ids.get(length)
        if buf is None:
            buf = self._prefill_ids[length] = torch.zeros(1, length, dtype=torch.long, device=self.device)
        buf.copy_(torch.tensor([ids + [0] * (length - len(ids))], dtype=torch.long))
        self._prefill_pos.fill_(start)
        self._prefill_last.fill_(len(ids) - 1)
        key = ("prefill", length, kv_len)
        if key not in self._graphs:
            def run() -> None:
                self._logits.copy_(self._prefill_fn(buf, self._prefill_pos, None, kv_len, self._prefill_last))

            g = self._capture(run, "prefill")
            if g is None:
                return None
            self._graphs[key] = g
        self._graphs[key].replay()
        self._settle_pdl()
        return self._logits.clone()

    def _settle_pdl(self) -> None:
        """A few GEMVs of the smallest linear, launched directly, after a prefill graph. Without them every later
        decode step gets less PDL overlap: the tiny model decodes at 0.195 against 0.171 ms/token, E4B at 2.694
        against 2.491 (RESULTS.md, session 12). It is a device state that only direct PDL launches reset: one was
        enough on the tiny model, E4B needs 4. Each costs a few microseconds; the output is discarded."""
        if not self.pdl:
            return
        if self._settle is None:
            lin = min((m for _, m in self.model.q4_linears()), key=lambda m: m.q4.numel())
            self._settle = (lin, torch.zeros(1, lin.in_features, dtype=self.dtype, device=self.device))
        with torch.inference_mode():
            for _ in range(SETTLE_LAUNCHES):
                fast_linear(*self._settle)

    def _set_ple(self, token: int) -> None:
        if self._ple is None:
            return
        b = self.inner
        if isinstance(b._ple_table, torch.Tensor):
            row = dequantize_ple(b._ple_table[token].unsqueeze(0), b._ple_scale[token].view(1), self.config.ple_dim)
        else:
            row = dequantize_ple(torch.from_numpy(np.asarray(b._ple_table[token:token + 1])),
                                 torch.from_numpy(np.asarray(b._ple_scale[token:token + 1], dtype=np.float32)),
                                 self.config.ple_dim)
        self._ple_host.copy_(row.view(-1))
        self._ple.view(-1).copy_(self._ple_host, non_blocking=True)

    def _run_step(self, position: int) -> None:
        kv_len = self._bucket(position)
        g = self._graph(kv_len)
        if g is None:
            with torch.inference_mode():
                self._captured_step(kv_len)
        else:
            g.replay()

    def decode(self, token_id: int) -> torch.Tensor:
        """Append one token; fp32 logits [V] (a copy)."""
        if not 0 <= token_id < self.config.vocab_size:
            raise Gemma4Error(f"token id {token_id} is out of range for vocab size {self.config.vocab_size}")
        if self._position + 1 > self.max_context:
            raise Gemma4Error(f"sequence exceeds the max context of {self.max_context} tokens")
        self._ids.fill_(token_id)
        self._pos.fill_(self._position)
        self._set_ple(token_id)
        self._run_step(self._position)
        self._position += 1
        return self._logits.clone()

    def greedy(self, first_token: int, n: int) -> list[int]:
        """Feed `first_token`, then keep feeding the argmax: n steps, one host sync at the end (tbl mode).

        Returns the n tokens chosen (the argmax after each step)."""
        if self._position + n > self.max_context:
            raise Gemma4Error(f"sequence exceeds the max context of {self.max_context} tokens")
        start = self._position
        self._ids.fill_(first_token)
        self._pos.fill_(start)
        for i in range(n):
            if self._ple is not None:  # provider mode: the host needs each token to gather its row
                self._set_ple(int(self._ids.item()))
            self._run_step(start + i)
        self._position = start + n
        return self._tokens[start:start + n].tolist()


def gemv_microbench(shapes: Sequence[tuple[int, int]], iters: int = 200, seed: int = 0) -> list[dict[str, Any]]:
    """Every GEMV kernel variant and K split at the given [N, K] shapes against the stock paths (CUDA graphs,
    rotating weight sets so L2 never holds them; bf16 x, fp16 scales). One row per shape: microseconds per call
    for each (variant, split), the best of each variant, and its error against the fp64 product."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [_microbench_shape(n, k, g, iters) for n, k in shapes]


def _microbench_shape(n: int, k: int, g: torch.Generator, iters: int) -> dict[str, Any]:
    from .kernels import GEMV_VARIANTS, q4_dequant_ref, q4_gemv_partials

    dev = torch.device("cuda")
    sets = max(2, math.ceil(200e6 / (n * k * 0.5625)))  # > L2 (50-60 MB) in total
    ws = []
    for _ in range(sets):
        q4 = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g).to(dev)
        sc = ((torch.rand(n, k // 32, generator=g) + 0.5) * 0.01).half().to(dev)
        ws.append((q4, sc))
    frag = [to_frag_layout(*w) for w in ws] if frag_ok(n, k) and cuda_ext() is not None else None
    x = torch.randn(1, k, generator=g).bfloat16().to(dev)
    ref = (x.double() @ q4_dequant_ref(*ws[0]).double().t())[0]
    nbytes = n * k // 2 + ws[0][1].numel() * ws[0][1].element_size() + 2 * (k + n)
    reps = max(1, iters // sets)

    def timed(fn, sets=sets, reps=reps):
        return _graph_us([lambda i=i: fn(i) for i in range(sets)] * reps)

    row: dict[str, Any] = {"N": n, "K": k, "bytes": nbytes, "variants": {}, "rel_err": {}}
    impls = list(GEMV_VARIANTS) if cuda_ext() is not None else [0]
    for v in impls:
        frag_v = v in FRAG_VARIANTS
        if frag_v and frag is None:
            continue
        wv = frag if frag_v else ws
        got = q4_gemv_partials(x, *wv[0], default_gemv(n, k, "frag" if frag_v else "packed")[1],
                               variant=v).sum(0).double()
        if GEMV_VARIANTS[v].startswith("read-only"):
            row["rel_err"][v] = None
        else:
            row["rel_err"][v] = float((got - ref).norm() / ref.norm())
        per_split = {sp: timed(lambda i, v=v, sp=sp, wv=wv: q4_gemv_partials(x, *wv[i % len(wv)], sp, variant=v))
                     for sp in sorted({1, 2, 3, 4, 6, 8, 12, 16, default_gemv(n, k, "packed")[1]})
                     if split_ok(k, sp, v) and (sp <= 8 or frag_v or sp == default_gemv(n, k, "packed")[1])}
        row["variants"][v] = per_split
    best = {v: min(ps.values()) for v, ps in row["variants"].items()}
    row["best_us"] = best
    row["default_us"] = row["variants"][0].get(gemv_split(n, k)) if 0 in row["variants"] else None
    row["triton_us"] = timed(lambda i: q4_gemv_partials(x, *ws[i % sets], impl="triton"))
    try:  # stock int4 kernel (tinygemm, bf16 scales: not exact, timing only)
        from .model import unpack_int4

        q = unpack_int4(ws[0][0].cpu()).int() + 8
        packed = torch.ops.aten._convert_weight_to_int4pack(
            (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8).to(dev), 8)
        sz = torch.stack((ws[0][1].t().bfloat16(), torch.zeros_like(ws[0][1].t().bfloat16())), -1).contiguous()
        row["tinygemm_us"] = timed(lambda i: torch.ops.aten._weight_int4pack_mm(x, packed, 32, sz))
    except Exception as e:  # noqa: BLE001 - optional comparison
        row["tinygemm_us"] = None
        row["tinygemm_error"] = str(e).splitlines()[0][:120]
    wd = q4_dequant_ref(*ws[0]).bfloat16()
    row["bf16_cublas_us"] = timed(lambda i: F.linear(x, wd))
    return row


def copy_bandwidth(device: torch.device | str, nbytes: int = 1 << 30, reps: int = 10) -> float:
    """Measured copy bandwidth in bytes/s (bytes read + bytes written over the median time of a large copy)."""
    device = torch.device(device)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    times = []
    for i in range(reps + 2):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dst.copy_(src)
            b.record()
            b.synchronize()
            t = a.elapsed_time(b) / 1e3
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            t = time.perf_counter() - t0
        if i >= 2:
            times.append(t)
    return 2 * src.numel() * 4 / float(np.median(times))
