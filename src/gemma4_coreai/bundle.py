"""The bundle: writer (`convert`), reader (`Bundle.open`) and `inspect` (format: docs/INTERNALS.md).

convert streams: one checkpoint tensor at a time is read, quantized (quant.quantize_weights) and appended to
weights.safetensors; the PLE table goes through in row chunks to embed_per_layer.i8 / .scale.f32. Everything is
written into `<out>.tmp-<pid>` and renamed at the end, so a bundle is either complete or absent.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import quant
from .checkpoint import (
    Checkpoint,
    SafetensorsWriter,
    _check_with_safetensors,
    atomic_dir,
    progress_bar,
    read_json,
    refuse_overwriting_source,
    sha256_file,
)
from .config import ModelConfig
from .errors import Gemma4Error

FORMAT = "gemma4-coreai-bundle"
FORMAT_VERSION = 1
DEFAULT_MAX_CONTEXT = 4096
WEIGHTS = "weights.safetensors"
PLE_TABLE = "embed_per_layer.i8"
PLE_SCALE = "embed_per_layer.scale.f32"
ORACLE = "oracle.json"
TOKENIZER_DIR = "tokenizer"
BUNDLE_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                          "special_tokens_map.json", "tokenizer.model")

OracleHook = Callable[[Checkpoint, Path], "dict | None"]


def _tool_version() -> str:
    try:
        from importlib.metadata import version

        return version("gemma4-coreai")
    except Exception:
        return "0+unknown"


# ---- writer ---------------------------------------------------------------------------------------------

def weight_specs(cfg: ModelConfig, embed_dtype: torch.dtype) -> list[tuple[str, torch.dtype | None, tuple]]:
    """Every weights.safetensors entry in quant.quantize_weights' order; None = scale dtype decided per tensor
    (fp16 where exact, else fp32)."""
    specs: list[tuple[str, torch.dtype | None, tuple]] = []
    linears = {**cfg.linear_shapes(), "lm_head.weight": (cfg.vocab_size, cfg.hidden_size)}
    for name, (n, k) in linears.items():
        if name == "lm_head.weight":
            continue
        specs += [(quant.stem(name) + ".q4", torch.uint8, (n, k // 2)),
                  (quant.stem(name) + ".scale", None, (n, k // quant.BLOCK))]
    n, k = linears["lm_head.weight"]
    specs += [("lm_head.q4", torch.uint8, (n, k // 2)), ("lm_head.scale", None, (n, k // quant.BLOCK)),
              ("embed_tokens.weight", embed_dtype, (cfg.vocab_size, cfg.hidden_size))]
    specs += [(name, torch.float32, shape) for name, shape in cfg.norm_shapes().items()]
    return specs


def default_max_context(cfg: ModelConfig) -> int:
    return min(cfg.max_position_embeddings, DEFAULT_MAX_CONTEXT)


def convert(src: str | Path | Checkpoint, out: str | Path, force: bool = False, max_context: int | None = None,
            progress: bool = True, oracle_hook: OracleHook | None = None) -> Path:
    """Checkpoint (dir, hub id or open Checkpoint) -> bundle directory `out` (atomic). Returns out."""
    out = Path(out)
    if out.exists() and not force:
        raise Gemma4Error(f"{out}: already exists (use --force to overwrite)")
    ckpt = src if isinstance(src, Checkpoint) else Checkpoint.open(src)
    ckpt.validate()
    cfg = ckpt.config
    if max_context is None:
        max_context = default_max_context(cfg)
    if not 1 <= max_context <= cfg.max_position_embeddings:
        raise Gemma4Error(f"max_context {max_context} is out of range [1, {cfg.max_position_embeddings}] "
                          "(max_position_embeddings)")
    refuse_overwriting_source(out, ckpt.path)
    tok_files = {n: ckpt.path / n for n in BUNDLE_TOKENIZER_FILES if (ckpt.path / n).is_file()}
    if "tokenizer.json" not in tok_files:
        raise Gemma4Error(f"{ckpt.path}: tokenizer.json not found (a bundle needs the tokenizer)")
    load_tokenizer(tok_files["tokenizer.json"])  # unreadable files are refused now, not when the bundle is used
    if "generation_config.json" in tok_files:
        read_generation_config(tok_files["generation_config.json"])

    def body(tmp: Path) -> None:
        report = quant.LatticeReport()
        files: dict[str, dict[str, Any]] = {}
        total = sum(math.prod(i.shape) * i.torch_dtype.itemsize
                    for i in (ckpt.info(n) for n in ckpt.required_shapes()))
        bar = progress_bar(total, "convert", progress)
        try:
            emb_dtype = ckpt.dtype("embed_tokens.weight")

            def get(name: str) -> torch.Tensor:
                t = ckpt.get(name)
                bar(t.numel() * t.element_size())
                return t

            w = SafetensorsWriter(tmp / WEIGHTS, weight_specs(cfg, emb_dtype), metadata={"format": "pt"})
            try:
                for name, t in quant.quantize_weights(cfg, get, report):
                    w.write(name, t)
                digest = w.close()
            except BaseException:
                w.abort()
                raise
            files[WEIGHTS] = {"size": w.size, "sha256": digest}
            files.update(_write_ple(ckpt, tmp, report, bar))
        finally:
            bar(None)

        (tmp / TOKENIZER_DIR).mkdir()
        for n, p in tok_files.items():
            shutil.copyfile(p, tmp / TOKENIZER_DIR / n)
            files[f"{TOKENIZER_DIR}/{n}"] = _file_entry(tmp / TOKENIZER_DIR / n)

        oracle = oracle_hook(ckpt, tmp) if oracle_hook is not None else None
        if oracle is not None:
            (tmp / ORACLE).write_text(json.dumps(oracle, indent=1) + "\n")
            files[ORACLE] = _file_entry(tmp / ORACLE)

        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "config": cfg.to_dict(),
            "max_context": int(max_context),
            "quantization": {
                "linear": {"scheme": "q4_0", "block": quant.BLOCK, "packing": "uint8, low nibble = even column, +8",
                           "scale_dtype": "fp16 where exact, else fp32"},
                "lm_head": "q4_0 untied copy of embed_tokens.weight",
                "embed_tokens": str(emb_dtype).removeprefix("torch."),
                "ple_table": {"scheme": "int8 rows", "scale": "fp32, max|row|/127",
                              "dequant": "i8[id] * scale[id] * sqrt(P)"},
                "norms": "fp32",
            },
            "files": files,
            "source": {"path": str(ckpt.path), "given": ckpt.source, "prefix": ckpt.prefix,
                       "files": [f.name for f in ckpt.files], "bytes": ckpt.bytes,
                       "dtype": str(emb_dtype).removeprefix("torch."),
                       "shared_kv_tensors": any(ckpt.has(n) for n in cfg.optional_shared_kv_names())},
            "lattice": report.to_dict(),
            "oracle": oracle,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "tool_version": _tool_version(),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")

    return atomic_dir(out, body, force=force, marker="manifest.json")


def _write_ple(ckpt: Checkpoint, tmp: Path, report: quant.LatticeReport, bar) -> dict[str, dict[str, Any]]:
    """Stream embed_tokens_per_layer through quant.ple_table_chunks into the two raw table files."""
    table = ckpt.lazy("embed_tokens_per_layer.weight")
    row_bytes = table.shape[1] * table.dtype.itemsize
    hq, hs = hashlib.sha256(), hashlib.sha256()
    nq = ns = 0
    with open(tmp / PLE_TABLE, "wb") as fq, open(tmp / PLE_SCALE, "wb") as fs:
        for q, scale in quant.ple_table_chunks(table, report):
            bq = memoryview(q.contiguous().numpy().reshape(-1))
            bs = memoryview(scale.to(torch.float32).contiguous().numpy().reshape(-1).view(np.uint8))
            fq.write(bq)
            fs.write(bs)
            hq.update(bq)
            hs.update(bs)
            nq += bq.nbytes
            ns += bs.nbytes
            bar(q.shape[0] * row_bytes)
    return {PLE_TABLE: {"size": nq, "sha256": hq.hexdigest()}, PLE_SCALE: {"size": ns, "sha256": hs.hexdigest()}}


def _file_entry(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


# ---- reader ---------------------------------------------------------------------------------------------

def load_tokenizer(path: Path):
    """A `tokenizers.Tokenizer` from tokenizer.json; one-line Gemma4Error when the file does not load."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - the library raises a bare Exception for a bad file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise Gemma4Error(f"{path}: not a loadable tokenizer ({first})") from None


