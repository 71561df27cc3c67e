"""Backends: run a bundle's decoder behind one small API (`prefill`, `decode`, `forward_all`, `reset`).

`TorchBackend` runs `model.Gemma4Model` eagerly on CPU or CUDA. In provider mode the host gathers each step's
PLE rows from the bundle's int8 memmap (only the rows of the step's tokens are read); in tbl mode the table is
a resident buffer gathered in-graph.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import ModelConfig
from .errors import Gemma4Error
from .model import LINEAR_STORAGE, PLE_MODES, Gemma4Model, dequantize_ple, gather_ple_rows

BACKENDS = ("torch", "fast", "coreai")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
DEFAULT_MAX_CONTEXT = 4096
# How Q4Linear computes its product. "stock": model.dequant_linear (the default, reference numerics).
# "cpu-int4": the native AVX2 kernel (cpu_kernels.py) with q8_0-quantized activations (approximate, like
# llama.cpp); "cpu-int4-f32": the same kernel with fp32 activations. Both are CPU-only and opt-in.
LINEAR_STRATEGIES = ("stock", "cpu-int4", "cpu-int4-f32")
# inductor options of the compiled CPU decode step (TorchBackend(compile=True)): no per-call size/alignment
# asserts on the ~1000 inputs (~1.3 ms of an E4B step; benchmarks/NOTES.md).
CPU_COMPILE_OPTIONS = {"size_asserts": False, "alignment_asserts": False}
# Dequantize every linear once (fast) while the dense copy fits this budget; beyond it keep packed int4.
DENSE_BUDGET_BYTES = {"cpu": 4 << 30, "cuda": 24 << 30}


# While dynamo traces a compiled layer: its integer attributes (the KV slot) symbolic, so that the layers of one
# kind share a graph; room for a graph per layer kind and per one-token / many-token call.
_REGIONAL_DYNAMO = {"allow_unspec_int_on_nn_module": True, "recompile_limit": 64, "cache_size_limit": 64}


def _compile_mode(compile: bool | str) -> bool | str:
    """True / False / "regional"; True becomes what GEMMA4_COMPILE says when it is set."""
    if compile is True and os.environ.get("GEMMA4_COMPILE"):
        compile = os.environ["GEMMA4_COMPILE"]
    if compile not in (True, False, "regional"):
        raise Gemma4Error(f"unknown compile mode {compile!r}: expected True, False or 'regional' "
                          "(GEMMA4_COMPILE=regional)")
    return compile


def error_line(e: BaseException) -> str:
    """An exception as one short line for a warning: its type and the first line of its message."""
    msg = str(e).strip()
    return f"{type(e).__name__}: {msg.splitlines()[0][:200]}" if msg else type(e).__name__


def compile_layers(model: Gemma4Model, options: dict[str, Any] | None = None) -> Any:
    """Regional compilation: every decoder layer through torch.compile instead of the whole step as one graph.
    The layers of one kind (sliding or full attention, own or shared KV cache) share a graph, one for one-token
    calls and one for many, so E4B compiles ~8 small graphs instead of one of 42 layers (on CPU 36 s instead of
    227 s; NOTES.md). Fusion across a layer boundary is given up. Returns `traced(fn)`: wraps the functions that
    call the model, because dynamo must see the layers' integer attributes as symbolic while it traces them."""
    for layer in model.layers:
        layer.compile(fullgraph=True, dynamic=True, options=options)
    patch = {k: v for k, v in _REGIONAL_DYNAMO.items() if hasattr(torch._dynamo.config, k)}

    def traced(fn: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            with torch._dynamo.config.patch(**patch):
                return fn(*args, **kwargs)

        return run

    return traced


def uncompile_layers(model: Gemma4Model) -> None:
    """Undo `compile_layers` (the eager fallback after a compiler failure)."""
    for layer in model.layers:
        layer._compiled_call_impl = None


def resolve_device(device: str | torch.device) -> torch.device:
    """'cpu', 'cuda' or 'cuda:N' -> torch.device, with one clear line when it cannot be used."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise Gemma4Error(f"unknown device {str(device)!r}: expected cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise Gemma4Error(f"device {str(device)!r} requested but no CUDA GPU is available "
                              f"(torch {torch.__version__})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise Gemma4Error(f"device {str(device)!r} requested but only {torch.cuda.device_count()} CUDA "
                              f"GPU(s) are visible")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None -> fp32 on CPU (reference-exact), bf16 on CUDA. fp16 is CUDA-only."""
    if dtype is None:
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if isinstance(dtype, str):
        if dtype.lower() not in DTYPES:
            raise Gemma4Error(f"unknown dtype {dtype!r}: expected fp32, bf16 or fp16")
        dtype = DTYPES[dtype.lower()]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise Gemma4Error(f"unsupported dtype {dtype}: expected fp32, bf16 or fp16")
    if dtype == torch.float16 and device.type != "cuda":
        raise Gemma4Error("dtype fp16 is supported on CUDA only: use fp32 or bf16 on CPU")
    return dtype


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def _auto_storage(cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> str:
    params = sum(o * i for o, i in cfg.linear_shapes().values()) + cfg.vocab_size * cfg.hidden_size
    dense = params * torch.finfo(dtype).bits // 8
    return "dense" if dense <= DENSE_BUDGET_BYTES[device.type] else "packed"


def _as_torch(a: Any) -> torch.Tensor:
    """numpy (a read-only memmap included: shared, not copied) or torch -> torch."""
    if isinstance(a, torch.Tensor):
        return a
    with warnings.catch_warnings():  # torch warns that a read-only memmap is not writable; we never write it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(a))


def check_ids(ids: Sequence[int], vocab_size: int, position: int, max_context: int, hint: str = "") -> list[int]:
    """Tokens about to be appended at `position`, checked whole before any runs (every backend's contract):
    at least one, each below `vocab_size`, the sequence within `max_context`. Returns them as ints."""
    ids = [int(t) for t in ids]
    if not ids:
        raise Gemma4Error("need at least one token")
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise Gemma4Error(f"token id {bad} is out of range for vocab size {vocab_size}")
    end = position + len(ids)
    if end > max_context:
        raise Gemma4Error(f"sequence of {end} tokens exceeds the max context of {max_context} tokens{hint}")
    return ids


class TorchBackend:
    """The decoder on CPU or CUDA. Logits come back as fp32 tensors on the backend's device.

    A sequence grows through `prefill` (any number of tokens, one batched forward) and `decode` (one token);
    `reset()` starts a new one. `forward_all(ids)` restarts and returns teacher-forced logits for every
    position (verify)."""

    name = "torch"

    def __init__(self, cfg: ModelConfig, weights: Mapping[str, torch.Tensor], ple_table: Any, ple_scale: Any, *,
                 device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
                 ple_mode: str | None = None, max_context: int | None = None, linear_storage: str | None = None,
                 linear_strategy: str | None = None, compile: bool | str = False,
                 weight_grid: torch.dtype | None = None):
        """`weight_grid`: the source checkpoint's dtype, which the linears dequantize through (`from_bundle` passes
        the bundle's `source_dtype`; see `Q4Linear.grid`). `compile`: run one-token decode steps through
        `torch.compile` (cpu-int4 strategies): True compiles the whole step (`_compile_decode`;
        GEMMA4_COMPILE=regional makes it "regional"), "regional" each layer (`compile_layers`: ~6x less compile
        time, a slower step on CPU)."""
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        strategy = linear_strategy or "stock"
        if strategy not in LINEAR_STRATEGIES:
            raise Gemma4Error(f"unknown linear strategy {strategy!r}: expected one of {', '.join(LINEAR_STRATEGIES)}")
        compile = _compile_mode(compile)
        if compile and strategy == "stock":  # the compiled step is built (and tested) around the native kernel
            raise Gemma4Error("compile needs a cpu-int4 linear strategy (--linear cpu-int4 or cpu-int4-f32; the CUDA "
                              "fast engine compiles on its own)")
        if strategy != "stock":
            from . import cpu_kernels

            if self.device.type != "cpu":
                raise Gemma4Error(f"linear strategy {strategy!r} is CPU-only (device is {self.device})")
            if cpu_kernels.load() is None:  # one warning already given: keep the stock path, eager
                strategy, compile = "stock", False
            elif linear_storage not in (None, "packed"):
                raise Gemma4Error(f"linear strategy {strategy!r} reads packed int4 weights: linear storage "
                                  f"{linear_storage!r} is not supported with it")
            else:
                linear_storage = "packed"
        self.linear_strategy = strategy
        self.ple_mode = ple_mode or ("provider" if self.device.type == "cpu" else "tbl")
        if self.ple_mode not in PLE_MODES:
            raise Gemma4Error(f"unknown ple_mode {self.ple_mode!r}: expected one of {', '.join(PLE_MODES)}")
        storage = linear_storage or _auto_storage(cfg, self.dtype, self.device)
        if storage not in LINEAR_STORAGE:
            raise Gemma4Error(f"unknown linear storage {storage!r}: expected one of {', '.join(LINEAR_STORAGE)}")
        max_context = int(max_context or min(DEFAULT_MAX_CONTEXT, cfg.max_position_embeddings))
        if not 1 <= max_context <= cfg.max_position_embeddings:
            raise Gemma4Error(f"max context {max_context} is out of range: the model supports 1 to "
                              f"{cfg.max_position_embeddings} tokens")
        self.config, self.max_context, self.vocab_size = cfg, max_context, cfg.vocab_size
        # Provider mode keeps the table where it lives (the bundle's memmap) and reads rows per step.
        self._ple_table, self._ple_scale = ple_table, ple_scale
        tbl = self.ple_mode == "tbl"
        with torch.inference_mode(False), torch.no_grad():
            self.model = Gemma4Model(
                cfg, weights, dtype=self.dtype, ple_mode=self.ple_mode, max_context=max_context,
                linear_storage=storage, device=self.device, weight_grid=weight_grid,
                ple_table=_as_torch(ple_table) if tbl else None, ple_scale=_as_torch(ple_scale) if tbl else None)
        self.model.eval()
        if strategy != "stock":
            from . import cpu_kernels
            from .fast import stack_projections

            stack_projections(self.model)  # one product for q/k/v and one for gate/up (exact: rows are independent)
            cpu_kernels.install(self.model, "f32" if strategy == "cpu-int4-f32" else "q8")
        self._position = 0
        self.compile_s = 0.0  # seconds spent in `warm` (compiling the decode step), outside bench timings
        self.regional = compile == "regional"
        self._step = (self._compile_regional() if self.regional else self._compile_decode()) if compile else None

    @classmethod
    def from_bundle(cls, bundle: Any, **kw: Any) -> TorchBackend:
        """From an opened bundle (duck-typed: .config .tensor(name) .ple_table() .ple_scale() .max_context)."""
        if kw.get("max_context") is None:
            kw["max_context"] = bundle.max_context
        kw.setdefault("weight_grid", getattr(bundle, "source_dtype", None))
        return cls(bundle.config, _BundleTensors(bundle), bundle.ple_table(), bundle.ple_scale(), **kw)

    def _compile_regional(self):
        """The one-token step with every layer compiled on its own (`compile_layers`, CPU options), the KV write in
        place as in `_compile_decode`. Many-token calls run the layers eagerly (`_forward`)."""
        from .fast import scatter_kv_write
        from .model import set_kv_write

        set_kv_write(self.model, scatter_kv_write)
        model = self.model
        return compile_layers(model, dict(CPU_COMPILE_OPTIONS))(
            lambda ids, pos, ple, kv_len: model(ids, pos, ple, kv_len=kv_len))

    def _compile_decode(self):
        """The one-token step `model(ids, pos, ple, kv_len=n)` compiled whole by inductor's C++ backend (kv_len
        dynamic; the native int4 kernel stays an opaque op, `torch.ops.gemma4_cpu.q4_mm`) with the fast path's
        in-place KV write. Per-call overhead trimmed (benchmarks/NOTES.md, E4B): the model's tensors go in as
        arguments (`functional_call`; views, i.e. the parts of stacked projections, left out) instead of being read
        off the module tree (-3 ms), and where torch has `aot_compile` the step is compiled once ahead of time and
        called without dynamo's guard evaluation over its ~800 inputs (-3.5 ms). That is safe because every call
        passes the same tensors and input kinds: only kv_len changes, and it is symbolic in the graph. Compiled on
        the first decode step (see `warm`); the tensors are bound now, so buffers must be updated in place
        afterwards (as `reset_cache` does)."""
        from .fast import scatter_kv_write
        from .model import set_kv_write

        set_kv_write(self.model, scatter_kv_write)  # eager-identical; stays in place under inductor
        model = self.model
        names, tensors = zip(*((n, t) for n, t in model.named_buffers() if t._base is None), strict=True)

        def step(ids: torch.Tensor, pos: torch.Tensor, ple: torch.Tensor | None, kv_len: int, *ts: torch.Tensor):
            state = dict(zip(names, ts, strict=True))
            return torch.func.functional_call(model, state, (ids, pos, ple), {"kv_len": kv_len})

        compiled = torch.compile(step, fullgraph=True, dynamic=True, options=dict(CPU_COMPILE_OPTIONS))
        ready = None

        def run(ids: torch.Tensor, pos: torch.Tensor, ple: torch.Tensor | None, kv_len: int) -> torch.Tensor:
            nonlocal ready
            args = (ids, pos, ple, kv_len, *tensors)
            if ready is None:  # first call: compile for these inputs, of which only kv_len ever changes (symbolic)
                ready = compiled
                if hasattr(compiled, "aot_compile"):  # newer torch (2.13 here): no per-call guard evaluation
                    try:
                        ready = compiled.aot_compile((args, {}))
                        ready.disable_guard_check()
                    except Exception:  # noqa: BLE001 - e.g. inductor caches disabled: the plain compiled step
                        ready = compiled
            return ready(*args)

        return run

    def warm(self, positions: Sequence[int]) -> None:
        """Compile the decode step before timing: one step at each position (its KV entry is rewritten by the real
        step at that position before anything reads it; the sequence position is unchanged)."""
        if self._step is None:
            return
        t0, saved = time.perf_counter(), self._position
        for p in positions:
            if p < self.max_context:
                self._position = p
                self.decode(0)
        self._position = saved
        self.compile_s += time.perf_counter() - t0

    @property
    def position(self) -> int:
        """Tokens in the current sequence (the position the next token will take)."""
        return self._position

    def describe(self) -> str:
        kern = "" if self.linear_strategy == "stock" else f" via {self.linear_strategy}"
        how = (", compiled decode" + (" (per layer)" if self.regional else "")) if self._step is not None else ""
        return (f"torch {self.device.type} {_dtype_name(self.dtype)} {self.ple_mode} "
                f"(linears {self.model.lm_head.storage}{kern}{how}, max context {self.max_context})")

    def reset(self) -> None:
        self._position = 0

    def prefill(self, ids: Sequence[int]) -> torch.Tensor:
        """Append `ids` in one batched forward; fp32 logits [V] of the last position."""
        return self._forward(ids, last_only=True)[-1]

    def decode(self, token_id: int) -> torch.Tensor:
        """Append one token; fp32 logits [V]."""
        return self._forward([token_id], last_only=True)[-1]

    def forward_all(self, ids: Sequence[int]) -> torch.Tensor:
        """Restart with `ids` (teacher forcing): fp32 logits [S, V], row j predicting token j+1."""
        self.reset()
        return self._forward(ids, last_only=False)

    def _check(self, ids: Sequence[int]) -> list[int]:
        return check_ids(ids, self.vocab_size, self._position, self.max_context)

    def _ple_rows(self, ids: list[int]) -> torch.Tensor | None:
        if self.ple_mode == "tbl":
            return None
        cfg = self.config
        if isinstance(self._ple_table, torch.Tensor):
            rows = gather_ple_rows(self._ple_table, self._ple_scale, torch.tensor(ids), cfg.ple_dim)
        else:  # numpy memmap: fancy indexing reads just these rows
            idx = np.asarray(ids)
            rows = dequantize_ple(torch.from_numpy(np.asarray(self._ple_table[idx])),
                                  torch.from_numpy(np.asarray(self._ple_scale[idx], dtype=np.float32)), cfg.ple_dim)
        return rows.view(1, len(ids), cfg.num_layers, cfg.ple_dim).to(self.device, non_blocking=True)

    @torch.inference_mode()
    def _forward(self, ids: Sequence[int], last_only: bool) -> torch.Tensor:
        ids = self._check(ids)
        start = self._position
        x = torch.tensor([ids], dtype=torch.long).to(self.device, non_blocking=True)
        pos = torch.tensor(start, dtype=torch.long).to(self.device, non_blocking=True)
        if self._step is not None and len(ids) == 1:
            logits = self._compiled_step(x, pos, self._ple_rows(ids), start + 1)
        else:
            # many tokens run eagerly, also where the layers are compiled (regional mode: their one-token graphs only;
            # the fast path's eager prefill and verify come through here too)
            with torch.compiler.set_stance("force_eager"):
                logits = self.model(x, pos, self._ple_rows(ids), kv_len=start + len(ids), last_only=last_only)
        self._position = start + len(ids)
        return logits[0]

    def _compiled_step(self, x: torch.Tensor, pos: torch.Tensor, ple: torch.Tensor | None, kv_len: int):
        """The compiled one-token step; if compiling fails, decode eagerly from then on (one warning)."""
        try:
            return self._step(x, pos, ple, kv_len)
        except Exception as e:  # noqa: BLE001 - a compiler failure must not lose the run
            warnings.warn(f"gemma4-coreai: torch.compile of the decode step failed ({error_line(e)}); "
                          f"decoding eagerly", RuntimeWarning, stacklevel=3)
            self._step = None
            uncompile_layers(self.model)
            return self.model(x, pos, ple, kv_len=kv_len)


class _BundleTensors:
    """A bundle's weights.safetensors read by name, lazily (all the model needs of its `weights` mapping)."""

    def __init__(self, bundle: Any):
        self._bundle = bundle

    def __getitem__(self, key: str) -> torch.Tensor:
        return _as_torch(self._bundle.tensor(key))


def load_backend(bundle: Any, backend: str = "torch", *, export: str | Path | None = None, **kw: Any):
    """A backend by name for an opened bundle. torch kw: device, dtype, ple_mode, max_context, linear_storage,
    linear_strategy.
    fast: the CUDA fast path (fast.FastCudaBackend: bf16, int4 GEMV kernels, compiled + CUDA-graph decode); kw:
    device (cuda), dtype (bf16), ple_mode, max_context.
    coreai: `export` is the export-coreai output (OUT or OUT/gpu-pipelined/<name>); kw: ple_mode."""
    if backend not in BACKENDS:
        raise Gemma4Error(f"unknown backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "fast":
        if kw.get("device") not in (None, "cuda") and not str(kw.get("device")).startswith("cuda"):
            raise Gemma4Error(f"--backend fast runs on CUDA only (got --device {kw['device']}); on CPU use --backend "
                              "torch (optionally --linear cpu-int4)")
        if kw.get("dtype") not in (None, "bf16", torch.bfloat16):
            raise Gemma4Error(f"--backend fast computes in bf16 (got --dtype {kw['dtype']})")
        if kw.get("linear_strategy") not in (None, "stock"):
            raise Gemma4Error(f"--linear {kw['linear_strategy']} is a CPU strategy; --backend fast has its own kernels")
        from .fast import FastCudaBackend

        return FastCudaBackend.from_bundle(bundle, max_context=kw.get("max_context"),
                                           ple_mode=kw.get("ple_mode") or "tbl", device=kw.get("device") or "cuda")
    if backend == "coreai":
        from .coreai_backend import CoreAIBackend

        if export is None:
            raise Gemma4Error("--backend coreai needs --export OUT (a directory written by export-coreai)")
        if kw.get("device") not in (None, "cpu"):
            raise Gemma4Error(f"--backend coreai picks its own compute unit; --device {kw['device']} is torch-only")
        return CoreAIBackend(export, mode=kw.get("ple_mode"), tables=Path(bundle.path))
    return TorchBackend.from_bundle(bundle, **kw)
