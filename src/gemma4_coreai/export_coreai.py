"""Core AI export: the bundle's decoder as a static S=1 `.aimodel` decode graph in the published layout.

Pipeline (each step one function): `require_coreai` -> `build_decoder` (the same `model.Gemma4Model` the torch
backend runs: fp32 activations, fp16 KV cache, linears kept as the bundle's packed q4 bytes) -> `stage_int4` (each
linear's int4 data becomes a storage-free int8 placeholder for the trace) -> `trace` (torch.export + Core AI
decompositions + the stock-op check) -> `attach_int4` (the bundle's packed nibbles become the program's si4
constants) -> `to_program` (coreai-torch converter) -> `export_mode` (save + layout, metadata, tokenizer, PLE
tables), all inside one temp dir renamed to OUT only on success.

Layout written (DESIGN.md §4, mirrors the published E4B bundle):

    OUT/gpu-pipelined/<name>/<name>.aimodel/{main.mlirb, main.hash, metadata.json}
    OUT/gpu-pipelined/<name>/metadata.json          bundle metadata, schema 0.2
    OUT/gpu-pipelined/<name>/tokenizer/...          tokenizer.json, tokenizer_config.json, chat_template.jinja, ...
    OUT/ios-frontend/<stem>_gather_raw/{embed_per_layer.i8, embed_per_layer.scale.f32, meta.json}

with <name> = gemma4_{e2b|e4b|custom}[_qat]_decode_int4lin[_tbl] and <stem> = <name> without the suffix.

int4 stays on the bundle's own q4_0 lattice: every linear and the untied head is
`torch.ops.coreai.constexpr_blockwise_shift_scale(q, d fp16, input_dtype=torch.int4)` on the bundle's q and d,
so the saved asset holds exactly those values (`read_int4_constants` proves it). The bundle stores q as q+8 in
nibbles, low nibble first; `packed ^ 0x88` is the si4 two's-complement layout of the asset, so the int4 data never
exists unpacked (no int8 staging copy: E4B's linears would be 4.6 GB of it).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import Gemma4Error

INSTALL_HINT = "pip install 'gemma4-coreai[coreai]'"
MODES = ("provider", "tbl")
# KV state dtype: fp16 is the published contract (half the state memory, and what the oracle tests verify);
# fp32 is an option that keeps K/V unrounded at twice the state memory.
KV_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
METADATA_VERSION = "0.2"
STATE_NAMES = ("k_cache", "v_cache")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")
PLE_FILES = ("embed_per_layer.i8", "embed_per_layer.scale.f32")
# After decomposition a graph may hold aten ops the converter lowers, these stock Core AI compression ops,
# and Python's getitem/assertions; anything else would need a custom kernel (a coreaix/Metal op, a user
# lowering) and is refused.
STOCK_COREAI_OPS = {"constexpr_blockwise_shift_scale"}
PYTHON_TARGETS = {"_operator.getitem", "<built-in function getitem>"}

Log = Callable[[str], None]


# ---- toolchain ----------------------------------------------------------------------------------------------

def require_coreai() -> None:
    """Import the coreai extra or fail with one line saying how to install it (nothing is written before)."""
    try:
        with warnings.catch_warnings():  # coreai_torch warns about any torch newer than it was validated with
            warnings.simplefilter("ignore")
            import coreai.authoring  # noqa: F401
            import coreai.runtime  # noqa: F401
            import coreai_torch  # noqa: F401

            # Registers torch.ops.coreai.constexpr_blockwise_shift_scale (plain `import coreai_torch` does not).
            import coreai_torch._compression.custom_layers  # noqa: F401
    except Exception as e:  # ImportError without the extra; OSError/RuntimeError where the wheel can't load
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise Gemma4Error(f"Core AI needs the coreai extra (coreai-core, coreai-torch, coreai-opt; wheels for Linux "
                          f"x86_64 and macOS arm64), which could not be imported ({type(e).__name__}: {first}): "
                          f"install it with {INSTALL_HINT}") from None


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("gemma4-coreai", "coreai-core", "coreai-torch", "coreai-opt", "torch"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "unknown"
    return out


# ---- names ---------------------------------------------------------------------------------------------------

def is_qat(bundle: Any) -> bool:
    """True for the official QAT release: its hub id says so, or (its signature) the unused KV projections
    of the shared layers are pruned."""
    src = bundle.manifest.get("source", {})
    return "qat" in str(src.get("given", "")).lower() or src.get("shared_kv_tensors") is False


def artifact_name(variant: str, mode: str, qat: bool) -> str:
    """gemma4_{e2b|e4b|custom}[_qat]_decode_int4lin[_tbl] (the published names)."""
    return f"gemma4_{variant}{'_qat' if qat else ''}_decode_int4lin{'_tbl' if mode == 'tbl' else ''}"


def tables_dir_name(name: str) -> str:
    """ios-frontend directory of the PLE tables: the artifact stem + '_gather_raw' (shared by both modes)."""
    return name.removesuffix("_tbl").removesuffix("_decode_int4lin") + "_gather_raw"


# ---- the decoder to trace ------------------------------------------------------------------------------------

class _ExportWeights(Mapping):
    """The bundle's tensors as Gemma4Model wants them for export: the embedding as an fp16 constant (the bundle's
    bf16 values are fp16-exact unless tinier than 2^-24 or beyond 65504) and every int4 block scale fp16-exact
    (Core AI's int4 op takes fp16 scales). `reader`: an open safetensors handle (else the bundle's own).

    The packed `.q4` bytes come back as the reader's zero-copy views of the file mapping (only read once, by
    `attach_int4`); everything else is copied out, so once those views are released the mapping can go."""

    def __init__(self, bundle: Any, reader: Any = None):
        self._bundle, self._reader = bundle, reader

    def __getitem__(self, key: str) -> Tensor:
        t = self._reader.get_tensor(key) if self._reader is not None else self._bundle.tensor(key)
        if key.endswith(".q4"):
            return t
        if key == "embed_tokens.weight":
            return t.to(torch.float16, copy=True)
        if key.endswith(".scale") and t.dtype != torch.float16:
            raise Gemma4Error(f"{key}: the bundle keeps this linear's block scales in {str(t.dtype)[6:]} because "
                              "they are not fp16-exact (the checkpoint was made from wider scales, and the bundle "
                              "reproduces it bit for bit); Core AI int4 needs fp16 scales, so it cannot be exported "
                              "on the exact lattice")
        return t.clone()

    def __iter__(self):
        return iter(self._reader.keys() if self._reader is not None else self._bundle.names())

    def __len__(self) -> int:
        return len(list(iter(self)))


def coreai_linear(m: Any, x: Tensor) -> Tensor:
    """Q4Linear strategy for export: Core AI's constexpr int4 weight on the module's own q and fp16 scales
    (`int8_weight()`: the staged placeholder when traced, the unpacked q4 bytes when run eagerly).

    The product runs in the compute dtype (fp32): the reference runtime accumulates fp16 matmuls in fp16
    (|err| ~16 on a K=4096 dot product of magnitude 680), which would drown the oracle's margins."""
    w = torch.ops.coreai.constexpr_blockwise_shift_scale(m.int8_weight(), m.scale, input_dtype=torch.int4)
    return F.linear(x, w.to(x.dtype))


