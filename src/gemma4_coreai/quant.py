"""Quantization: q4_0 on the exact QAT lattice, int8 per-row for the PLE table, and the lattice report.

q4_0: blocks of 32 consecutive weights along the input dimension; `d = m / -8` where m is the block's signed
value of largest magnitude; `q = clamp(round(w / d), -8, 7)`; `w ~ d * q`. On a QAT checkpoint every block
already lies on such a lattice and this reproduces it bit for bit where the scale has at most the checkpoint
dtype's significant bits (`d` is then an exact power-of-two division of a value the checkpoint holds);
`refine_scales` finds the scale of blocks stored from wider (fp16, fp32) scales.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from .config import ModelConfig

BLOCK = 32
Q4_MIN, Q4_MAX = -8, 7


def q4_0_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] (any float dtype, K % 32 == 0) -> (q int8 [N, K] in [-8, 7], d fp32 [N, K/32])."""
    n, k = w.shape
    if k % BLOCK:
        raise ValueError(f"input dimension {k} is not a multiple of {BLOCK}")
    blocks = w.to(torch.float32, copy=True).reshape(n, k // BLOCK, BLOCK)  # a copy: divided in place below
    m = _signed_absmax(blocks)
    d = m / -8.0
    safe = torch.where(d == 0, torch.ones_like(d), d)  # an all-zero block: 0 / 1 = 0 gives q = 0
    q = blocks.div_(safe).round_().clamp_(Q4_MIN, Q4_MAX)
    return q.to(torch.int8).reshape(n, k), d.squeeze(-1)


def _signed_absmax(blocks: torch.Tensor) -> torch.Tensor:
    """[..., B] -> [..., 1]: each block's first value of largest magnitude, sign kept (as llama.cpp does).

    One min/max pass decides every block except those holding both +a and -a as extremes; only those few
    go through argmax to find which comes first."""
    mn, mx = torch.aminmax(blocks, dim=-1, keepdim=True)
    m = torch.where(mx >= -mn, mx, mn)
    tie = (mx == -mn) & (mx != 0)
    if tie.any():
        sub = blocks[tie.squeeze(-1)]
        m[tie] = torch.gather(sub, -1, sub.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)
    return m


# significand bits (implicit bit included) and smallest subnormal of the 16-bit checkpoint dtypes
_SIGNIFICAND = {torch.bfloat16: (8, 2.0 ** -133), torch.float16: (11, 2.0 ** -24)}


def _rounding_interval(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 bounds [lo, hi] of the reals that round to each value of `w` (held exactly in fp64) in `dtype`;
    zero gets an empty interval (a nonzero q can't produce it, and no scale needs to)."""
    bits, tiny = _SIGNIFICAND[dtype]
    mant, exp = torch.frexp(w.abs())
    ulp = torch.clamp(torch.ldexp(torch.ones_like(w), exp - bits), min=tiny)
    below = torch.where(mant == 0.5, torch.clamp(ulp / 2, min=tiny), ulp)  # a power of two: finer spacing below
    up, down = torch.where(w >= 0, ulp, below), torch.where(w >= 0, below, ulp)
    lo, hi = w - down / 2, w + up / 2
    return torch.where(w == 0, torch.inf, lo), torch.where(w == 0, -torch.inf, hi)


def refine_scales(src: torch.Tensor, q: torch.Tensor, d: torch.Tensor,
                  deq: torch.Tensor | None = None) -> torch.Tensor:
    """Scales [N, K/32] that make `bf16(q * d)` reproduce a 16-bit checkpoint's blocks where `m / -8` does not.

    `m / -8` is exact whenever the checkpoint holds `bf16(q * d)` with d of at most 8 significant bits; a scale
    of more bits (an fp16 d, as llama.cpp stores, or an fp32 one) rounds `-8 * d` to m and moves other products
    by an ulp. For each such block the products pin d to an interval (the intersection over its nonzero q of the
    reals that round to each value, divided by q). Candidates from it: the fp16 value nearest its middle and
    both fp16 neighbours of that one (a middle on a rounding tie may round to a false end), then the fp32 middle;
    the first whose products match every value wins. Other blocks keep `d`. `deq`: `q * d` in src's dtype, where
    the caller has it already."""
    if src.dtype not in _SIGNIFICAND:
        return d
    n, k = src.shape
    w = src.reshape(n, k // BLOCK, BLOCK)
    qb = q.reshape(n, k // BLOCK, BLOCK)
    deq = (q4_0_dequantize(q, d, src.dtype) if deq is None else deq).reshape(w.shape)
    off = ~(deq == w).all(-1)
    # only blocks off by rounding (a lattice whose scale has more bits moves products by an ulp, ~2^-8 of the
    # block's largest value, or by one subnormal step); a block off the lattice altogether misses by up to half
    # a step (1/16 of it)
    err = (deq.float() - w.float()).abs().amax(-1)
    off &= err <= torch.clamp(w.float().abs().amax(-1) * 2.0 ** -6, min=2 * _SIGNIFICAND[src.dtype][1])
    if not off.any():
        return d
    d = d.clone()
    idx = off.nonzero(as_tuple=True)
    for s in range(0, idx[0].numel(), 65536):  # bounded fp64 temporaries
        part = tuple(i[s:s + 65536] for i in idx)
        wp, qf = w[part], qb[part].float()
        lo, hi = _rounding_interval(wp.double(), src.dtype)
        qd = qf.double()
        lo, hi = torch.where(qd < 0, hi, lo) / qd, torch.where(qd < 0, lo, hi) / qd
        has_q = qd != 0  # q = 0 gives no bound
        mid = (torch.where(has_q, lo, -torch.inf).amax(-1) + torch.where(has_q, hi, torch.inf).amin(-1)) / 2
        h = mid.to(torch.float16)
        bits = h.view(torch.int16)
        cands = [h.float(), (bits + 1).view(torch.float16).float(), (bits - 1).view(torch.float16).float(),
                 mid.float()]
        best, done = d[part], torch.zeros(mid.shape, dtype=torch.bool)
        for c in cands:
            # the products as the runtime forms them: fp32 q * d, then one rounding to the checkpoint's dtype
            ok = torch.isfinite(c) & (c != 0) & ~done
            ok &= ((qf * c.unsqueeze(-1)).to(src.dtype) == wp).all(-1)
            best = torch.where(ok, c, best)
            done |= ok
        d[part] = best
    return d


def q4_0_dequantize(q: torch.Tensor, d: torch.Tensor, dtype: torch.dtype = torch.float32,
                    grid: torch.dtype | None = None) -> torch.Tensor:
    """(q int8 [N, K], d [N, K/32]) -> w [N, K] in `dtype` (products in fp32, then one rounding). `grid`: a dtype
    the products are rounded to first (the source checkpoint's, so a wider `dtype` gets its exact values)."""
    n, k = q.shape
    w = (q.float().reshape(n, k // BLOCK, BLOCK) * d.float().unsqueeze(-1)).reshape(n, k)
    if grid is not None and grid != dtype:
        w = w.to(grid)
    return w.to(dtype)


def compact_scales(d: torch.Tensor) -> torch.Tensor:
    """Store scales as fp16 when every one survives the round trip exactly, else keep fp32."""
    d16 = d.to(torch.float16)
    if torch.equal(d16.float(), d) and torch.isfinite(d16).all():
        return d16
    return d.float()


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] in [-8, 7] -> uint8 [N, K/2]: byte j holds column 2j in the low nibble, 2j+1 in the high, +8."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> int8 [N, K] in [-8, 7] (inverse of pack_int4)."""
    lo = (packed & 0x0F).to(torch.int8) - 8
    hi = (packed >> 4).to(torch.int8) - 8
    return torch.stack((lo, hi), dim=-1).reshape(packed.shape[0], -1)


def int8_rows_quantize(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PLE table rows [n, W] -> (q int8 [n, W], scale fp32 [n]); scale = max|row| / 127, q = round(row / scale)."""
    r = rows.to(torch.float32, copy=True)  # a copy: divided in place below
    mn, mx = torch.aminmax(r, dim=-1)
    scale = torch.maximum(mx, -mn) / 127.0
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = r.div_(safe.unsqueeze(-1)).round_().clamp_(-127, 127).to(torch.int8)
    return q, scale


def int8_rows_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float().unsqueeze(-1)


# ---- lattice report ------------------------------------------------------------------------------------

@dataclass
class TensorLattice:
    """How well one tensor's quantization reproduces the checkpoint: exact blocks and worst relative error."""

    name: str
    blocks: int = 0
    exact_blocks: int = 0
    worst_rel_err: float = 0.0

    def add(self, src: torch.Tensor, deq: torch.Tensor, block: int) -> None:
        """Accumulate a chunk: src and deq [rows, K] in the checkpoint's dtype; `block` elements per block
        (32 for q4_0; a whole row for the int8 table)."""
        # Exactness is one comparison pass; errors are computed only for the blocks that differ (none on a
        # QAT checkpoint), which is what keeps the report cheap on a 16 GB model.
        exact = (src == deq).reshape(-1, block).all(dim=-1)
        self.blocks += exact.numel()
        n_exact = int(exact.sum())
        self.exact_blocks += n_exact
        if n_exact == exact.numel():
            return
        off = ~exact
        s = src.reshape(-1, block)[off].float()
        e = deq.reshape(-1, block)[off].float()
        diff = (s - e).abs().amax(dim=-1)
        ref = s.abs().amax(dim=-1)
        rel = torch.where(ref > 0, diff / torch.where(ref > 0, ref, torch.ones_like(ref)), diff)
        self.worst_rel_err = max(self.worst_rel_err, float(rel.max()))

    @property
    def exact_fraction(self) -> float:
        return self.exact_blocks / self.blocks if self.blocks else 1.0

    def to_dict(self) -> dict:
        return {"blocks": self.blocks, "exact_blocks": self.exact_blocks, "exact_fraction": self.exact_fraction,
                "worst_rel_err": self.worst_rel_err}


@dataclass
class LatticeReport:
    tensors: dict[str, TensorLattice] = field(default_factory=dict)

    def tensor(self, name: str) -> TensorLattice:
        return self.tensors.setdefault(name, TensorLattice(name))

    def summary(self) -> dict:
        blocks = sum(t.blocks for t in self.tensors.values())
        exact = sum(t.exact_blocks for t in self.tensors.values())
        worst = max((t.worst_rel_err for t in self.tensors.values()), default=0.0)
        off = sorted((t for t in self.tensors.values() if t.exact_blocks < t.blocks),
                     key=lambda t: t.exact_fraction)
        return {"tensors": len(self.tensors), "blocks": blocks, "exact_blocks": exact,
                "exact_fraction": exact / blocks if blocks else 1.0, "worst_rel_err": worst,
                "off_lattice_tensors": [t.name for t in off]}

    def to_dict(self) -> dict:
        return {"summary": self.summary(), "tensors": {n: t.to_dict() for n, t in self.tensors.items()}}


# ---- bundle entries: the one place that turns a checkpoint tensor into stored tensors --------------------

def stem(name: str) -> str:
    """'layers.0.self_attn.q_proj.weight' -> 'layers.0.self_attn.q_proj'."""
    return name.removesuffix(".weight")


def linear_entries(name: str, w: torch.Tensor, report: LatticeReport | None = None,
                   chunk_rows: int = 8192) -> dict[str, torch.Tensor]:
    """A linear weight [N, K] -> {'<stem>.q4': uint8 [N, K/2], '<stem>.scale': fp16|fp32 [N, K/32]}.

    Works through `chunk_rows` rows at a time so a [262144, 2560] head never needs an fp32 copy in RAM."""
    packed, scales = [], []
    for r0 in range(0, w.shape[0], chunk_rows):
        chunk = w[r0:r0 + chunk_rows]
        q, d = q4_0_quantize(chunk)
        deq = q4_0_dequantize(q, d, chunk.dtype)
        if not torch.equal(deq, chunk):  # some blocks miss under m / -8: scales of more bits may hit them
            d = refine_scales(chunk, q, d, deq)
            deq = q4_0_dequantize(q, d, chunk.dtype)
        if report is not None:
            report.tensor(name).add(chunk, deq, BLOCK)
        packed.append(pack_int4(q))
        scales.append(d)
    return {stem(name) + ".q4": torch.cat(packed), stem(name) + ".scale": compact_scales(torch.cat(scales))}


def quantize_weights(cfg: ModelConfig, get: Callable[[str], torch.Tensor],
                     report: LatticeReport | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Every entry of weights.safetensors, one tensor at a time, from `get(canonical name)`.

    Linears and the untied head become q4_0; norms and layer scalars fp32; the token embedding keeps the
    checkpoint's dtype (16-bit in every published checkpoint) for the row gather."""
    for name in cfg.linear_shapes():
        yield from linear_entries(name, get(name), report).items()
    emb = get("embed_tokens.weight")
    yield from linear_entries("lm_head.weight", emb, report).items()
    yield "embed_tokens.weight", emb.contiguous()
    for name in cfg.norm_shapes():
        yield name, get(name).float().contiguous()


def ple_table_chunks(table: torch.Tensor, report: LatticeReport | None = None,
                     chunk_rows: int = 4096) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """embed_tokens_per_layer [V, L*P] -> (int8 rows, fp32 scales) chunks, in order, for streaming to disk."""
    for r0 in range(0, table.shape[0], chunk_rows):
        rows = table[r0:r0 + chunk_rows]
        q, scale = int8_rows_quantize(rows)
        if report is not None:
            report.tensor("embed_tokens_per_layer.weight").add(
                rows, int8_rows_dequantize(q, scale).to(rows.dtype), rows.shape[1])
        yield q, scale


def load_linear(entries, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read back (q int8 [N, K], d [N, K/32]) from a mapping holding linear_entries' keys."""
    return unpack_int4(entries[stem(name) + ".q4"]), entries[stem(name) + ".scale"]
