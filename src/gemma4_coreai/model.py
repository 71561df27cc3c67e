"""The Gemma 4 text decoder as one plain torch module (gpt-fast style), reading bundle-format weights.

This is the only copy of the model math (DESIGN.md §2). The torch backend runs it eagerly on CPU/CUDA, the
Core AI export traces it (`torch.export`, static S=1 decode) and the CUDA fast path swaps strategies in: the
linear kernel (`Q4Linear.linear_fn`), the KV-cache write (`Attention.kv_write`) and stacked projections (the
layers' `projections`). To stay traceable, a step has no data-dependent Python control flow: positions, masks and
KV-cache writes are tensor ops on `start_pos`.

Shapes: batch is always 1. `input_ids` [1, S]; the KV cache is one unified pair of buffers
[num_kv_slots, 1, num_kv_heads, max_ctx, max_head_dim] (a sliding layer uses the first head_dim of the last
dim; a KV-shared layer reads the slot of its source layer, which ran earlier in the same step).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import FULL, SLIDING, LayerSpec, ModelConfig
from .errors import Gemma4Error
from .quant import q4_0_dequantize, stem, unpack_int4

ModelArgs = ModelConfig

PLE_MODES = ("provider", "tbl")
# How a Q4Linear keeps its weight: "dense" dequantizes once (fast, compute-dtype memory), "int8" keeps
# q [N, K] int8 + scales (what Core AI's constexpr_blockwise_shift_scale wants), "packed" keeps the bundle's
# uint8 nibbles [N, K/2] + scales (least memory; unpacked on every call).
LINEAR_STORAGE = ("dense", "int8", "packed")


# ---- math helpers (DESIGN.md §2) ---------------------------------------------------------------------------

def rms_norm(x: Tensor, weight: Tensor | None, eps: float, out_dtype: torch.dtype | None = None) -> Tensor:
    """HF Gemma4RMSNorm: fp32 `x * pow(mean(x^2) + eps, -0.5) * w` (w used as is, not 1+w), cast back."""
    xf = x.float()
    y = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if weight is not None:
        y = y * weight.float()
    return y.to(out_dtype or x.dtype)


def rope_inv_freq(spec: LayerSpec) -> Tensor:
    """HF's inv_freq for this layer type: the first `rope_angles` pairs rotate with exponent over the full
    head_dim ("default" when all pairs rotate, "proportional" otherwise), the rest get frequency 0."""
    hd, angles = spec.head_dim, spec.rope_angles
    exponent = torch.arange(0, 2 * angles, 2, dtype=torch.int64).to(torch.float) / hd
    inv_freq = 1.0 / (spec.rope_theta ** exponent)
    return torch.cat((inv_freq, torch.zeros(hd // 2 - angles, dtype=torch.float32)))


def rope_cos_sin(positions: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """positions [S] int -> cos, sin [S, head_dim] computed in fp32 (cat(freqs, freqs) layout), cast to dtype."""
    freqs = positions.float()[:, None] * inv_freq.float()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE on x [1, S, heads, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def last_row(t: Tensor, dim: int, index: Tensor | None) -> Tensor:
    """The last position along `dim`, kept as a size-1 dim: the final row, or row `index` (0-dim int tensor)."""
    return t.narrow(dim, t.shape[dim] - 1, 1) if index is None else t.index_select(dim, index.view(1))


def attention_mask(positions: Tensor, kv_len: int, sliding_window: int | None) -> Tensor:
    """bool [S, kv_len]: query at position q sees key k iff k <= q (and k > q - window on sliding layers).

    Causality also hides every cache entry past the written region (stale or zero), since it lies beyond q."""
    k = torch.arange(kv_len, device=positions.device)[None, :]
    q = positions[:, None]
    allowed = k <= q
    if sliding_window is not None:
        allowed = allowed & (k > q - sliding_window)
    return allowed


def attention(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor) -> Tensor:
    """GQA with score scale 1.0 and an fp32 softmax. q [1, Hq, S, D]; k, v [1, Hkv, T, D]; allowed [S, T].

    Query heads h*G .. h*G+G-1 share KV head h (HF's repeat_kv order); folding the group into the row dim
    avoids materialising repeated K/V."""
    _, hq, s, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    g = hq // hkv
    scores = (q.reshape(1, hkv, g * s, d) @ k.transpose(-1, -2)).float().view(1, hkv, g, s, t)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype).view(1, hkv, g * s, t)
    return (probs @ v).view(1, hq, s, d)


def softcap(logits: Tensor, cap: float | None) -> Tensor:
    """`cap * tanh(z / cap)` in fp32; no cap (None) leaves the logits as they are, in fp32."""
    if cap is None:
        return logits.float()
    return torch.tanh(logits.float() / cap) * cap


def dequantize_ple(q_rows: Tensor, scale: Tensor, ple_dim: int) -> Tensor:
    """int8 PLE rows [..., L*P] and their fp32 scales [...] -> fp32 `q * scale * sqrt(P)` (DESIGN.md §3)."""
    return q_rows.float() * scale.float().unsqueeze(-1) * math.sqrt(ple_dim)


def gather_ple_rows(table: Tensor, scale: Tensor, ids: Tensor, ple_dim: int) -> Tensor:
    """Rows of the int8 PLE table [V, L*P] (+ fp32 scale [V]) for ids [...] -> fp32 [..., L*P]."""
    flat = ids.reshape(-1).long()
    rows = dequantize_ple(table.index_select(0, flat), scale.index_select(0, flat), ple_dim)
    return rows.view(*ids.shape, -1)


# ---- the int4 linear: the one place that knows how weights are stored -----------------------------------

LinearFn = Callable[["Q4Linear", Tensor], Tensor]


def dequant_linear(m: Q4Linear, x: Tensor) -> Tensor:
    """Stock strategy: dequantize q * scale per 32-block (fp32 products) to x's dtype, then F.linear."""
    return F.linear(x, m.dequantized(x.dtype))


class Q4Linear(nn.Module):
    """y = x @ W.T with W on the q4_0 lattice (int4 q in [-8, 7], one scale per 32 inputs).

    `linear_fn(module, x)` computes the product. The class default is `dequant_linear`; other code swaps it
    per instance (`set_linear_fn(model, fn)`) or for every instance (`Q4Linear.linear_fn = staticmethod(fn)`):
    Core AI export substitutes `torch.ops.coreai.constexpr_blockwise_shift_scale` on `int8_weight()` and
    `scale`; the CUDA fast path an int4 GEMV kernel."""

    linear_fn: LinearFn = staticmethod(dequant_linear)

    def __init__(self, name: str, q4: Tensor, scale: Tensor, storage: str, dtype: torch.dtype,
                 device: torch.device | str = "cpu", grid: torch.dtype | None = None):
        super().__init__()
        self.name = name  # canonical stem, e.g. "layers.0.self_attn.q_proj"
        self.out_features, self.in_features = q4.shape[0], q4.shape[1] * 2
        self.storage = storage
        # The dtype the checkpoint held this weight in: dequantized values are rounded to it first. On a QAT
        # lattice that gives back the checkpoint's own values (q * d can need more bits than bf16 has, and the
        # checkpoint stores it rounded), so an fp32 model computes with exactly the fp32 reference's weights.
        self.grid = grid
        q4, scale = q4.to(device), scale.to(device)
        self.weight: Tensor | None
        self.q: Tensor | None
        self.q4: Tensor | None
        self.scale: Tensor | None
        if storage == "dense":
            self.register_buffer("weight", q4_0_dequantize(unpack_int4(q4), scale, dtype, grid))
            self.q = self.q4 = self.scale = None
        elif storage == "int8":
            self.register_buffer("q", unpack_int4(q4))
            self.register_buffer("scale", scale)
            self.weight = self.q4 = None
        elif storage == "packed":
            self.register_buffer("q4", q4)
            self.register_buffer("scale", scale)
            self.weight = self.q = None
        else:
            raise Gemma4Error(f"unknown linear storage {storage!r}: expected one of {', '.join(LINEAR_STORAGE)}")

    def int8_weight(self) -> Tensor:
        """q int8 [N, K] in [-8, 7] (not available with dense storage)."""
        if self.q is not None:
            return self.q
        if self.q4 is None:
            raise RuntimeError(f"{self.name}: dense storage keeps no int4 data")
        return unpack_int4(self.q4)

    def dequantized(self, dtype: torch.dtype) -> Tensor:
        """W [N, K] in `dtype`."""
        if self.weight is not None:
            return self.weight.to(dtype)
        return q4_0_dequantize(self.int8_weight(), self.scale, dtype, self.grid)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_fn(self, x)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, storage={self.storage}"


def _set_strategy(model: nn.Module, cls: type, attr: str, fn: Callable | None) -> None:
    """Set `attr` = fn on every `cls` instance in `model` (None restores the class default)."""
    for m in model.modules():
        if isinstance(m, cls):
            if fn is None:
                m.__dict__.pop(attr, None)
            else:
                setattr(m, attr, fn)


def set_linear_fn(model: nn.Module, fn: LinearFn | None) -> None:
    """Use `fn(module, x)` for every Q4Linear in `model` (None restores the class default)."""
    _set_strategy(model, Q4Linear, "linear_fn", fn)


# ---- the KV-cache write: the one place that knows how K/V land in the cache -----------------------------

KVWrite = Callable[[Tensor, int, Tensor, Tensor], None]


def index_copy_kv_write(cache: Tensor, slot: int, positions: Tensor, kv: Tensor) -> None:
    """Stock strategy: kv [1, kv_heads, S, hd] -> cache[slot, :, :, positions, :hd] through a slice view and
    `index_copy_`. The export-safe pattern (a rank-broadcast index_put crashes the Core AI runtime); under
    torch.compile, though, inductor functionalizes a write into a view as a copy of the whole cache. The cast is
    a no-op unless the cache is narrower than the compute dtype (Core AI export: fp16 cache)."""
    cache[slot][..., :kv.shape[-1]].index_copy_(2, positions, kv.to(cache.dtype))


def set_kv_write(model: nn.Module, fn: KVWrite | None) -> None:
    """Use `fn(cache, slot, positions, kv)` for every KV-cache write in `model` (None restores the default)."""
    _set_strategy(model, Attention, "kv_write", fn)


AttendFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def set_attention(model: nn.Module, fn: AttendFn | None) -> None:
    """Use `fn(q, k, v, allowed)` (same contract as `attention`) in every Attention of `model` (None: default)."""
    _set_strategy(model, Attention, "attend", fn)


# ---- modules ------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """Holds an fp32 weight (or none: v_norm); output in `out_dtype` (the compute dtype)."""

    def __init__(self, weight: Tensor | None, eps: float, out_dtype: torch.dtype):
        super().__init__()
        self.eps, self.out_dtype = eps, out_dtype
        self.weight: Tensor | None
        self.register_buffer("weight", None if weight is None else weight.float())

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps, self.out_dtype)