class DecodeStep(nn.Module):
    """The graph contract around Gemma4Model: one token in, fp16 logits [1, 1, V] out.

    provider: (input_ids int32 [1,1], position int32 [1], ple_tokens fp16 [1,1,L,P]);
    tbl:      (input_ids, position, ple_table int8 [V, L*P], ple_scale fp32 [V]) gathered in-graph."""

    def __init__(self, model: nn.Module, mode: str):
        super().__init__()
        self.model, self.mode = model, mode

    def forward(self, input_ids: Tensor, position: Tensor, *ple: Tensor) -> Tensor:
        from .model import gather_ple_rows

        cfg = self.model.cfg
        rows = gather_ple_rows(ple[0], ple[1], input_ids, cfg.ple_dim) if self.mode == "tbl" else ple[0]
        rows = rows.reshape(1, 1, cfg.num_layers, cfg.ple_dim)
        return self.model(input_ids, position, rows).to(torch.float16)


def input_names(mode: str) -> list[str]:
    return ["input_ids", "position"] + (["ple_tokens"] if mode == "provider" else ["ple_table", "ple_scale"])


def example_inputs(cfg: Any, mode: str) -> tuple[Tensor, ...]:
    ids = torch.zeros(1, 1, dtype=torch.int32)
    pos = torch.zeros(1, dtype=torch.int32)
    if mode == "provider":
        return ids, pos, torch.zeros(1, 1, cfg.num_layers, cfg.ple_dim, dtype=torch.float16)
    # Only shapes and dtypes matter to the trace; an expanded scalar keeps a [V, L*P] example free of RAM.
    table = torch.zeros((), dtype=torch.int8).expand(cfg.vocab_size, cfg.ple_width)
    return ids, pos, table, torch.ones(cfg.vocab_size, dtype=torch.float32)


