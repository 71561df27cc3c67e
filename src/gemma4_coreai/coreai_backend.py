"""Core AI backend: runs an exported `.aimodel` decode graph on the Core AI runtime behind the backend API.

`coreai.runtime` picks the engine: the OS Core AI framework on macOS 27+, the in-package reference runtime
elsewhere (Linux: a slow, single-threaded interpreter, for correctness checks). The graph is static S=1, so a
prefill is S=1 steps over the prompt. The KV cache is the graph's two states, one runtime NDArray each, updated
in place by every call and replaced by fresh zero arrays on `reset()`.

PLE: provider graphs get each token's row from the gather_raw tables (an int8 memmap: one row read per token);
tbl graphs get the whole table bound once as an input and gather it themselves.

The runtime is async only; one private event loop, on its own thread, drives it from sync code (so the backend
also works where the caller's thread already runs a loop: Jupyter, async servers). Runtime faults may abort the
process (Swift fatal errors are not Python exceptions): validate unknown graphs in a subprocess.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .backends import check_ids
from .checkpoint import read_json, sha256_file
from .errors import Gemma4Error
from .export_coreai import require_coreai
from .model import dequantize_ple


def resolve_model_dir(path: str | Path, mode: str | None = None) -> Path:
    """OUT/gpu-pipelined/<name> from itself, from its .aimodel, or from an export dir OUT (picking `mode`, else
    provider when both were exported)."""
    p = Path(path)
    if p.suffix == ".aimodel":
        p = p.parent
    if (p / "metadata.json").is_file() and not (p / "gpu-pipelined").is_dir():
        found_mode = read_metadata(p / "metadata.json")["gemma4"]["ple_mode"]
        if mode is not None and found_mode != mode:
            raise Gemma4Error(f"{p}: a {found_mode}-mode export, not {mode} (name the {mode}-mode model, or the "
                              "export directory holding both)")
        return p
    root = p / "gpu-pipelined"
    if not root.is_dir():
        raise Gemma4Error(f"{p}: not a Core AI export (no gpu-pipelined/ or metadata.json); run export-coreai")
    found = {}
    for d in sorted(root.iterdir()):
        if (d / "metadata.json").is_file():
            found[read_metadata(d / "metadata.json")["gemma4"]["ple_mode"]] = d
    if not found:
        raise Gemma4Error(f"{root}: holds no exported model")
    if mode is not None:
        if mode not in found:
            raise Gemma4Error(f"{root}: no {mode}-mode model (found: {', '.join(sorted(map(str, found)))})")
        return found[mode]
    return found.get("provider") or next(iter(found.values()))


# metadata.json fields the backend reads: (section, key) -> a check of the value
_METADATA_FIELDS = {("gemma4", "ple_mode"): lambda v: v in ("provider", "tbl"),
                    ("gemma4", "num_layers"): lambda v: isinstance(v, int) and v > 0,
                    ("gemma4", "ple_dim"): lambda v: isinstance(v, int) and v > 0,
                    ("gemma4", "states"): lambda v: isinstance(v, dict) and set(v) == {"k_cache", "v_cache"},
                    ("gemma4", "ple_tables"): lambda v: isinstance(v, str),
                    ("language", "max_context_length"): lambda v: isinstance(v, int) and v > 0,
                    ("language", "vocab_size"): lambda v: isinstance(v, int) and v > 0,
                    ("assets", "main"): lambda v: isinstance(v, str) and v.endswith(".aimodel")}


def read_metadata(path: Path) -> dict[str, Any]:
    """An export's metadata.json with the fields this backend reads checked; one-line Gemma4Error otherwise."""
    meta = read_json(path)
    if not isinstance(meta, dict) or not isinstance(meta.get("gemma4"), dict):
        raise Gemma4Error(f"{path}: no 'gemma4' section (not exported by this tool)")
    for (section, key), ok in _METADATA_FIELDS.items():
        part = meta.get(section)
        v = part.get(key) if isinstance(part, dict) else None
        if not ok(v):
            raise Gemma4Error(f"{path}: field '{section}.{key}' is {v!r}, not what export-coreai writes")
    for name, spec in meta["gemma4"]["states"].items():  # [slots, 1, kv heads, max context, head dim], fp16/fp32
        shape = spec.get("shape") if isinstance(spec, dict) else None
        if not (isinstance(shape, list) and len(shape) == 5 and all(isinstance(n, int) and n > 0 for n in shape)
                and shape[3] == meta["language"]["max_context_length"]
                and spec.get("dtype") in ("float16", "float32")):
            raise Gemma4Error(f"{path}: field 'gemma4.states.{name}' is {spec!r}, not what export-coreai writes")
    return meta


def check_graph(aimodel: Path) -> None:
    """main.mlirb against main.hash (its sha256, written by the exporter): a damaged graph is refused here
    rather than crashing the runtime's parser (it aborts the process)."""
    graph, digest = aimodel / "main.mlirb", aimodel / "main.hash"
    if not graph.is_file():
        raise Gemma4Error(f"{graph}: missing (re-run export-coreai)")
    if digest.is_file() and bytes.fromhex(sha256_file(graph)) != digest.read_bytes():
        raise Gemma4Error(f"{graph}: does not match main.hash (truncated or damaged; re-run export-coreai)")