class _Builder:
    """Turns bundle entries into modules on the target device (keeps the constructors short)."""

    def __init__(self, cfg: ModelConfig, weights: Mapping[str, Tensor], dtype: torch.dtype, storage: str,
                 device: torch.device, grid: torch.dtype | None = None):
        self.cfg, self.weights, self.dtype, self.storage, self.device = cfg, weights, dtype, storage, device
        self.grid = grid

    def linear(self, name: str) -> Q4Linear:
        s = stem(name)
        return Q4Linear(s, _tensor(self.weights, s + ".q4"), _tensor(self.weights, s + ".scale"), self.storage,
                        self.dtype, self.device, self.grid)

    def norm(self, name: str | None) -> RMSNorm:
        w = None if name is None else _tensor(self.weights, name).to(self.device)
        return RMSNorm(w, self.cfg.rms_norm_eps, self.dtype)


def _tensor(weights: Mapping[str, Tensor], key: str) -> Tensor:
    try:
        t = weights[key]
    except KeyError:
        raise Gemma4Error(f"weights: missing tensor {key!r}") from None
    return t if isinstance(t, Tensor) else torch.as_tensor(t)


class Attention(nn.Module):
    """`kv_write(cache, slot, positions, kv)` stores this step's K/V; the class default is `index_copy_kv_write`,
    swapped per instance with `set_kv_write` (the CUDA fast path writes with an in-place scatter). `attend(q, k, v,
    allowed)` is `attention` unless swapped with `set_attention` (the fast path's prefill uses a fused kernel)."""

    kv_write: KVWrite = staticmethod(index_copy_kv_write)
    attend: AttendFn = staticmethod(attention)

    def __init__(self, spec: LayerSpec, b: _Builder):
        super().__init__()
        p = f"layers.{spec.index}.self_attn."
        self.head_dim, self.slot = spec.head_dim, spec.kv_slot
        self.q_proj = b.linear(p + "q_proj.weight")
        self.q_norm = b.norm(p + "q_norm.weight")
        self.o_proj = b.linear(p + "o_proj.weight")
        # KV-shared layers have no projections: they attend over their source layer's slot.
        self.owns_kv = spec.owns_kv
        if spec.owns_kv:
            self.k_proj = b.linear(p + "k_proj.weight")
            self.v_proj = b.linear(p + "v_proj.weight")
            self.k_norm = b.norm(p + "k_norm.weight")
            self.v_norm = b.norm(None)

    def projections(self, x: Tensor) -> tuple[Tensor, ...]:
        """(q, k, v) = x @ W.T per projection, or (q,) on a KV-shared layer (the fast path stacks the weights
        into one product: fast.stack_projections)."""
        if self.owns_kv:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return (self.q_proj(x),)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, allowed: Tensor, positions: Tensor,
                k_cache: Tensor, v_cache: Tensor, kv_len: int | None) -> Tensor:
        s, hd = x.shape[1], self.head_dim
        proj = self.projections(x)
        q = apply_rope(self.q_norm(proj[0].view(1, s, -1, hd)), cos, sin).transpose(1, 2)
        if self.owns_kv:
            k = apply_rope(self.k_norm(proj[1].view(1, s, -1, hd)), cos, sin).transpose(1, 2)
            v = self.v_norm(proj[2].view(1, s, -1, hd)).transpose(1, 2)
            self.kv_write(k_cache, self.slot, positions, k)
            self.kv_write(v_cache, self.slot, positions, v)
        keys = k_cache[self.slot][:, :, :kv_len, :hd].to(q.dtype)
        values = v_cache[self.slot][:, :, :kv_len, :hd].to(q.dtype)
        out = self.attend(q, keys, values, allowed)
        return self.o_proj(out.transpose(1, 2).reshape(1, s, -1))