def build_decoder(bundle: Any, max_context: int, kv_dtype: str = "fp16") -> nn.Module:
    """Gemma4Model for export: fp32 compute, fp16 KV cache (the contract's state dtype), linears stored as the
    bundle's packed q4 bytes + fp16 d with the Core AI int4 linear_fn (runs eagerly as is; `stage_int4` readies
    it for the trace). Weights stay 4-bit/16-bit constants; only activations are fp32, which costs a decode
    step nothing measurable (it is bound by reading the int4 weights)."""
    from .model import Gemma4Model, set_linear_fn

    with torch.no_grad():
        model = Gemma4Model(bundle.config, _ExportWeights(bundle), dtype=torch.float32, ple_mode="provider",
                            max_context=max_context, linear_storage="packed", kv_dtype=KV_DTYPES[kv_dtype])
    # Drop the bundle's file handle: the q4 views keep their pages mapped until `attach_int4` releases them.
    bundle.close()
    set_linear_fn(model, coreai_linear)
    return model.eval()


def stage_int4(model: nn.Module) -> dict[str, Tensor]:
    """Swap each Q4Linear's packed `q4` buffer for an int8 [N, K] placeholder `q` without storage (a broadcast
    zero: the trace only needs its shape and dtype) and hand back {module path + '.q': packed q4 bytes}.

    Tracing then lifts every `q` as a constant input of its constexpr_blockwise_shift_scale; `attach_int4` fills
    those constants with the packed bytes, so no unpacked int8 copy of the weights is ever made."""
    from .model import Q4Linear

    packed: dict[str, Tensor] = {}
    for path, m in model.named_modules():
        if not isinstance(m, Q4Linear):
            continue
        if m.q4 is None:
            raise Gemma4Error(f"{m.name}: stage_int4 needs packed linear storage, found {m.storage}")
        packed[f"{path}.q"] = m._buffers.pop("q4")
        m.q4 = None
        m.__dict__.pop("q", None)
        m.register_buffer("q", torch.zeros((), dtype=torch.int8).expand(m.out_features, m.in_features))
        m.storage = "int8"
    return packed


def attach_int4(ep: Any, packed: dict[str, Tensor]) -> None:
    """Give the traced program the bundle's int4 data: each staged placeholder constant becomes coreai-torch's
    packed si4 tensor (`IntxTensor`, what its converter stores as si4) holding `q4 ^ 0x88`.

    The bundle keeps q+8 per nibble, low nibble = even column; XOR 0x88 flips bit 3 of both nibbles, giving q's
    4-bit two's complement in the same order, which is the si4 byte layout. The placeholder's trace metadata is
    set to int4 too, so coreai-torch's sub-byte injection (which packs int8 data) leaves it alone. Each view of
    the bundle's mapping is dropped once converted."""
    from coreai_torch._compression._intx import IntxTensor

    targets = {spec.arg.name: spec.target for spec in ep.graph_signature.input_specs}
    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    done = 0
    for name, node in nodes.items():
        fqn = targets.get(name)
        if fqn not in packed:
            continue
        q4 = packed.pop(fqn)
        shape = torch.Size((q4.shape[0], q4.shape[1] * 2))
        ep.state_dict[fqn] = IntxTensor(torch.bitwise_xor(q4, 0x88).reshape(-1), shape, 4)
        del q4
        val = node.meta["val"]
        with val.fake_mode:
            node.meta["val"] = torch.empty(shape, dtype=torch.int4)
        done += 1
    if packed:
        raise Gemma4Error(f"Core AI export: {len(packed)} int4 weights (e.g. {next(iter(packed))}) are not "
                          f"constants of the traced program")
    if not done:
        raise Gemma4Error("Core AI export: the traced program has no int4 weights")


