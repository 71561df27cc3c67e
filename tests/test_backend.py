"""backends.TorchBackend: construction from a bundle, the provider-mode row gather, and every bad input."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from hf_reference import Reference, build_reference, mini, single_thread

from gemma4_coreai.backends import TorchBackend, load_backend
from gemma4_coreai.errors import Gemma4Error

_single_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


@functools.cache
def ref() -> Reference:
    return build_reference(mini())


class RowsOnly:
    """A PLE table that only hands out rows by index (no __array__): provider mode must never load it whole."""

    def __init__(self, table: np.ndarray):
        self.table, self.reads = table, []

    def __getitem__(self, idx):
        idx = np.asarray(idx)
        assert idx.ndim == 1, "rows are gathered by an index array"
        self.reads.append(idx.tolist())
        return self.table[idx]


class FakeBundle:
    """What backends need of bundle.Bundle: .config .tensor(name) .ple_table() .ple_scale() .max_context."""

    def __init__(self, r: Reference, tmp_path, max_context: int = 48):
        self.config, self.max_context = r.cfg, max_context
        self._weights = r.weights
        self.tbl_path, self.scale_path = tmp_path / "embed_per_layer.i8", tmp_path / "embed_per_layer.scale.f32"
        r.ple_table.numpy().tofile(self.tbl_path)
        r.ple_scale.numpy().tofile(self.scale_path)
        self.rows = None

    def tensor(self, name: str) -> torch.Tensor:
        return self._weights[name]

    def ple_table(self) -> RowsOnly:
        cfg = self.config
        self.rows = RowsOnly(np.memmap(self.tbl_path, np.int8, "r", shape=(cfg.vocab_size, cfg.ple_width)))
        return self.rows

    def ple_scale(self) -> np.memmap:
        return np.memmap(self.scale_path, np.float32, "r", shape=(self.config.vocab_size,))


@pytest.fixture
def bundle(tmp_path) -> FakeBundle:
    return FakeBundle(ref(), tmp_path)


def direct(**kw) -> TorchBackend:
    r = ref()
    kw.setdefault("max_context", 48)
    return TorchBackend(r.cfg, r.weights, r.ple_table, r.ple_scale, **kw)


def test_from_bundle_provider_reads_rows_per_step(bundle: FakeBundle) -> None:
    be = load_backend(bundle)
    assert (be.device.type, be.dtype, be.ple_mode, be.max_context) == ("cpu", torch.float32, "provider", 48)
    ids = [5, 17, 200, 3, 9]
    got = [be.prefill(ids), be.decode(42), be.decode(7)]
    assert be.position == 7
    assert bundle.rows.reads == [ids, [42], [7]]  # the prompt's rows in one read, then one row per step
    want = direct()
    expect = [want.prefill(ids), want.decode(42), want.decode(7)]
    for a, b in zip(got, expect, strict=True):
        assert a.shape == (bundle.config.vocab_size,) and a.dtype == torch.float32
        assert torch.equal(a, b)


def test_tbl_mode_matches_provider() -> None:
    ids = [1, 2, 3, 250, 128, 64, 32, 16, 8]
    a = direct(ple_mode="provider").forward_all(ids)
    b = direct(ple_mode="tbl").forward_all(ids)
    assert a.shape == (len(ids), ref().cfg.vocab_size)
    assert float((a - b).abs().max()) == 0.0


def test_prefill_decode_forward_all_positions() -> None:
    be = direct()
    ids = [4, 8, 15, 16, 23, 42]
    last = be.prefill(ids)
    assert be.position == 6
    step = be.decode(int(last.argmax()))
    assert be.position == 7
    rows = be.forward_all(ids + [int(last.argmax())])  # restarts from position 0
    assert be.position == 7
    assert float((rows[5] - last).abs().max()) <= 1e-4 and float((rows[6] - step).abs().max()) <= 1e-4
    be.reset()
    assert be.position == 0
    assert float((be.prefill(ids) - last).abs().max()) <= 1e-4


def test_describe_and_defaults() -> None:
    be = direct()
    assert be.describe().startswith("torch cpu fp32 provider")
    assert be.model.lm_head.storage == "dense"
    assert direct(linear_storage="packed").model.lm_head.storage == "packed"


# ---- bad input: one clear Gemma4Error ---------------------------------------------------------------------

def test_max_context_enforced() -> None:
    be = direct(max_context=8)
    with pytest.raises(Gemma4Error, match=r"sequence of 9 tokens exceeds the max context of 8"):
        be.prefill(list(range(9)))
    assert be.position == 0  # nothing was consumed
    be.prefill(list(range(8)))
    with pytest.raises(Gemma4Error, match=r"9 tokens exceeds the max context of 8"):
        be.decode(1)
    with pytest.raises(Gemma4Error, match=r"max context 5000 is out of range.*1 to 1024"):
        direct(max_context=5000)


@pytest.mark.parametrize("bad", [256, -1, 10**6])
def test_token_id_out_of_range(bad: int) -> None:
    be = direct()
    with pytest.raises(Gemma4Error, match=rf"token id {bad} is out of range for vocab size 256"):
        be.prefill([1, bad])
    with pytest.raises(Gemma4Error, match=rf"token id {bad} is out of range"):
        be.decode(bad)


def test_empty_prompt() -> None:
    with pytest.raises(Gemma4Error, match="at least one token"):
        direct().prefill([])


@pytest.mark.parametrize("device", ["tpu", "mps", "not a device"])
def test_bad_device(device: str) -> None:
    with pytest.raises(Gemma4Error, match=r"unknown device .*expected cpu, cuda or cuda:N"):
        direct(device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu() -> None:
    with pytest.raises(Gemma4Error, match=r"device 'cuda' requested but no CUDA GPU is available"):
        direct(device="cuda")


def test_bad_ple_mode_dtype_storage_backend(bundle: FakeBundle) -> None:
    with pytest.raises(Gemma4Error, match=r"unknown ple_mode 'table': expected one of provider, tbl"):
        direct(ple_mode="table")
    with pytest.raises(Gemma4Error, match=r"unknown dtype 'int4'"):
        direct(dtype="int4")
    with pytest.raises(Gemma4Error, match=r"fp16 is supported on CUDA only"):
        direct(dtype="fp16")
    with pytest.raises(Gemma4Error, match=r"unknown linear storage 'sparse'"):
        direct(linear_storage="sparse")
    with pytest.raises(Gemma4Error, match=r"unknown backend 'mlx': expected one of torch"):
        load_backend(bundle, "mlx")


def test_missing_weight_names_the_key() -> None:
    r = ref()
    weights = {k: v for k, v in r.weights.items() if k != "layers.1.mlp.up_proj.q4"}
    with pytest.raises(Gemma4Error, match=r"missing tensor 'layers.1.mlp.up_proj.q4'"):
        TorchBackend(r.cfg, weights, r.ple_table, r.ple_scale, max_context=8)


def test_bf16_cpu_runs() -> None:
    be = direct(dtype="bf16")
    assert be.model.k_cache.dtype == torch.bfloat16
    out = be.prefill([3, 4, 5])
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


# ---- a real converted bundle (conftest's synthetic tiny checkpoint) -----------------------------------------

@pytest.mark.parametrize("ple_mode", ["provider", "tbl"])
def test_real_bundle_passes_fp32_oracle(tiny_ckpt, tiny_bundle, ple_mode: str) -> None:
    from gemma4_coreai import oracle
    from gemma4_coreai.bundle import Bundle

    record = _oracle_record(str(tiny_ckpt))
    be = load_backend(Bundle.open(tiny_bundle), ple_mode=ple_mode)
    report = oracle.verify(be, record)
    assert report["passed"], oracle.format_report(report)
    assert report["free_running"]["max_top1_logit_err"] <= 1e-3


@functools.cache
def _oracle_record(ckpt: str) -> dict:
    from gemma4_coreai import oracle

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 512, (40,), generator=g).tolist()  # longer than the sliding window (16)
    return oracle.run_reference(oracle.load_reference(ckpt), prompt, 32)
