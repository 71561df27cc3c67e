"""`gemma4-coreai bench` on the tiny bundle (CPU): the record's fields and their sanity, not speed."""

from __future__ import annotations

import json

import pytest
import torch

from gemma4_coreai import bench as B
from gemma4_coreai.bundle import Bundle
from gemma4_coreai.config import preset


def test_bandwidth_model_e4b():
    cfg = preset("e4b")
    lin = B.linear_bytes(cfg)
    assert 2.4e9 < lin < 2.8e9  # DESIGN §6: ~4.62 B params at 4.5 bits ~ 2.6 GB
    small, big = B.decode_step_bytes(cfg, 128), B.decode_step_bytes(cfg, 4096)
    assert small["total"] == sum(v for k, v in small.items() if k != "total")
    assert big["kv_cache"] > small["kv_cache"] > 0
    # sliding layers stop growing past the window
    assert B.kv_bytes(cfg, 1024) - B.kv_bytes(cfg, 512) == B.kv_bytes(cfg, 1536) - B.kv_bytes(cfg, 1024)


def test_bench_record_cpu(tiny_bundle, tmp_path):
    rec = B.bench(tiny_bundle, device="cpu", prompt_lens=[8, 40], gen_len=5, repeats=2, warmup=1)
    json.dumps(rec)  # JSON-able
    assert rec["schema"] == B.SCHEMA and rec["device"]["type"] == "cpu"
    assert rec["settings"] == {"prompt_lens": [8, 40], "gen_len": 5, "repeats": 2, "warmup": 1, "seed": 0,
                               "max_context": 45}
    assert rec["copy_bandwidth_Bps"] > 1e8
    assert rec["memory"]["peak_host_rss_bytes"] > 10 << 20
    assert [r["prompt_len"] for r in rec["results"]] == [8, 40]
    for r in rec["results"]:
        for key in ("prefill_tps", "decode_tps", "ttft_s"):
            s = r[key]
            assert 0 < s["min"] <= s["median"] <= s["max"]
        assert r["deterministic"]
        assert r["bytes_per_decode_step"]["total"] > r["bytes_per_decode_step"]["linears"] > 0
        # the stock CPU engine's KV cache is fp32: the model counts 4 bytes per element, not 2
        ctx = int(round(r["prompt_len"] + (r["gen_len"] - 1) / 2))
        assert r["bytes_per_decode_step"]["kv_cache"] == B.kv_bytes(Bundle.open(tiny_bundle).config, ctx, 4)
        assert r["floor_ms_per_token"] > 0 and 0 < r["fraction_of_floor"]
        assert r["floor_ms_per_token"] == pytest.approx(r["bytes_per_decode_step"]["total"]
                                                        / rec["copy_bandwidth_Bps"] * 1e3)
        assert r["decode_ms_per_token"] == pytest.approx(1e3 / r["decode_tps"]["median"])
    assert "decode tok/s" in B.format_table(rec)


def test_device_peak_windows(tiny_bundle, monkeypatch):
    """The device-memory fields without a GPU (torch.cuda's peak counters replaced by a fake): the whole-process
    peak covers loading and warm-up, the runs' peak only the windows opened after each warm-up, and the table
    prints all three."""
    fake = {"alloc": 0, "res": 0, "now": 0}

    def grow(n):  # allocate up to n bytes: the peak follows
        fake["now"] = n
        fake["alloc"], fake["res"] = max(fake["alloc"], n), max(fake["res"], n + 1)

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda dev=None: fake["alloc"])
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda dev=None: fake["res"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats",
                        lambda dev=None: fake.update(alloc=fake["now"], res=fake["now"] + 1))
    dev, peaks = torch.device("cuda"), {}
    grow(700)  # loading, with a transient
    grow(500)
    B._device_peak(dev, peaks, "load")
    grow(900)  # warm-up (compile)
    grow(500)
    B._device_peak(dev, peaks, "all", reset=True)
    grow(600)  # the measured runs
    B._device_peak(dev, peaks, "runs")
    assert peaks == {"load": 700, "all": 900, "runs": 600, "reserved": 901}
    rec = B.bench(tiny_bundle, device="cpu", prompt_lens=[8], gen_len=2, repeats=1, warmup=0)
    gib = 1 << 30
    rec["memory"].update(peak_device_allocated_bytes=9 * gib, peak_device_load_allocated_bytes=7 * gib,
                         peak_device_runs_allocated_bytes=6 * gib, peak_device_reserved_bytes=10 * gib)
    assert "peak device 9.00 GiB allocated (after loading 7.00, measured runs 6.00)" in B.format_table(rec)


def test_bench_cli(tiny_bundle, tmp_path, capsys):
    out = tmp_path / "rec.json"
    rc = B.main([str(tiny_bundle), "--prompt-len", "4", "--gen-len", "3", "--repeats", "1", "--json",
                 "-o", str(out)])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text())["results"][0]["prompt_len"] == 4 == printed["results"][0]["prompt_len"]


def test_bench_errors(tiny_bundle, capsys):
    assert B.main([str(tiny_bundle), "--gen-len", "0"]) == 2
    assert "error:" in capsys.readouterr().err
    assert B.main([str(tiny_bundle), "--engine", "fast", "--device", "cpu"]) == 2


def test_bench_cpu_int4_compiles_by_default(tiny_bundle, monkeypatch):
    """The cpu-int4 engine compiles its decode step unless compile=False (--no-compile); compile time is spent
    in `warm`, outside the timings, and reported. The compile itself is stubbed here (eager step; the real one
    is tested in test_cpu_kernels.py)."""
    from gemma4_coreai import cpu_kernels
    from gemma4_coreai.backends import TorchBackend

    if cpu_kernels.load() is None:
        pytest.skip(f"native CPU int4 kernel unavailable: {cpu_kernels.last_error()}")
    built = []

    def fake_compile(self):
        built.append(self)
        return lambda ids, pos, ple, kv_len: self.model(ids, pos, ple, kv_len=kv_len)

    monkeypatch.setattr(TorchBackend, "_compile_decode", fake_compile)
    kw = dict(device="cpu", engine="cpu-int4", prompt_lens=[8], gen_len=4, repeats=1, warmup=0,
              measure_bandwidth=False)
    rec = B.bench(tiny_bundle, **kw)
    assert len(built) == 1 and "compiled decode" in rec["engine"] and rec["compile_s"] > 0
    assert rec["results"][0]["decode_tps"]["median"] > 0
    eager = B.bench(tiny_bundle, compile=False, **kw)
    assert len(built) == 1 and "compiled" not in eager["engine"] and eager["compile_s"] == 0