# ---- trace, check, convert -----------------------------------------------------------------------------------

def trace(step: nn.Module, args: tuple[Tensor, ...]) -> Any:
    """torch.export (static shapes) + Core AI's decomposition table, then the stock-op check."""
    import coreai_torch

    with torch.no_grad():
        ep = torch.export.export(step, args)
        ep = ep.run_decompositions(coreai_torch.get_decomp_table())
    check_stock_ops(ep)
    return ep


def graph_ops(ep: Any) -> set[str]:
    return {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}


def check_stock_ops(ep: Any) -> None:
    """Refuse anything a stock Core AI build can't run: one line naming the first offending op."""
    from coreai_torch._aten_to_core import _aten_to_core_resolver
    from coreai_torch._validate import _COMPOSITE_OPS

    composite = {str(op) for op in _COMPOSITE_OPS}
    for target in sorted(graph_ops(ep)):
        ns, _, rest = target.partition(".")
        if target in PYTHON_TARGETS or target in composite or target.startswith("aten._assert"):
            continue
        if ns == "aten" and rest in _aten_to_core_resolver:
            continue
        if ns == "coreai" and rest.rsplit(".", 1)[0] in STOCK_COREAI_OPS:
            continue
        raise Gemma4Error(f"Core AI export: op {target} has no stock Core AI lowering (it would need a custom "
                          "kernel); refusing to export")


def state_order(ep: Any) -> list[str]:
    """State names in the order the converter binds mutated buffers (the graph signature's output order)."""
    mutated = ep.graph_signature.buffers_to_mutate  # {output node name: buffer FQN}, in output order
    names = [fqn.rsplit(".", 1)[-1] for fqn in mutated.values()]
    if sorted(names) != sorted(STATE_NAMES):
        raise Gemma4Error(f"Core AI export: expected the KV cache buffers {STATE_NAMES} to be the only mutated "
                          f"state, found {names}")
    return names


def to_program(ep: Any, mode: str) -> Any:
    """coreai-torch conversion (RELEASE mode: no stack traces in debug info); converter errors -> one line."""
    import coreai_torch

    conv = coreai_torch.TorchConverter(mode=coreai_torch.TorchConverter.Mode.RELEASE)
    try:
        conv.add_exported_program(ep, input_names=input_names(mode), output_names=["logits"],
                                  state_names=state_order(ep), entrypoint_name="main")
        return conv.to_coreai()
    except Gemma4Error:
        raise
    except Exception as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise Gemma4Error(f"Core AI conversion failed: {type(e).__name__}: {first}") from None


# ---- read-back of the int4 constants (the lattice proof) -----------------------------------------------------

