"""Streaming reader of Hugging Face Gemma 4 checkpoints, plus the streaming safetensors writer.

A checkpoint is a directory with config.json and model.safetensors (or model.safetensors.index.json and its
shards). Tensors are read one at a time, or a range of rows at a time, with plain positioned reads: nothing is
memory-mapped for the life of the checkpoint, so reading a 16 GB model never holds more than the tensor asked
for (a long-lived mmap would leave every touched page in the process's RSS).

Names are canonical: the checkpoint's prefix (`model.language_model.` on the hub layout, `model.` text-only) is
stripped; vision/audio towers and anything else outside the prefix are ignored.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import signal
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from .config import ModelConfig, load_config
from .errors import Gemma4Error

HUB_PREFIX = "model.language_model."
TEXT_PREFIX = "model."
FLOAT_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
ST_DTYPES = {**FLOAT_DTYPES, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
             "I64": torch.int64, "F64": torch.float64, "BOOL": torch.bool}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                   "special_tokens_map.json", "tokenizer.model")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


# ---- small file helpers ----------------------------------------------------------------------------------

def read_json(path: Path) -> Any:
    """A JSON file's content; one-line Gemma4Error naming the file when it does not parse."""
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise Gemma4Error(f"{path}: not valid JSON ({str(e).splitlines()[0]})") from None


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 16 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


# ---- safetensors header ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype name, shape, absolute byte range in the file."""

    file: Path
    key: str  # name inside the file (with prefix)
    dtype: str  # safetensors dtype name, e.g. 'BF16'
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return ST_DTYPES.get(self.dtype)


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header against the file's size; one-line Gemma4Error when broken."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise Gemma4Error(f"{path}: truncated or corrupt safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise Gemma4Error(f"{path}: truncated or corrupt safetensors file (header of {n} bytes, "
                                  f"file has {size})")
            raw = f.read(n)
    except OSError as e:
        raise Gemma4Error(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError):
        raise Gemma4Error(f"{path}: truncated or corrupt safetensors file (header is not valid JSON)") from None
    base = 8 + n
    out: dict[str, TensorInfo] = {}
    data_end = 0
    for key, v in header.items():
        if key == "__metadata__":
            continue
        try:
            s, e = (int(x) for x in v["data_offsets"])
            info = TensorInfo(path, key, str(v["dtype"]), tuple(int(x) for x in v["shape"]), base + s, base + e)
        except (KeyError, TypeError, ValueError):
            raise Gemma4Error(f"{path}: corrupt safetensors header entry for tensor '{key}'") from None
        dt = info.torch_dtype
        if dt is not None and e - s != math.prod(info.shape) * dt.itemsize:
            raise Gemma4Error(f"{path}: corrupt safetensors header: tensor '{key}' has {e - s} bytes for shape "
                              f"{list(info.shape)} {info.dtype}")
        out[key] = info
        data_end = max(data_end, e)
    if base + data_end != size:
        raise Gemma4Error(f"{path}: truncated or corrupt safetensors file (header describes {base + data_end} "
                          f"bytes, file has {size})")
    return out


def _read_into(info: TensorInfo, start: int, out: torch.Tensor) -> torch.Tensor:
    buf = out.view(torch.uint8).numpy().reshape(-1)
    with open(info.file, "rb") as f:
        f.seek(start)
        got = f.readinto(memoryview(buf))
    if got != buf.nbytes:
        raise Gemma4Error(f"{info.file}: truncated safetensors file (tensor '{info.key}' ends early)")
    return out


# ---- the checkpoint -------------------------------------------------------------------------------------

class LazyTensor:
    """A checkpoint tensor not yet read: `.shape`, `.dtype`, and row slicing `t[a:b]` (reads only those rows).

    quant.linear_entries / quant.ple_table_chunks work on it directly, so a [262144, 10752] table streams."""

    def __init__(self, info: TensorInfo, name: str):
        self.info, self.name = info, name
        self.shape = torch.Size(info.shape)
        self.dtype = info.torch_dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx: slice) -> torch.Tensor:
        if not isinstance(idx, slice) or idx.step not in (None, 1):
            raise TypeError("LazyTensor supports contiguous row slices only")
        r0, r1, _ = idx.indices(self.shape[0])
        r1 = max(r0, r1)
        row = math.prod(self.shape[1:]) * self.dtype.itemsize
        out = torch.empty((r1 - r0, *self.shape[1:]), dtype=self.dtype)
        _read_into(self.info, self.info.start + r0 * row, out)
        if not torch.isfinite(out).all():  # NaN/inf weights would convert, and verify, without a word
            raise Gemma4Error(f"{self.info.file}: tensor '{self.info.key}' has non-finite values (NaN/inf)")
        return out

    def read(self) -> torch.Tensor:
        return self[:]