class _SyncFunction:
    """An event loop on a thread of its own, kept alive so sync code can await the runtime's async load and calls,
    whether or not the calling thread runs a loop already."""

    def __init__(self, aimodel: Path):
        from coreai.authoring import AIModelAsset

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="coreai-runtime", daemon=True)
        self._thread.start()
        self._cm = AIModelAsset.load(aimodel).executable()  # compiles for this machine (ODIX on Linux) + loads
        try:
            self._model = self._run(self._cm.__aenter__())
            self.fn = self._model.load_function("main")
        except BaseException:
            self._stop()
            raise

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __call__(self, inputs: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
        return self._run(self.fn(inputs=inputs, state=state))

    def _stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def close(self) -> None:
        if not self._loop.is_closed():
            try:
                self._run(self._cm.__aexit__(None, None, None))
            finally:
                self._stop()


class CoreAIBackend:
    """An exported decode graph on the Core AI runtime. Logits come back as fp32 CPU tensors [V]."""

    name = "coreai"

    def __init__(self, path: str | Path, *, mode: str | None = None, tables: str | Path | None = None):
        """`path`: an export dir OUT, OUT/gpu-pipelined/<name> or its .aimodel. `mode` picks provider/tbl in an
        export holding both. `tables`: the gather_raw dir (or a bundle dir) when not at the exported place."""
        require_coreai()
        from coreai.runtime import NDArray

        self._NDArray = NDArray
        self.model_dir = resolve_model_dir(path, mode)
        meta = read_metadata(self.model_dir / "metadata.json")
        g = meta["gemma4"]
        self.metadata = meta
        self.ple_mode: str = g["ple_mode"]
        self.max_context = int(meta["language"]["max_context_length"])
        self.vocab_size = int(meta["language"]["vocab_size"])
        self.num_layers, self.ple_dim = int(g["num_layers"]), int(g["ple_dim"])
        self._state_specs = {n: (tuple(s["shape"]), np.dtype(s["dtype"])) for n, s in g["states"].items()}

        tdir = Path(tables) if tables is not None else (self.model_dir / g["ple_tables"]).resolve()
        width = self.num_layers * self.ple_dim
        for name, size in (("embed_per_layer.i8", self.vocab_size * width),
                           ("embed_per_layer.scale.f32", self.vocab_size * 4)):
            f = tdir / name
            if not f.is_file():
                raise Gemma4Error(f"{f}: PLE table missing (pass tables= the bundle or gather_raw directory)")
            if f.stat().st_size != size:
                raise Gemma4Error(f"{f}: {f.stat().st_size} bytes, expected {size} (vocab {self.vocab_size} x "
                                  f"{'layers x PLE dim' if name.endswith('i8') else '4'}): not this export's table")
        self._ple_table = np.memmap(tdir / "embed_per_layer.i8", dtype=np.int8, mode="r",
                                    shape=(self.vocab_size, width))
        self._ple_scale = np.memmap(tdir / "embed_per_layer.scale.f32", dtype=np.float32, mode="r",
                                    shape=(self.vocab_size,))

        check_graph(self.model_dir / meta["assets"]["main"])
        self._fn = _SyncFunction(self.model_dir / meta["assets"]["main"])
        self._bound: dict[str, Any] = {}
        if self.ple_mode == "tbl":
            # Bound once and reused by every call (the runtime copies them into its own storage).
            self._bound = {"ple_table": NDArray(np.ascontiguousarray(self._ple_table)),
                           "ple_scale": NDArray(np.ascontiguousarray(self._ple_scale))}
        self.reset()

    @property
    def position(self) -> int:
        """Tokens in the current sequence (the position the next token will take)."""
        return self._position

    def describe(self) -> str:
        import coreai.runtime as rt

        engine = "OS Core AI framework" if getattr(rt, "_use_os_coreai", False) else "in-package runtime"
        return f"coreai {self.model_dir.name} ({self.ple_mode}, {engine}, max context {self.max_context})"

    def reset(self) -> None:
        """A new sequence: fresh zeroed KV states (NDArray copies its source; rewriting the old one can't work)."""
        self._state = {n: self._NDArray(np.zeros(shape, dtype)) for n, (shape, dtype) in self._state_specs.items()}
        self._position = 0

    def prefill(self, ids: Sequence[int]) -> torch.Tensor:
        """Append `ids` as S=1 steps; fp32 logits [V] of the last one."""
        ids = self._check(ids)  # the whole prompt, before any of it runs: no half-fed state
        logits = None
        for t in ids:
            logits = self.decode(t)
        return logits

    def decode(self, token_id: int) -> torch.Tensor:
        """Append one token; fp32 logits [V]."""
        (t,) = self._check([token_id])
        nd = self._NDArray
        inputs = {"input_ids": nd(np.array([[t]], np.int32)), "position": nd(np.array([self._position], np.int32))}
        if self.ple_mode == "provider":
            inputs["ple_tokens"] = nd(self._ple_row(t))
        else:
            inputs.update(self._bound)
        out = self._fn(inputs, self._state)
        self._position += 1
        return torch.from_numpy(out["logits"].numpy().astype(np.float32).reshape(-1))

    def _check(self, ids: Sequence[int]) -> list[int]:
        return check_ids(ids, self.vocab_size, self._position, self.max_context,
                         " (export with a larger --max-context)")

    def _ple_row(self, t: int) -> np.ndarray:
        """One token's PLE row from the int8 memmap: fp32 `i8 * scale * sqrt(P)`, fed as fp16 [1, 1, L, P]."""
        # model.dequantize_ple: the torch backend's and the tbl graph's arithmetic, so every path rounds alike.
        row = dequantize_ple(torch.from_numpy(np.array(self._ple_table[t : t + 1])),
                             torch.from_numpy(np.array(self._ple_scale[t : t + 1])), self.ple_dim)
        return row.to(torch.float16).numpy().reshape(1, 1, self.num_layers, self.ple_dim)

    def close(self) -> None:
        self._fn.close()