class MLP(nn.Module):
    def __init__(self, spec: LayerSpec, b: _Builder):
        super().__init__()
        p = f"layers.{spec.index}.mlp."
        self.gate_proj = b.linear(p + "gate_proj.weight")
        self.up_proj = b.linear(p + "up_proj.weight")
        self.down_proj = b.linear(p + "down_proj.weight")

    def projections(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(gate, up) = x @ W.T per projection (stacked into one product on the fast path)."""
        return self.gate_proj(x), self.up_proj(x)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.projections(x)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class DecoderLayer(nn.Module):
    def __init__(self, spec: LayerSpec, b: _Builder):
        super().__init__()
        p = f"layers.{spec.index}."
        self.kind = spec.kind
        self.dtype = b.dtype
        self.input_layernorm = b.norm(p + "input_layernorm.weight")
        self.self_attn = Attention(spec, b)
        self.post_attention_layernorm = b.norm(p + "post_attention_layernorm.weight")
        self.pre_feedforward_layernorm = b.norm(p + "pre_feedforward_layernorm.weight")
        self.mlp = MLP(spec, b)
        self.post_feedforward_layernorm = b.norm(p + "post_feedforward_layernorm.weight")
        self.per_layer_input_gate = b.linear(p + "per_layer_input_gate.weight")
        self.per_layer_projection = b.linear(p + "per_layer_projection.weight")
        self.post_per_layer_input_norm = b.norm(p + "post_per_layer_input_norm.weight")
        # In the compute dtype, as HF's model.to(dtype) leaves it.
        self.register_buffer("layer_scalar", _tensor(b.weights, p + "layer_scalar").to(b.device, b.dtype))

    def forward(self, x: Tensor, ple: Tensor, cos: Tensor, sin: Tensor, allowed: Tensor, positions: Tensor,
                k_cache: Tensor, v_cache: Tensor, kv_len: int | None) -> Tensor:
        # x is the residual stream (fp32 when computing in fp16); every branch input is in the compute dtype.
        h = self.self_attn(self.input_layernorm(x), cos, sin, allowed, positions, k_cache, v_cache, kv_len)
        x = x + self.post_attention_layernorm(h)
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        h = F.gelu(self.per_layer_input_gate(x.to(self.dtype)), approximate="tanh") * ple
        x = x + self.post_per_layer_input_norm(self.per_layer_projection(h))
        return x * self.layer_scalar


class Gemma4Model(nn.Module):
    """Gemma 4 text decoder with its preallocated KV cache.

    `weights`: bundle entries (INTERNALS.md): `<stem>.q4`/`<stem>.scale` per linear, `lm_head.q4/.scale`, fp32
    norms and layer scalars, 16-bit `embed_tokens.weight`. `ple_mode`: "provider" (the caller passes
    `ple_rows`) or "tbl" (the int8 `ple_table` [V, L*P] + fp32 `ple_scale` [V] are resident buffers).
    `kv_dtype`: the KV cache dtype (default: `dtype`). `weight_grid`: the source checkpoint's dtype; linears
    dequantize through it (`Q4Linear.grid`; None: q * d straight to `dtype`)."""

    def __init__(self, cfg: ModelConfig, weights: Mapping[str, Tensor], *, dtype: torch.dtype = torch.float32,
                 ple_mode: str = "provider", max_context: int = 4096, linear_storage: str = "dense",
                 ple_table: Tensor | None = None, ple_scale: Tensor | None = None,
                 device: torch.device | str = "cpu", kv_dtype: torch.dtype | None = None,
                 weight_grid: torch.dtype | None = None):
        super().__init__()
        if ple_mode not in PLE_MODES:
            raise Gemma4Error(f"unknown ple_mode {ple_mode!r}: expected one of {', '.join(PLE_MODES)}")
        if linear_storage not in LINEAR_STORAGE:
            raise Gemma4Error(f"unknown linear storage {linear_storage!r}: expected one of "
                              f"{', '.join(LINEAR_STORAGE)}")
        device = torch.device(device)
        self.cfg, self.ple_mode, self.max_context = cfg, ple_mode, max_context
        self.compute_dtype = dtype
        # The residual stream (H floats per token: free) stays fp32 in half precision: fp16 overflows on it, and
        # bf16 rounding over every residual add measurably moves logits. Branch inputs are in `dtype`.
        self.residual_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        b = _Builder(cfg, weights, dtype, linear_storage, device, weight_grid)

        # HF: sqrt(H) as an fp32 constant cast to the compute dtype (50.5 in bf16).
        self.embed_scale = float(torch.tensor(math.sqrt(cfg.hidden_size)).to(dtype))
        self.register_buffer("embed_tokens", _tensor(weights, "embed_tokens.weight").to(device))
        self.per_layer_model_projection = b.linear("per_layer_model_projection.weight")
        self.per_layer_projection_norm = b.norm("per_layer_projection_norm.weight")
        self.ple_table: Tensor | None
        self.ple_scale: Tensor | None
        if ple_mode == "tbl":
            if ple_table is None or ple_scale is None:
                raise Gemma4Error("ple_mode 'tbl' needs ple_table and ple_scale")
            self.register_buffer("ple_table", torch.as_tensor(ple_table).to(device))
            self.register_buffer("ple_scale", torch.as_tensor(ple_scale).float().to(device))
        else:
            self.ple_table = self.ple_scale = None

        self.layers = nn.ModuleList(DecoderLayer(spec, b) for spec in cfg.layers)
        self.norm = b.norm("norm.weight")
        self.lm_head = b.linear("lm_head.weight")

        for kind in (SLIDING, FULL):
            spec = next((s for s in cfg.layers if s.kind == kind), None)
            inv = rope_inv_freq(spec) if spec is not None else torch.zeros(1)
            self.register_buffer(f"inv_freq_{kind.split('_')[0]}", inv.to(device), persistent=False)
        kv_shape = (cfg.num_kv_slots, 1, cfg.num_kv_heads, max_context, cfg.max_head_dim)
        kv_dtype = kv_dtype or dtype  # narrower than dtype only for Core AI export (fp32 compute, fp16 cache)
        self.register_buffer("k_cache", torch.zeros(kv_shape, dtype=kv_dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(kv_shape, dtype=kv_dtype, device=device), persistent=False)

    def embed(self, input_ids: Tensor) -> Tensor:
        """Token embedding rows [1, S, H] in the table's dtype (the CUDA fast path may swap this per instance)."""
        return F.embedding(input_ids.long(), self.embed_tokens)

    def q4_linears(self) -> Iterator[tuple[str, Q4Linear]]:
        """(canonical stem, module) for every int4 linear: what a linear strategy prepares for."""
        for m in self.modules():
            if isinstance(m, Q4Linear):
                yield m.name, m

    def reset_cache(self) -> None:
        self.k_cache.zero_()
        self.v_cache.zero_()

    def per_layer_inputs(self, input_ids: Tensor, x0: Tensor, ple_rows: Tensor | None) -> Tensor:
        """PLE for every layer, [1, S, L, P]: `(RMSNorm_P((x0 @ W.T) * H^-0.5) + tok) * 2^-0.5`."""
        cfg, s = self.cfg, input_ids.shape[1]
        if ple_rows is None:
            if self.ple_table is None:
                raise Gemma4Error("ple_mode 'provider' needs ple_rows [1, S, L, P] from the caller")
            ple_rows = gather_ple_rows(self.ple_table, self.ple_scale, input_ids, cfg.ple_dim)
        tok = ple_rows.reshape(1, s, cfg.num_layers, cfg.ple_dim).to(self.compute_dtype)
        ctx = self.per_layer_model_projection(x0) * cfg.hidden_size ** -0.5
        ctx = self.per_layer_projection_norm(ctx.view(1, s, cfg.num_layers, cfg.ple_dim))
        return (ctx + tok) * 2.0 ** -0.5

    def forward(self, input_ids: Tensor, start_pos: Tensor, ple_rows: Tensor | None = None, *,
                kv_len: int | None = None, last_only: bool = False, last_index: Tensor | None = None) -> Tensor:
        """input_ids [1, S] int, start_pos 0-dim/[1] int -> fp32 logits [1, S, V] after the softcap.

        Writes this step's K/V at positions start_pos .. start_pos+S-1. `kv_len` (a Python int >= start_pos+S)
        limits attention to the first kv_len cache entries (eager speed-up; None = the whole cache, as traced);
        `last_only` returns only the last position's logits ([1, 1, V]), and then the KV-shared layers (which
        write no K/V, so nothing later needs their other positions) run on the last position only; `last_index`
        (0-dim int tensor, with `last_only`) makes row `last_index` the last one, for inputs padded at the end to a
        fixed length (the padding's K/V lands in cache slots that a later step overwrites before it reads them)."""
        cfg, dt = self.cfg, self.compute_dtype
        s = input_ids.shape[1]
        positions = start_pos.reshape(1).long() + torch.arange(s, device=input_ids.device)
        t = self.max_context if kv_len is None else kv_len

        x0 = self.embed(input_ids).to(dt) * self.embed_scale
        ple = self.per_layer_inputs(input_ids, x0, ple_rows)
        rope = {SLIDING: rope_cos_sin(positions, self.inv_freq_sliding, dt),
                FULL: rope_cos_sin(positions, self.inv_freq_full, dt)}
        masks = {SLIDING: attention_mask(positions, t, cfg.sliding_window), FULL: attention_mask(positions, t, None)}

        x = x0.to(self.residual_dtype)
        cut = cfg.first_shared_layer if last_only and s > 1 else None
        for i, layer in enumerate(self.layers):
            if i == cut:  # HF's _maybe_slice_kv_shared_inputs
                x, ple = last_row(x, 1, last_index), last_row(ple, 1, last_index)
                positions = last_row(positions, 0, last_index)
                rope = {kind: (last_row(cos, 0, last_index), last_row(sin, 0, last_index))
                        for kind, (cos, sin) in rope.items()}
                masks = {kind: last_row(mask, 0, last_index) for kind, mask in masks.items()}
            cos, sin = rope[layer.kind]
            x = layer(x, ple[:, :, i], cos, sin, masks[layer.kind], positions, self.k_cache, self.v_cache, kv_len)
        if last_only and x.shape[1] > 1:  # (after the cut it is one row already)
            x = last_row(x, 1, last_index)
        return softcap(self.lm_head(self.norm(x)), cfg.final_logit_softcap)