class Checkpoint:
    """A Gemma 4 HF checkpoint directory, opened for streaming reads by canonical tensor name."""

    def __init__(self, path: Path, config: ModelConfig, tensors: dict[str, TensorInfo], prefix: str,
                 files: list[Path], source: str):
        self.path, self.config, self.prefix, self.files, self.source = path, config, prefix, files, source
        self._tensors = tensors

    # -- opening --
    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        """Open a local checkpoint directory, or download `org/name` from the hub (weights, configs, tokenizer)."""
        source = str(path)
        p = Path(path).expanduser()
        if not p.exists():
            if _looks_like_hub_id(source):
                p = _download(source)
            else:
                raise Gemma4Error(f"{source}: no such checkpoint directory")
        if p.is_file():
            p = p.parent if p.name in ("config.json", "model.safetensors") else p
        if not p.is_dir():
            raise Gemma4Error(f"{source}: not a checkpoint directory")
        config = load_config(p)
        files = _weight_files(p)
        raw: dict[str, TensorInfo] = {}
        for f in files:
            for key, info in _check_with_safetensors(f).items():
                if key in raw:
                    raise Gemma4Error(f"{p}: tensor '{key}' is in two shards ({raw[key].file.name} and {f.name})")
                raw[key] = info
        prefix = HUB_PREFIX if any(k.startswith(HUB_PREFIX) for k in raw) else TEXT_PREFIX
        tensors = {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}
        if prefix == TEXT_PREFIX:  # a text-only file never holds towers, but be strict about what we call ours
            tensors = {k: v for k, v in tensors.items() if not k.startswith(("vision_", "audio_", "embed_vision",
                                                                             "embed_audio"))}
        return cls(p, config, tensors, prefix, files, source)

    # -- tensors --
    def names(self) -> list[str]:
        return list(self._tensors)

    def has(self, name: str) -> bool:
        return name in self._tensors

    def info(self, name: str) -> TensorInfo:
        if name not in self._tensors:
            raise Gemma4Error(f"{self.path}: missing tensor '{self.prefix}{name}' (in {self._where()})")
        return self._tensors[name]

    def dtype(self, name: str) -> torch.dtype | None:
        return self.info(name).torch_dtype

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def lazy(self, name: str) -> LazyTensor:
        info = self.info(name)
        if info.dtype not in FLOAT_DTYPES:
            raise Gemma4Error(f"{info.file}: tensor '{info.key}' has dtype {info.dtype}, expected BF16, F16 or F32")
        return LazyTensor(info, name)

    def get(self, name: str) -> torch.Tensor:
        """The whole tensor, read now (one tensor in RAM)."""
        return self.lazy(name).read()

    def _where(self) -> str:
        return ", ".join(f.name for f in self.files)

    # -- checks --
    def required_shapes(self) -> dict[str, tuple[int, ...]]:
        cfg = self.config
        shapes: dict[str, tuple[int, ...]] = {
            "embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size),
            "embed_tokens_per_layer.weight": (cfg.vocab_size, cfg.ple_width),
        }
        shapes.update(cfg.linear_shapes())
        shapes.update(cfg.norm_shapes())
        return shapes

    def validate(self) -> Checkpoint:
        """Every required tensor present, shaped as the config says, in a float dtype; optional shared-layer
        k/v tensors shape-checked. Raises one-line Gemma4Error naming the tensor and file."""
        optional = self.config.optional_shared_kv_names()
        for name, shape in self.required_shapes().items():
            self._check(name, shape)
        for name, shape in optional.items():
            if self.has(name):
                self._check(name, shape)
        return self

    def _check(self, name: str, shape: tuple[int, ...]) -> None:
        info = self.info(name)
        if info.shape != tuple(shape):
            raise Gemma4Error(f"{info.file}: tensor '{info.key}' has shape {list(info.shape)}, expected "
                              f"{list(shape)}")
        if info.dtype not in FLOAT_DTYPES:
            raise Gemma4Error(f"{info.file}: tensor '{info.key}' has dtype {info.dtype}, expected BF16, F16 or F32")

    # -- side files --
    def file(self, name: str) -> Path | None:
        p = self.path / name
        return p if p.is_file() else None

    @property
    def tokenizer_files(self) -> dict[str, Path]:
        """Tokenizer, chat template and generation config files present in the checkpoint directory."""
        return {n: self.path / n for n in TOKENIZER_FILES if (self.path / n).is_file()}

    @property
    def tokenizer_path(self) -> Path | None:
        return self.file("tokenizer.json")

    @property
    def chat_template_path(self) -> Path | None:
        return self.file("chat_template.jinja")

    @property
    def generation_config_path(self) -> Path | None:
        return self.file("generation_config.json")

    @property
    def bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def _looks_like_hub_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "~")) and " " not in s