# generation_config.json fields that sampling reads, and the JSON types each may have (null: absent)
GENERATION_FIELDS = {"do_sample": (bool,), "temperature": (int, float), "top_k": (int,), "top_p": (int, float)}


def _token_id(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def read_generation_config(path: Path) -> dict[str, Any]:
    """generation_config.json as a dict, its sampling fields type-checked; one-line Gemma4Error otherwise."""
    gen = read_json(path)
    if not isinstance(gen, dict):
        raise Gemma4Error(f"{path}: expected a JSON object, got {type(gen).__name__}")
    for key, types in GENERATION_FIELDS.items():
        v = gen.get(key)
        if v is None:
            continue
        if not isinstance(v, types) or (bool not in types and isinstance(v, bool)) or \
                (isinstance(v, float) and not math.isfinite(v)):
            raise Gemma4Error(f"{path}: field '{key}' is {v!r}, expected {' or '.join(t.__name__ for t in types)}")
    eos = gen.get("eos_token_id")
    if eos is not None and not (_token_id(eos) or (isinstance(eos, list) and eos and all(map(_token_id, eos)))):
        raise Gemma4Error(f"{path}: field 'eos_token_id' is {eos!r}, expected a token id or a non-empty list of them")
    for key, ok, rule in (("temperature", lambda v: v >= 0, ">= 0"), ("top_k", lambda v: v >= 0, ">= 0"),
                          ("top_p", lambda v: 0 < v <= 1, "in (0, 1]")):
        if gen.get(key) is not None and not ok(gen[key]):
            raise Gemma4Error(f"{path}: field '{key}' is {gen[key]!r}, expected a value {rule}")
    return gen


def _check_weights(path: Path, cfg: ModelConfig) -> None:
    """weights.safetensors' header against the config: every tensor of `weight_specs` with its dtype and shape,
    and no other (the library parses the header too)."""
    infos = _check_with_safetensors(path)
    emb = infos.get("embed_tokens.weight")
    emb_dtype = emb.torch_dtype if emb is not None else None
    if emb_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise Gemma4Error(f"{path}: tensor 'embed_tokens.weight' is "
                          f"{'missing' if emb is None else emb.dtype + ', expected BF16, F16 or F32'}")
    specs = weight_specs(cfg, emb_dtype)
    for name, dtype, shape in specs:
        info = infos.get(name)
        if info is None:
            raise Gemma4Error(f"{path}: tensor '{name}' is missing")
        want = (torch.float16, torch.float32) if dtype is None else (dtype,)
        if info.shape != tuple(shape) or info.torch_dtype not in want:
            names = " or ".join(str(d).removeprefix("torch.") for d in want)
            raise Gemma4Error(f"{path}: tensor '{name}' is {info.dtype} {list(info.shape)}, the config needs "
                              f"{names} {list(shape)}")
    extra = sorted(set(infos) - {name for name, _, _ in specs})
    if extra:
        raise Gemma4Error(f"{path}: unexpected tensor '{extra[0]}' (not part of this config's bundle)")


class Bundle:
    """An opened, validated bundle directory. Weights are read lazily; tables are memory-mapped."""

    def __init__(self, path: Path, manifest: dict[str, Any], config: ModelConfig):
        self.path, self.manifest, self.config = path, manifest, config
        self._st = None

    @classmethod
    def open(cls, path: str | Path, verify_hashes: bool = False) -> Bundle:
        """Validate format, version, every listed file's presence and size (and sha256 when asked), and the
        table sizes against the config. One-line Gemma4Error naming the file or field on any problem."""
        p = Path(path)
        mpath = p / "manifest.json"
        if not p.is_dir():
            raise Gemma4Error(f"{p}: {'a file, not a bundle directory' if p.exists() else 'no such bundle directory'}")
        if not mpath.is_file():
            raise Gemma4Error(f"{mpath}: not found (not a gemma4-coreai bundle)")
        try:
            m = json.loads(mpath.read_text())
            if not isinstance(m, dict):
                raise ValueError("not an object")
        except (ValueError, UnicodeDecodeError) as e:
            raise Gemma4Error(f"{mpath}: corrupt manifest (not valid JSON: {str(e).splitlines()[0]})") from None
        if m.get("format") != FORMAT:
            raise Gemma4Error(f"{mpath}: field 'format' is {m.get('format')!r}, expected {FORMAT!r}")
        if m.get("format_version") != FORMAT_VERSION:
            raise Gemma4Error(f"{mpath}: field 'format_version' is {m.get('format_version')!r}, this tool reads "
                              f"version {FORMAT_VERSION}")
        for key in ("config", "files", "max_context"):
            if key not in m:
                raise Gemma4Error(f"{mpath}: corrupt manifest (field '{key}' is missing)")
        try:
            cfg = ModelConfig.from_dict(m["config"], source=str(mpath))
        except (TypeError, KeyError, ValueError) as e:
            raise Gemma4Error(f"{mpath}: corrupt manifest (field 'config': {e})") from None
        mc = m["max_context"]
        if not (isinstance(mc, int) and not isinstance(mc, bool) and 1 <= mc <= cfg.max_position_embeddings):
            raise Gemma4Error(f"{mpath}: field 'max_context' is {mc!r}, expected an integer in "
                              f"[1, {cfg.max_position_embeddings}]")
        files = m["files"]
        if not (isinstance(files, dict) and all(isinstance(e, dict) for e in files.values())):
            raise Gemma4Error(f"{mpath}: field 'files' must map file names to {{size, sha256}} objects")
        if not isinstance(m.get("lattice", {}), dict):
            raise Gemma4Error(f"{mpath}: field 'lattice' is {m['lattice']!r}, expected an object")
        summary = m.get("lattice", {}).get("summary")
        if summary is not None and not (
                isinstance(summary, dict) and isinstance(summary.get("off_lattice_tensors", []), list)
                and all(isinstance(summary.get(k), int | float) and not isinstance(summary.get(k), bool)
                        for k in ("blocks", "exact_blocks", "exact_fraction", "worst_rel_err"))):
            raise Gemma4Error(f"{mpath}: field 'lattice.summary' is {summary!r}, not what convert writes")
        for req in (WEIGHTS, PLE_TABLE, PLE_SCALE, f"{TOKENIZER_DIR}/tokenizer.json"):
            if req not in files:
                raise Gemma4Error(f"{mpath}: corrupt manifest (field 'files' does not list {req})")
        expect = {PLE_TABLE: cfg.vocab_size * cfg.ple_width, PLE_SCALE: 4 * cfg.vocab_size}
        for rel, entry in files.items():
            f = p / rel
            if not f.is_file():
                raise Gemma4Error(f"{f}: missing (listed in manifest.json)")
            size = f.stat().st_size
            if not isinstance(entry.get("size"), int) or isinstance(entry.get("size"), bool):
                raise Gemma4Error(f"{mpath}: files.{rel}.size is {entry.get('size')!r}, expected an integer")
            if rel in expect and entry.get("size") != expect[rel]:
                raise Gemma4Error(f"{mpath}: files.{rel}.size is {entry.get('size')}, the config needs "
                                  f"{expect[rel]}")
            if size != entry.get("size"):
                raise Gemma4Error(f"{f}: truncated or wrong size ({size} bytes, manifest says {entry.get('size')})")
            if verify_hashes and sha256_file(f) != entry.get("sha256"):
                raise Gemma4Error(f"{f}: sha256 does not match manifest.json")
        _check_weights(p / WEIGHTS, cfg)
        return cls(p, m, cfg)

    # -- metadata --
    @property
    def max_context(self) -> int:
        return int(self.manifest["max_context"])

    @property
    def source_dtype(self) -> torch.dtype | None:
        """The 16- or 32-bit float dtype the source checkpoint stored its weights in (None: not recorded). Its
        q4_0 blocks were checked exact in this dtype, so dequantizing through it gives the checkpoint's values."""
        name = (self.manifest.get("source") or {}).get("dtype")
        return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(name)

    @property
    def oracle(self) -> dict | None:
        """The stored oracle record (oracle.json where the manifest lists it, else the manifest's copy);
        `oracle.check_oracle` validates it. An oracle.json the manifest does not list (copied in from elsewhere)
        is ignored: the manifest's size and sha256 are what tie the record to this bundle."""
        f = self.path / ORACLE
        if ORACLE in self.manifest["files"] and f.is_file():
            return read_json(f)
        return self.manifest.get("oracle")

    @property
    def lattice(self) -> dict:
        return self.manifest.get("lattice", {})

    # -- weights --
    def _weights(self):
        if self._st is None:
            from safetensors import safe_open

            self._st = safe_open(str(self.path / WEIGHTS), framework="pt")
        return self._st

    def close(self) -> None:
        """Drop the weights file handle and its memory mapping. Tensors already read stay valid (those returned
        as zero-copy views keep their pages mapped until they are released); a later read reopens the file.
        Safe to call twice."""
        self._st = None

    def names(self) -> list[str]:
        return list(self._weights().keys())

    def tensor(self, name: str) -> torch.Tensor:
        st = self._weights()
        if name not in st.keys():
            raise Gemma4Error(f"{self.path / WEIGHTS}: no tensor '{name}'")
        return st.get_tensor(name)

    def linear(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(q int8 [N, K] in [-8, 7], d fp16|fp32 [N, K/32]) for a linear ('layers.0.mlp.up_proj[.weight]' or
        'lm_head')."""
        s = quant.stem(name)
        return quant.unpack_int4(self.tensor(s + ".q4")), self.tensor(s + ".scale")

    def ple_table(self) -> np.memmap:
        cfg = self.config
        return np.memmap(self.path / PLE_TABLE, dtype=np.int8, mode="r", shape=(cfg.vocab_size, cfg.ple_width))

    def ple_scale(self) -> np.memmap:
        return np.memmap(self.path / PLE_SCALE, dtype=np.float32, mode="r", shape=(self.config.vocab_size,))

    # -- tokenizer --
    @property
    def tokenizer_dir(self) -> Path:
        return self.path / TOKENIZER_DIR

    def tokenizer(self):
        return load_tokenizer(self.tokenizer_dir / "tokenizer.json")

    @property
    def chat_template(self) -> str | None:
        p = self.tokenizer_dir / "chat_template.jinja"
        if p.is_file():
            return p.read_text()
        tc = self.tokenizer_dir / "tokenizer_config.json"
        if tc.is_file():
            t = read_json(tc)
            t = t.get("chat_template") if isinstance(t, dict) else None
            return t if isinstance(t, str) else None
        return None

    @property
    def generation_config(self) -> dict:
        p = self.tokenizer_dir / "generation_config.json"
        return read_generation_config(p) if p.is_file() else {}


# ---- inspect --------------------------------------------------------------------------------------------

def config_summary(cfg: ModelConfig) -> dict[str, Any]:
    full = [s.index for s in cfg.layers if not s.is_sliding]
    return {"variant": cfg.variant, "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
            "num_layers": cfg.num_layers, "num_heads": cfg.num_heads, "num_kv_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_dim, "global_head_dim": cfg.global_head_dim, "ple_dim": cfg.ple_dim,
            "intermediate_size": cfg.intermediate_size, "double_wide_mlp": cfg.double_wide_mlp,
            "sliding_window": cfg.sliding_window, "full_attention_layers": full,
            "num_kv_shared_layers": cfg.num_kv_shared_layers, "kv_layers": cfg.kv_layers,
            "max_position_embeddings": cfg.max_position_embeddings}


def byte_counts(cfg: ModelConfig) -> dict[str, Any]:
    """Bytes of the bundle's parts and the bandwidth model's bytes per decode step (DESIGN §6), assuming fp16
    scales (the bundle's actual sizes are reported next to this by inspect)."""
    lin = sum(n * k // 2 + n * k // quant.BLOCK * 2 for n, k in cfg.linear_shapes().values())
    V, H = cfg.vocab_size, cfg.hidden_size
    head = V * H // 2 + V * H // quant.BLOCK * 2
    kv_per_pos = sum(2 * cfg.num_kv_heads * s.head_dim * 2 for s in cfg.layers if s.owns_kv)  # K and V, fp16
    step = lin + head + H * 2 + cfg.ple_width + 4
    return {"int4_linear_bytes": lin, "lm_head_bytes": head, "embedding_bytes": V * H * 2,
            "ple_table_bytes": V * cfg.ple_width + 4 * V,
            "decode_step_bytes": step,
            "decode_step_note": "int4 linears + int4 head + one embedding row + one PLE row; add "
                                "kv_bytes_per_position x context for the KV cache",
            "kv_bytes_per_position": kv_per_pos}


def _param_counts(cfg: ModelConfig) -> dict[str, int]:
    p = cfg.param_count()
    p["total"] = sum(p.values())
    return p


def inspect(path: str | Path, progress: bool = False) -> dict[str, Any]:
    """What a bundle or a checkpoint holds: config, parameter and byte counts, lattice report (computed on the
    fly, streaming, for a checkpoint)."""
    p = Path(path)
    if (p / "manifest.json").is_file():
        b = Bundle.open(p, verify_hashes=True)  # inspecting is checking: every file's sha256 too
        lat = b.lattice
        actual = {rel: e["size"] for rel, e in b.manifest["files"].items()}
        counts = byte_counts(b.config)
        st = b._weights()
        scale_bytes = {k: st.get_slice(k).get_dtype() for k in st.keys() if k.endswith(".scale")}
        fp32_scales = sorted(k for k, dt in scale_bytes.items() if dt == "F32")
        return {"kind": "bundle", "path": str(p), "format_version": b.manifest["format_version"],
                "config": config_summary(b.config), "max_context": b.max_context, "params": _param_counts(b.config),
                "bytes": counts, "files": actual, "total_bytes": sum(actual.values()),
                "fp32_scale_tensors": fp32_scales,
                "lattice": {"summary": lat.get("summary", {}), "tensors": lat.get("tensors", {})},
                "oracle": b.oracle, "source": b.manifest.get("source"),
                "created": b.manifest.get("created"), "tool_version": b.manifest.get("tool_version")}
    if p.is_dir() and not (p / "config.json").is_file():
        raise Gemma4Error(f"{p}: neither a bundle (no manifest.json) nor a checkpoint (no config.json)")
    ckpt = Checkpoint.open(p).validate()
    cfg = ckpt.config
    report = quant.LatticeReport()
    total = sum(math.prod(ckpt.shape(n)) * 2 for n in [*cfg.linear_shapes(), "embed_tokens.weight",
                                                       "embed_tokens_per_layer.weight"])
    bar = progress_bar(total, "inspect", progress)
    try:
        for name in cfg.linear_shapes():
            t = ckpt.lazy(name)
            quant.linear_entries(name, t, report)
            bar(math.prod(t.shape) * 2)
        quant.linear_entries("lm_head.weight", ckpt.lazy("embed_tokens.weight"), report)
        for q, _ in quant.ple_table_chunks(ckpt.lazy("embed_tokens_per_layer.weight"), report):
            bar(q.numel() * 2)
    finally:
        bar(None)
    return {"kind": "checkpoint", "path": str(ckpt.path), "prefix": ckpt.prefix,
            "files": {f.name: f.stat().st_size for f in ckpt.files}, "total_bytes": ckpt.bytes,
            "dtype": str(ckpt.dtype("embed_tokens.weight")).removeprefix("torch."),
            "shared_kv_tensors": any(ckpt.has(n) for n in cfg.optional_shared_kv_names()),
            "config": config_summary(cfg), "params": _param_counts(cfg), "bytes": byte_counts(cfg),
            "lattice": report.to_dict()}


def format_inspect(info: dict[str, Any]) -> str:
    """Human-readable inspect output."""
    c = info["config"]
    lines = [f"{info['kind']}: {info['path']}",
             f"  model     {c['variant']}: H={c['hidden_size']} L={c['num_layers']} heads={c['num_heads']}/"
             f"{c['num_kv_heads']} head_dim={c['head_dim']}/{c['global_head_dim']} P={c['ple_dim']} "
             f"V={c['vocab_size']} window={c['sliding_window']}",
             f"            full layers {c['full_attention_layers']}, KV-shared layers from "
             f"{c['num_layers'] - c['num_kv_shared_layers']} ({c['num_kv_shared_layers']}), "
             f"KV cache slots {len(c['kv_layers'])}"]
    if info["kind"] == "bundle":
        lines.append(f"  context   max {info['max_context']}")
    else:
        lines.append(f"  source    prefix '{info['prefix']}', {info['dtype']}, shared-layer k/v tensors "
                     f"{'present' if info['shared_kv_tensors'] else 'pruned'}")
    pr = info["params"]
    lines.append(f"  params    linear {pr['linear'] / 1e6:,.1f} M, embedding {pr['embed_tokens'] / 1e6:,.1f} M, "
                 f"PLE table {pr['embed_per_layer'] / 1e6:,.1f} M, norms {pr['norms'] / 1e3:,.1f} K")
    b = info["bytes"]
    lines.append(f"  bytes     int4 linears {_fmt(b['int4_linear_bytes'])}, lm_head {_fmt(b['lm_head_bytes'])}, "
                 f"embedding {_fmt(b['embedding_bytes'])}, PLE table {_fmt(b['ple_table_bytes'])}")
    lines.append(f"  decode    {_fmt(b['decode_step_bytes'])} per step + {b['kv_bytes_per_position']:,} B of KV "
                 "cache per context position")
    lines.append(f"  on disk   {_fmt(info['total_bytes'])}")
    s = info["lattice"].get("summary", {})
    if s:
        lines.append(f"  lattice   {s['exact_blocks']:,}/{s['blocks']:,} blocks exact "
                     f"({100 * s['exact_fraction']:.4f}%), worst relative error {s['worst_rel_err']:.3g}")
        off = s.get("off_lattice_tensors", [])
        tensors = info["lattice"].get("tensors", {})
        if off:
            lines.append(f"  off-lattice tensors ({len(off)}):")
            for n in off:
                t = tensors.get(n, {})
                lines.append(f"    {n}: {100 * t.get('exact_fraction', 0):.2f}% exact, worst rel err "
                             f"{t.get('worst_rel_err', 0):.3g}")
        else:
            lines.append("            every quantized tensor is on its lattice (QAT-clean)")
    if info["kind"] == "bundle":
        o = info.get("oracle")
        if o is None:
            lines.append("  oracle    none stored (converted with --no-oracle, or the reference did not fit)")
        else:
            ref = o.get("reference", {})
            lines.append(f"  oracle    {len(o.get('reference_ids', []))} greedy tokens of the {ref.get('dtype', '?')} "
                         f"{ref.get('library', '?')} {ref.get('version', '')} reference after a "
                         f"{len(o.get('prompt_ids', []))}-token prompt (`verify` checks them)")
    return "\n".join(lines)


def _fmt(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"
