import pytest
import torch

from gemma4_coreai import quant
from gemma4_coreai.synth import ple_lattice_rows, q4_lattice_rows


def _on_lattice(rows=64, k=256, rms=0.05, seed=0):
    return q4_lattice_rows(torch.Generator().manual_seed(seed), rows, k, rms)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_q4_bit_exact_on_lattice(dtype):
    q0, d0 = quant.q4_0_quantize(_on_lattice())
    w = quant.q4_0_dequantize(q0, d0, dtype)  # the lattice as a `dtype` checkpoint holds it: d * q rounded to dtype
    q, d = quant.q4_0_quantize(w)
    assert q.min() >= -8 and q.max() <= 7
    assert torch.equal(quant.q4_0_dequantize(q, d, dtype), w)
    # Through the stored form (packed nibbles, compacted scales) as well.
    e = quant.linear_entries("x.weight", w, chunk_rows=16)
    q2, d2 = quant.load_linear(e, "x.weight")
    assert e["x.scale"].dtype == torch.float16
    assert torch.equal(quant.q4_0_dequantize(q2, d2, dtype), w)


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32])
def test_q4_exact_when_the_scales_have_more_bits_than_bf16(scale_dtype):
    """A QAT checkpoint may hold bf16(q * d) with d of fp16's 11 (llama.cpp's q4_0) or fp32's 24 significant bits:
    `m / -8` then reproduces only ~40% of its blocks, and the refined scales every one, stored as fp16 where
    they can be. Blocks that `m / -8` already reproduces keep that scale."""
    g = torch.Generator().manual_seed(3)
    n, k = 64, 512
    q = torch.randint(-8, 8, (n, k // 32, 32), generator=g)
    q[..., 7] = -8  # the largest magnitude on -8 d, as in q4_0
    d = (torch.rand(n, k // 32, 1, generator=g) * 0.02 + 1e-3).to(scale_dtype).float()
    w = (q.float() * d).reshape(n, k).bfloat16()
    q0, d0 = quant.q4_0_quantize(w)
    assert (quant.q4_0_dequantize(q0, d0, torch.bfloat16) == w).reshape(n, -1, 32).all(-1).float().mean() < 0.6
    rep = quant.LatticeReport()
    e = quant.linear_entries("x.weight", w, rep, chunk_rows=16)
    assert rep.tensors["x.weight"].exact_fraction == 1.0
    assert e["x.scale"].dtype == scale_dtype  # fp16 scales survive compaction; fp32 ones are kept
    q2, d2 = quant.load_linear(e, "x.weight")
    assert torch.equal(q2, q0) and torch.equal(quant.q4_0_dequantize(q2, d2, torch.bfloat16), w)
    kept = (quant.q4_0_dequantize(q0, d0, torch.bfloat16) == w).reshape(n, -1, 32).all(-1)
    assert torch.equal(d2.float()[kept], d0[kept])


def test_refine_leaves_off_lattice_blocks_alone():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)).bfloat16()
    q, d = quant.q4_0_quantize(w)
    assert torch.equal(quant.refine_scales(w, q, d), d)


def test_report_exact_and_off_lattice():
    rep = quant.LatticeReport()
    good = _on_lattice()
    quant.linear_entries("good.weight", good, rep)
    bad = good.clone()
    bad[3, 5] = bad[3, 5] + 0.37 * bad[3].abs().max()  # off the lattice in one block
    bad[3, 5] = bad[3, 5].to(torch.bfloat16)
    quant.linear_entries("bad.weight", bad, rep)
    s = rep.summary()
    assert rep.tensors["good.weight"].exact_fraction == 1.0
    assert rep.tensors["bad.weight"].blocks - rep.tensors["bad.weight"].exact_blocks == 1
    assert rep.tensors["bad.weight"].worst_rel_err > 0
    assert s["off_lattice_tensors"] == ["bad.weight"]
    assert s["blocks"] == 2 * 64 * 8 and s["exact_blocks"] == s["blocks"] - 1


def test_random_weights_are_off_lattice():
    rep = quant.LatticeReport()
    quant.linear_entries("r.weight", torch.randn(32, 64, generator=torch.Generator().manual_seed(0)).bfloat16(), rep)
    assert rep.tensors["r.weight"].exact_fraction < 0.5


def test_pack_roundtrip():
    q = torch.randint(-8, 8, (7, 64), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    p = quant.pack_int4(q)
    assert p.dtype == torch.uint8 and p.shape == (7, 32)
    assert torch.equal(quant.unpack_int4(p), q)
    # Layout: column 2j in the low nibble of byte j, 2j+1 in the high nibble, stored as q+8.
    assert int(p[0, 0]) == (int(q[0, 0]) + 8) | ((int(q[0, 1]) + 8) << 4)


def test_compact_scales_falls_back_to_fp32():
    d = torch.tensor([0.5, 2.0**-30])  # the second underflows fp16
    assert quant.compact_scales(d).dtype == torch.float32
    assert quant.compact_scales(torch.tensor([0.5, 0.25])).dtype == torch.float16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_int8_rows_exact_on_lattice(dtype):
    rows = ple_lattice_rows(torch.Generator().manual_seed(0), 50, 96, 0.1).to(dtype)
    rep = quant.LatticeReport()
    chunks = list(quant.ple_table_chunks(rows, rep, chunk_rows=16))
    q = torch.cat([c[0] for c in chunks])
    s = torch.cat([c[1] for c in chunks])
    assert q.abs().amax(dim=1).eq(127).all()
    assert torch.equal(quant.int8_rows_dequantize(q, s).to(dtype), rows)
    assert rep.summary()["exact_fraction"] == 1.0


def test_zero_block():
    w = torch.zeros(2, 32, dtype=torch.bfloat16)
    q, d = quant.q4_0_quantize(w)
    assert torch.equal(quant.q4_0_dequantize(q, d, w.dtype), w)