def _download(hub_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(hub_id, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # network, auth, not found: one line naming the id
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise Gemma4Error(f"{hub_id}: no such directory, and cannot download it from the Hugging Face hub "
                          f"({type(e).__name__}"
                          f"{': ' + msg[:200] if msg else ''})") from None


def _weight_files(p: Path) -> list[Path]:
    index = p / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise Gemma4Error(f"{index}: corrupt index (expected JSON with a 'weight_map' object)") from None
        for name, s in weight_map.items():  # a plain file name: nothing is read from outside the checkpoint
            if not isinstance(s, str) or s in ("", "..") or Path(s).name != s:
                raise Gemma4Error(f"{index}: weight_map entry for '{name}' is {s!r}, expected a shard file name "
                                  "in the checkpoint directory")
        shards = sorted(set(weight_map.values()))
        for s in shards:
            if not (p / s).is_file():
                raise Gemma4Error(f"{index}: shard '{s}' listed in the index is missing")
        return [p / s for s in shards]
    single = p / "model.safetensors"
    if single.is_file():
        return [single]
    raise Gemma4Error(f"{p}: no model.safetensors or model.safetensors.index.json")


def _check_with_safetensors(path: Path) -> dict[str, TensorInfo]:
    """`read_header`, then the safetensors library's own validation of the header (it only maps the file,
    touching no tensor data). Returns the header's tensors."""
    from safetensors import SafetensorError, safe_open

    infos = read_header(path)  # our checks first: clearer messages
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise Gemma4Error(f"{path}: truncated or corrupt safetensors file ({first})") from None
    return infos


# ---- streaming safetensors writer -----------------------------------------------------------------------

class SafetensorsWriter:
    """Write a safetensors file tensor by tensor, in a declared order, holding at most one tensor (or one row
    chunk of it, with write_part) in memory.

    `specs` lists (name, dtype, shape) ahead. When every dtype is known ahead the header goes first and the
    sha256 is computed while writing. A dtype of None means "decided when the tensor arrives" (quant scales are
    fp16 only where exact): then room for the header is reserved, data is written after it, and at close the
    header is written into the reserved room (padded with spaces, as the format allows) and the file is re-read
    once for its sha256."""

    def __init__(self, path: Path, specs: list[tuple[str, torch.dtype | None, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None, hash: bool = True):
        self.path = Path(path)
        self.specs = [(n, dt, tuple(int(x) for x in s)) for n, dt, s in specs]
        self.metadata = metadata
        self.sha = hashlib.sha256() if hash else None
        self.written: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
        self._part: tuple[str, torch.dtype, int] | None = None  # tensor being written: name, dtype, bytes left
        self._deferred = any(dt is None for _, dt, _ in self.specs)
        self.f: BinaryIO = open(self.path, "wb")
        if self._deferred:
            worst = [(n, dt or torch.float64, s) for n, dt, s in self.specs]  # 8-byte dtype: an upper bound
            self._room = len(self._header(worst)) + 64
            self._room += -self._room % 8
            self.f.seek(8 + self._room)
            self.size = 8 + self._room
        else:
            header = self._header(self.specs)
            self._emit(struct.pack("<Q", len(header)))
            self._emit(header)
            self.size = 8 + len(header)

    def _header(self, specs: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> bytes:
        h: dict[str, Any] = {}
        if self.metadata:
            h["__metadata__"] = self.metadata
        off = 0
        for name, dt, shape in specs:
            n = math.prod(shape) * dt.itemsize
            h[name] = {"dtype": ST_NAMES[dt], "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
        raw = json.dumps(h, separators=(",", ":")).encode()
        return raw + b" " * (-len(raw) % 8)

    def _emit(self, b: bytes | memoryview) -> None:
        if self.sha is not None and not self._deferred:
            self.sha.update(b)
        self.f.write(b)

    def write(self, name: str, t: torch.Tensor) -> None:
        """Write a whole tensor (the next declared one)."""
        self.write_part(name, t)
        if self._part is not None:
            raise ValueError(f"{self.path.name}: tensor {name!r} is incomplete ({self._part[2]} bytes missing)")

    def write_part(self, name: str, t: torch.Tensor) -> None:
        """Write the next rows of tensor `name`; parts must cover its declared shape in order."""
        if self._part is None:
            i = len(self.written)
            if i >= len(self.specs) or self.specs[i][0] != name:
                want = self.specs[i][0] if i < len(self.specs) else "nothing"
                raise ValueError(f"{self.path.name}: got tensor {name!r}, expected {want!r}")
            _, dt, shape = self.specs[i]
            if dt is not None and t.dtype != dt:
                raise ValueError(f"{self.path.name}: tensor {name!r} is {t.dtype}, declared {dt}")
            self._part = (name, t.dtype, math.prod(shape) * t.element_size())
        pname, pdt, left = self._part
        if pname != name or t.dtype != pdt or tuple(t.shape[1:]) != self.specs[len(self.written)][2][1:]:
            raise ValueError(f"{self.path.name}: part of {name!r} ({t.dtype} {list(t.shape)}) does not continue "
                             f"{pname!r}")
        t = t.detach().contiguous()
        n = t.numel() * t.element_size()
        if n > left:
            raise ValueError(f"{self.path.name}: tensor {name!r} gets more data than its declared shape")
        if n:
            self._emit(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self.size += n
        if n == left:
            self.written.append((name, pdt, self.specs[len(self.written)][2]))
            self._part = None
        else:
            self._part = (pname, pdt, left - n)

    def close(self) -> str | None:
        """Finish the file; returns its sha256 hex digest (None when hashing is off)."""
        if len(self.written) != len(self.specs):
            raise ValueError(f"{self.path.name}: {len(self.specs) - len(self.written)} declared tensors not written")
        if self._deferred:
            header = self._header(self.written)
            header += b" " * (self._room - len(header))
            self.f.seek(0)
            self.f.write(struct.pack("<Q", len(header)) + header)
            self.f.close()
            if self.sha is None:
                return None
            self.sha = hashlib.sha256()
            with open(self.path, "rb") as f:
                while chunk := f.read(1 << 24):
                    self.sha.update(chunk)
        else:
            self.f.close()
        return self.sha.hexdigest() if self.sha is not None else None

    def abort(self) -> None:
        if not self.f.closed:
            self.f.close()


# ---- atomic output and progress ------------------------------------------------------------------------

def refuse_overwriting_source(out: str | Path, src: str | Path) -> None:
    """An output that is the source, a folder holding it, or a path inside it would delete or change the source
    when written (--force replaces a directory): refused whatever the flags."""
    o, s = Path(out).resolve(), Path(src).resolve()
    if o == s or o in s.parents or s in o.parents:
        raise Gemma4Error(f"{out}: the output would replace or write into the source {src}; choose another path")


def write_text_atomic(path: Path, text: str) -> None:
    """Write a temp file next to `path` (`.NAME.tmp-PID`), then rename it over: `path` is complete or untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_dir(out: Path, body: Callable[[Path], None], force: bool = False, marker: str | None = None) -> Path:
    """Run body(tmp) on a fresh temp dir next to out, then rename it to out. On any failure (Ctrl-C and
    SIGTERM included) the temp dir, and any parent folder this call made, are removed and out is untouched; an
    existing out is replaced only after success, and with `force` only where it is empty or holds `marker` (a
    file this kind of output always has: --force replaces an earlier output, never someone's folder). A symlink
    at out is replaced, its target left alone. Temp dirs left by killed runs (their pid gone) are removed first."""
    out = Path(out)
    if out.exists() and not force:
        raise Gemma4Error(f"{out}: already exists (use --force to overwrite)")
    if (force and marker and out.is_dir() and not out.is_symlink() and not (out / marker).exists()
            and any(out.iterdir())):
        raise Gemma4Error(f"{out}: a folder that is not an earlier output of this command (no {marker}); --force "
                          "replaces only those: choose another path")
    made = [d for d in (out.parent, *out.parent.parents) if not d.exists()]  # deepest first
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        with _sigterm_as_interrupt():
            body(tmp)
            if out.exists() or out.is_symlink():
                old = out.parent / f"{out.name}.old-{os.getpid()}"
                out.rename(old)
                tmp.rename(out)
                old.unlink() if old.is_symlink() or not old.is_dir() else shutil.rmtree(old)
            else:
                tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in made:  # the parent folders made above, while they stay empty
            try:
                d.rmdir()
            except OSError:
                break
        raise
    return out


def _remove_stale(out: Path) -> None:
    import psutil

    for d in out.parent.glob(f"{out.name}.tmp-*"):
        pid = d.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not psutil.pid_exists(int(pid)) and d.is_dir():
            shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM raises KeyboardInterrupt, so cleanup runs as for Ctrl-C (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    prev = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, prev)


def progress_bar(total: int, desc: str, enabled: bool) -> Callable[[int | None], None]:
    """A tqdm byte counter on stderr; call with n bytes, or None to close."""
    if not enabled:
        return lambda n: None
    from tqdm import tqdm

    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, leave=False,
               disable=None)  # disable=None: off when stderr is not a TTY

    def update(n: int | None) -> None:
        if n is None:
            bar.close()
        else:
            bar.update(n)

    return update