def read_int4_constants(aimodel: str | Path) -> list[tuple[Any, Any]]:
    """Every `coreai.blockwise_shift_scale` of a saved asset as (q int8 [N, K], d fp16 [N, K/32]) numpy arrays,
    decoded from the stored constants (si4 packed two per byte, low nibble first).

    Uses coreai's raw MLIR module (an unstable escape hatch). Never np.array() an si4 attribute: it aborts."""
    import numpy as np
    from coreai._compiler._mlir_libs._coreaiIR._bindings import compiler as cc
    from coreai._compiler.ir import RankedTensorType
    from coreai.authoring import AIModelAsset

    widths = {"si4": 4, "f16": 16, "f32": 32, "si8": 8, "si32": 32}
    views = {"f16": np.float16, "f32": np.float32, "si8": np.int8, "si32": np.int32}

    def const(op: Any) -> Any:
        ty = RankedTensorType(op.result.type)
        et, shape = str(ty.element_type), list(ty.shape)
        n = math.prod(shape)
        buf = np.zeros((n * widths[et] + 7) // 8, dtype=np.uint8)
        cc.copy_constant_value_to_array(constant_op=op, destination=buf)
        if et == "si4":
            nib = np.stack([buf & 0xF, buf >> 4], axis=-1).reshape(-1)[:n].astype(np.int8)
            return np.where(nib >= 8, nib - 16, nib).astype(np.int8).reshape(shape)
        return buf.view(views[et]).reshape(shape)

    found: list[tuple[Any, Any]] = []

    def walk(op: Any) -> None:
        for region in op.regions:
            for block in region.blocks:
                for o in block.operations:
                    o = o.operation
                    if o.name == "coreai.blockwise_shift_scale":
                        data, scale, *rest = [const(v.owner) for v in o.operands]
                        if any(np.any(r) for r in rest):  # zero point / offset: q4_0 has neither
                            raise Gemma4Error(f"{aimodel}: an int4 weight carries a nonzero zero point or offset")
                        found.append((data, scale))
                    walk(o)

    walk(AIModelAsset.load(Path(aimodel)).program._module._mlir_module.operation)
    return found


# ---- layout and metadata -------------------------------------------------------------------------------------

def bundle_metadata(name: str, bundle: Any, mode: str, max_context: int, tables_rel: str,
                    kv_dtype: str = "fp16") -> dict[str, Any]:
    """gpu-pipelined/<name>/metadata.json (schema 0.2). `gemma4` carries what a host needs to drive the graph."""
    from .generate import default_stop_ids

    cfg = bundle.config
    src = bundle.manifest.get("source", {})
    kv_shape = [cfg.num_kv_slots, 1, cfg.num_kv_heads, max_context, cfg.max_head_dim]
    if mode == "provider":
        ple_inputs = {"ple_tokens": {"dtype": "float16", "shape": [1, 1, cfg.num_layers, cfg.ple_dim],
                                     "per_token": "i8[id] * scale[id] * sqrt(P), from the gather_raw tables"}}
    else:
        ple_inputs = {"ple_table": {"dtype": "int8", "shape": [cfg.vocab_size, cfg.ple_width],
                                    "bind_once": "embed_per_layer.i8"},
                      "ple_scale": {"dtype": "float32", "shape": [cfg.vocab_size],
                                    "bind_once": "embed_per_layer.scale.f32"}}
    return {
        "metadata_version": METADATA_VERSION,
        "kind": "llm",
        "name": name,
        "assets": {"main": f"{name}.aimodel"},
        "language": {
            "tokenizer": "tokenizer",
            "vocab_size": cfg.vocab_size,
            "max_context_length": max_context,
            "embedded_tokenizer": True,
            "function_map": {"decode": "main"},
            "bos_token_id": cfg.bos_token_id,
            # what `generate` stops on: <eos>, <turn|> and the bundle's generation_config eos ids
            "eos_token_ids": list(dict.fromkeys([cfg.eos_token_id, *default_stop_ids(bundle.generation_config)])),
        },
        "source": {"model": src.get("given") or src.get("path"), "variant": cfg.variant, "qat": is_qat(bundle),
                   "bundle_format_version": bundle.manifest.get("format_version"),
                   "bundle_created": bundle.manifest.get("created"),
                   "bundle_weights_sha256": bundle.manifest["files"]["weights.safetensors"].get("sha256")},
        "compression": {
            "linears": "int4 per-block-32 (q4_0 lattice), the bundle's own q and fp16 scales, "
                       "coreai.constexpr_blockwise_shift_scale",
            "lm_head": "int4 per-block-32, untied copy of the embedding",
            "embed_tokens": "float16 (row gather)",
            "ple_table": "int8 rows + fp32 row scale (dequant i8 * scale * sqrt(P))",
        },
        "compilation": {
            "tool": "gemma4-coreai export-coreai", "versions": _versions(),
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "graph": "static S=1 decode step (prefill = S=1 steps)",
            "compute": f"float32 activations, {kv_dtype} KV cache",
            "custom_kernels": [], "minimum_os": "27.0",
        },
        "gemma4": {
            "ple_mode": mode,
            "inputs": {"input_ids": {"dtype": "int32", "shape": [1, 1]},
                       "position": {"dtype": "int32", "shape": [1]}, **ple_inputs},
            "outputs": {"logits": {"dtype": "float16", "shape": [1, 1, cfg.vocab_size],
                                   "after": "softcap" if cfg.final_logit_softcap is not None else "lm_head"}},
            "states": {n: {"dtype": str(KV_DTYPES[kv_dtype])[6:], "shape": kv_shape} for n in STATE_NAMES},
            "num_layers": cfg.num_layers, "ple_dim": cfg.ple_dim, "hidden_size": cfg.hidden_size,
            "ple_tables": tables_rel,
        },
    }


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard link (no extra disk, and no symlink for loaders that refuse them), else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def write_tables(bundle: Any, out_dir: Path) -> None:
    """ios-frontend/<stem>_gather_raw: the PLE table pair in the published raw layout + meta.json."""
    cfg = bundle.config
    out_dir.mkdir(parents=True)
    for f in PLE_FILES:
        link_or_copy(bundle.path / f, out_dir / f)
    meta = {"vocab_size": cfg.vocab_size, "num_layers": cfg.num_layers, "ple_dim": cfg.ple_dim,
            "row_width": cfg.ple_width,
            "table": {"file": PLE_FILES[0], "dtype": "int8", "shape": [cfg.vocab_size, cfg.ple_width]},
            "scale": {"file": PLE_FILES[1], "dtype": "float32", "shape": [cfg.vocab_size]},
            "row_scale": math.sqrt(cfg.ple_dim), "dequant": "row = i8[id] * scale[id] * sqrt(P), viewed [L, P]"}
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


def write_tokenizer(bundle: Any, out_dir: Path) -> None:
    out_dir.mkdir(parents=True)
    for f in TOKENIZER_FILES:
        if (bundle.tokenizer_dir / f).is_file():
            shutil.copyfile(bundle.tokenizer_dir / f, out_dir / f)
    if not (out_dir / "chat_template.jinja").is_file() and bundle.chat_template:
        (out_dir / "chat_template.jinja").write_text(bundle.chat_template)


def _took(t0: float) -> str:
    """'12.3 s, RSS 4.56 GB (peak 7.89 GB)': each export phase logs its time and memory."""
    import resource

    import psutil

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return (f"{time.perf_counter() - t0:.1f} s, RSS {psutil.Process().memory_info().rss / 1e9:.2f} GB "
            f"(peak {peak / 1e9:.2f} GB)")


def export_mode(bundle: Any, mode: str, root: Path, max_context: int, log: Log, kv_dtype: str = "fp16") -> Path:
    """One mode into root/gpu-pipelined/<name>/ (+ the shared tables dir). Returns the model directory.

    Memory: the weights exist once on the torch side (packed int4, fp16 scales, fp16 embedding: about what the
    asset stores) and once as MLIR constants during conversion; each stage frees the previous one's tensors
    before the next is built."""
    cfg = bundle.config
    name = artifact_name(cfg.variant, mode, is_qat(bundle))
    model_dir = root / "gpu-pipelined" / name
    t0 = time.perf_counter()
    step = DecodeStep(build_decoder(bundle, max_context, kv_dtype), mode)
    packed = stage_int4(step)
    log(f"[{name}] decoder built: {_took(t0)}")
    t0 = time.perf_counter()
    ep = trace(step, example_inputs(cfg, mode))
    del step  # the exported program holds the only reference to the weights now
    log(f"[{name}] traced ({len(graph_ops(ep))} distinct ops, all stock): {_took(t0)}")
    t0 = time.perf_counter()
    attach_int4(ep, packed)
    gc.collect()
    log(f"[{name}] int4 attached: {_took(t0)}")
    t0 = time.perf_counter()
    program = to_program(ep, mode)
    del ep
    gc.collect()
    log(f"[{name}] converted: {_took(t0)}")
    t0 = time.perf_counter()
    model_dir.mkdir(parents=True)
    program.save_asset(model_dir / f"{name}.aimodel")
    del program
    gc.collect()
    log(f"[{name}] saved: {_took(t0)}")
    tables = root / "ios-frontend" / tables_dir_name(name)
    if not tables.exists():
        write_tables(bundle, tables)
    write_tokenizer(bundle, model_dir / "tokenizer")
    meta = bundle_metadata(name, bundle, mode, max_context, f"../../ios-frontend/{tables.name}", kv_dtype)
    (model_dir / "metadata.json").write_text(json.dumps(meta, indent=1) + "\n")
    return model_dir


def export_coreai(bundle_path: str | Path, out: str | Path, *, mode: str = "provider",
                  max_context: int | None = None, kv_dtype: str = "fp16", force: bool = False,
                  log: Log = print) -> list[Path]:
    """Export a bundle as Core AI decode graphs (mode provider, tbl or both) into OUT, atomically.

    Returns the model directories (OUT/gpu-pipelined/<name>). Refuses an existing OUT without force."""
    from .bundle import Bundle
    from .checkpoint import atomic_dir, refuse_overwriting_source

    modes = list(MODES) if mode == "both" else [mode]
    if any(m not in MODES for m in modes):
        raise Gemma4Error(f"unknown mode {mode!r}: expected provider, tbl or both")
    if kv_dtype not in KV_DTYPES:
        raise Gemma4Error(f"unknown KV dtype {kv_dtype!r}: expected fp16 or fp32")
    out = Path(out)
    refuse_overwriting_source(out, bundle_path)
    if out.exists() and not force:
        raise Gemma4Error(f"{out}: already exists (use --force to overwrite)")
    require_coreai()  # before anything is written
    bundle = Bundle.open(bundle_path)
    max_context = bundle.max_context if max_context is None else int(max_context)
    if not 1 <= max_context <= bundle.config.max_position_embeddings:
        raise Gemma4Error(f"max context {max_context} is out of range: the model supports 1 to "
                          f"{bundle.config.max_position_embeddings} tokens")
    names: list[str] = []

    def body(tmp: Path) -> None:
        for m in modes:
            names.append(export_mode(bundle, m, tmp, max_context, log, kv_dtype).name)

    atomic_dir(out, body, force=force, marker="gpu-pipelined")
    return [out / "gpu-pipelined" / n for n in names]


# ---- CLI (wired by cli.py) -----------------------------------------------------------------------------------

def add_export_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export-coreai", help="bundle -> Core AI .aimodel decode graph (published layout)",
        description="Trace the bundle's decoder (the same module the torch backend runs) as a static S=1 decode "
                    "graph of stock Core AI ops and save it with coreai-core: OUT/gpu-pipelined/<name>/ "
                    "(<name>.aimodel, metadata.json, tokenizer/) and OUT/ios-frontend/<stem>_gather_raw/ (the PLE "
                    "tables). Linears and the head stay int4 on the bundle's own q4_0 lattice. Needs the coreai "
                    f"extra ({INSTALL_HINT}). Written atomically: OUT appears only when complete.")
    p.add_argument("bundle", metavar="BUNDLE", type=Path, help="bundle directory (from convert)")
    p.add_argument("-o", "--out", required=True, type=Path, metavar="OUT", help="export directory to create")
    p.add_argument("--mode", choices=["provider", "tbl", "both"], default="provider",
                   help="provider: the host feeds each token's PLE row (ple_tokens); tbl: the int8 table is bound "
                        "once and gathered in-graph; both: one graph each (default provider)")
    p.add_argument("--max-context", type=int, default=None, metavar="N",
                   help="KV cache length baked into the graph (default: the bundle's max context)")
    p.add_argument("--kv-dtype", choices=sorted(KV_DTYPES), default="fp16",
                   help="KV cache state dtype: fp16 (the published contract) or fp32 (unrounded K/V, twice the "
                        "state memory) (default fp16)")
    p.add_argument("--force", action="store_true",
                   help="replace OUT if it is an earlier export or empty (only after success)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines (only what was written)")
    return p


def run_export(args: argparse.Namespace) -> int:
    import contextlib
    import io

    t0 = time.perf_counter()
    quiet = getattr(args, "quiet", False)
    # -q: coreai-torch's own progress bar writes to stdout too; the summary lines below still print
    with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
        dirs = export_coreai(args.bundle, args.out, mode=args.mode, max_context=args.max_context,
                             kv_dtype=getattr(args, "kv_dtype", "fp16"), force=args.force,
                             log=(lambda s: None) if quiet else print)
    tables = {d.parent.parent / "ios-frontend" / tables_dir_name(d.name) for d in dirs}
    for d in [*dirs, *sorted(tables)]:  # the graphs, then the PLE tables they share (2.6 GiB on E4B)
        size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        print(f"wrote {d} ({size / 1024**3:.3f} GiB)")
    print(f"export took {time.perf_counter() - t0:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m gemma4_coreai.export_coreai BUNDLE -o OUT ...` (same options and checks as `gemma4-coreai
    export-coreai`)."""
    import sys

    from .cli import main as cli_main

    return cli_main(["export-coreai", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
