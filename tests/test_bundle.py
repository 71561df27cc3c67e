import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from gemma4_coreai import bundle as bundle_mod
from gemma4_coreai import quant
from gemma4_coreai.bundle import Bundle, convert, inspect
from gemma4_coreai.checkpoint import Checkpoint
from gemma4_coreai.errors import Gemma4Error
from gemma4_coreai.synth import synthesize


def _assert_lossless(ckpt_dir, bundle_dir):
    """Every stored tensor dequantizes to the checkpoint's values bit for bit."""
    c = Checkpoint.open(ckpt_dir)
    b = Bundle.open(bundle_dir, verify_hashes=True)
    cfg = c.config
    assert b.config == cfg
    for name in cfg.linear_shapes():
        w = c.get(name)
        q, d = b.linear(name)
        assert q.shape == w.shape
        assert torch.equal(quant.q4_0_dequantize(q, d, w.dtype), w), name
    emb = c.get("embed_tokens.weight")
    q, d = b.linear("lm_head")
    assert torch.equal(quant.q4_0_dequantize(q, d, emb.dtype), emb)
    assert torch.equal(b.tensor("embed_tokens.weight"), emb)
    for name in cfg.norm_shapes():
        t = b.tensor(name)
        assert t.dtype == torch.float32 and torch.equal(t, c.get(name).float()), name
    table = torch.from_numpy(np.array(b.ple_table()))
    scale = torch.from_numpy(np.array(b.ple_scale()))
    ref = c.get("embed_tokens_per_layer.weight").float()
    assert torch.equal(table.float() * scale[:, None], ref)  # row = i8 * scale (times sqrt(P) at gather time)
    # nothing from the unused shared-layer k/v made it into the bundle
    assert not any(n.startswith(f"layers.{cfg.first_shared_layer}.self_attn.k_") for n in b.names())
    s = b.lattice["summary"]
    assert s["exact_fraction"] == 1.0 and s["off_lattice_tensors"] == [] and s["worst_rel_err"] == 0
    assert set(b.lattice["tensors"]) == {*cfg.linear_shapes(), "lm_head.weight", "embed_tokens_per_layer.weight"}
    return b


def test_lossless_text_layout(tiny_ckpt, tiny_bundle):
    b = _assert_lossless(tiny_ckpt, tiny_bundle)
    m = b.manifest
    assert m["format"] == "gemma4-coreai-bundle" and m["format_version"] == 1
    assert m["max_context"] == 4096 == b.max_context
    assert m["source"]["prefix"] == "model." and m["source"]["shared_kv_tensors"] is True
    assert set(m["files"]) == {"weights.safetensors", "embed_per_layer.i8", "embed_per_layer.scale.f32",
                               "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
                               "tokenizer/chat_template.jinja", "tokenizer/generation_config.json"}
    assert b.oracle is None and m["oracle"] is None
    # reader API
    assert b.ple_table().shape == (512, 256) and b.ple_table().dtype == np.int8
    assert b.ple_scale().shape == (512,) and b.ple_scale().dtype == np.float32
    assert b.tokenizer().token_to_id("<turn|>") == 106
    assert b.chat_template.startswith("{#- Gemma 4 chat format")
    assert b.generation_config["eos_token_id"] == [1, 106]
    assert b.tokenizer_dir == tiny_bundle / "tokenizer"
    assert b.tensor("layers.0.self_attn.q_proj.scale").dtype == torch.float16
    assert b.tensor("lm_head.q4").shape == (512, 64)


def test_fp32_model_computes_with_the_checkpoints_weights(tiny_ckpt, tiny_bundle):
    """The fp32 torch backend dequantizes through the checkpoint's dtype (`Bundle.source_dtype`), so every linear
    (the untied head too) holds exactly the weights the fp32 reference loads from the checkpoint. The synthetic
    scales carry bf16's 8 significant bits, as trained ones do: q * d straight to fp32 differs."""
    from gemma4_coreai.backends import TorchBackend

    c, b = Checkpoint.open(tiny_ckpt), Bundle.open(tiny_bundle)
    assert b.source_dtype == torch.bfloat16
    model = TorchBackend.from_bundle(b, dtype="fp32", max_context=32).model
    raw = TorchBackend.from_bundle(b, dtype="fp32", max_context=32, weight_grid=None).model
    off = 0
    for (name, lin), (_, lin_raw) in zip(model.q4_linears(), raw.q4_linears(), strict=True):
        want = c.get("embed_tokens.weight" if name == "lm_head" else name + ".weight").float()
        assert torch.equal(lin.dequantized(torch.float32), want), name
        off += int((lin_raw.dequantized(torch.float32) != want).sum())
    assert off > 0  # without the grid, fp32 weights would not be the checkpoint's


def test_lossless_hub_pruned(tiny_hub_pruned_ckpt, tiny_hub_pruned_bundle):
    b = _assert_lossless(tiny_hub_pruned_ckpt, tiny_hub_pruned_bundle)
    assert b.manifest["source"]["prefix"] == "model.language_model."
    assert b.manifest["source"]["shared_kv_tensors"] is False
    # same seed, same weights: the two layouts give the same weights file
    assert b.manifest["files"]["weights.safetensors"]["sha256"]


def test_lossless_custom_shapes(tmp_path_factory):
    import dataclasses

    from conftest import make_bundle, make_ckpt

    from gemma4_coreai.config import preset

    cfg = dataclasses.replace(preset("tiny"), double_wide_mlp=True, vocab_size=640)
    ck = make_ckpt(tmp_path_factory, cfg, seed=3)
    assert _assert_lossless(ck, make_bundle(tmp_path_factory, ck, max_context=100)).max_context == 100


def test_off_lattice_reported(tiny_ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    ck = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, ck)
    t = load_file(ck / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    w = t[name].clone()
    w[0, 0] = (w[0, :32].abs().max().float() * 0.3 + 1e-3).to(torch.bfloat16)  # not on this block's lattice
    t[name] = w
    save_file(t, ck / "model.safetensors")
    rep = inspect(ck)["lattice"]
    assert rep["summary"]["off_lattice_tensors"] == ["layers.1.mlp.down_proj.weight"]
    assert rep["tensors"]["layers.1.mlp.down_proj.weight"]["exact_blocks"] == \
        rep["tensors"]["layers.1.mlp.down_proj.weight"]["blocks"] - 1
    b = Bundle.open(convert(ck, tmp_path / "b", progress=False))
    assert b.lattice["summary"]["off_lattice_tensors"] == ["layers.1.mlp.down_proj.weight"]
    assert b.lattice["summary"]["worst_rel_err"] > 0


def test_existing_output_and_force(tiny_ckpt, tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(Gemma4Error) as e:
        convert(tiny_ckpt, out, progress=False)
    assert str(e.value) == f"{out}: already exists (use --force to overwrite)"
    assert (out / "keep").exists()
    with pytest.raises(Gemma4Error) as e:  # --force replaces an earlier bundle, not someone's folder
        convert(tiny_ckpt, out, progress=False, force=True)
    assert str(e.value) == (f"{out}: a folder that is not an earlier output of this command (no manifest.json); "
                            "--force replaces only those: choose another path")
    assert [p.name for p in out.iterdir()] == ["keep"]
    (out / "keep").unlink()  # an empty folder is taken
    convert(tiny_ckpt, out, progress=False, force=True)
    (out / "extra").write_text("x")  # an earlier bundle is replaced whole
    convert(tiny_ckpt, out, progress=False, force=True)
    assert not (out / "extra").exists() and Bundle.open(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_force_onto_a_symlink_and_failed_runs_leave_no_folders(tiny_ckpt, tiny_bundle, tmp_path, monkeypatch):
    """--force onto a symlink to an earlier bundle replaces the link (its target stays as it was) and leaves no
    `.old-*` entry behind; a failed convert into new parent folders removes the folders it made."""
    target = tmp_path / "real"
    shutil.copytree(tiny_bundle, target)
    link = tmp_path / "link"
    link.symlink_to(target)
    convert(tiny_ckpt, link, progress=False, force=True)
    assert link.is_dir() and not link.is_symlink() and Bundle.open(link)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
    assert Bundle.open(target).manifest == Bundle.open(tiny_bundle).manifest

    def boom(table, report=None, chunk_rows=4096):
        raise RuntimeError("disk on fire")
        yield
    monkeypatch.setattr(quant, "ple_table_chunks", boom)
    (tmp_path / "kept").mkdir()
    for out in (tmp_path / "new1" / "new2" / "b", tmp_path / "kept" / "new3" / "b"):
        with pytest.raises(RuntimeError):
            convert(tiny_ckpt, out, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept", "link", "real"]
    assert list((tmp_path / "kept").iterdir()) == []


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_interrupted_write_leaves_nothing(tiny_ckpt, tmp_path, monkeypatch, exc):
    real = quant.ple_table_chunks

    def boom(table, report=None, chunk_rows=4096):
        yield from real(table, report, chunk_rows=64)
        raise exc
    monkeypatch.setattr(quant, "ple_table_chunks", boom)
    with pytest.raises(type(exc)):
        convert(tiny_ckpt, tmp_path / "b", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_force_keeps_old(tiny_ckpt, tiny_bundle, tmp_path, monkeypatch):
    out = tmp_path / "b"
    shutil.copytree(tiny_bundle, out)

    def hook(ckpt, tmp):
        assert (tmp / "weights.safetensors").is_file() and not (tmp / "manifest.json").exists()
        raise RuntimeError("oracle failed")
    with pytest.raises(RuntimeError):
        convert(tiny_ckpt, out, progress=False, force=True, oracle_hook=hook)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    Bundle.open(out, verify_hashes=True)


def test_oracle_hook(tiny_ckpt, tmp_path):
    rec = {"prompt_ids": [2, 105], "ref_ids": [7, 8], "gaps": [1.5, 0.2]}
    b = Bundle.open(convert(tiny_ckpt, tmp_path / "b", progress=False, oracle_hook=lambda c, d: rec))
    assert b.oracle == rec and b.manifest["oracle"] == rec and "oracle.json" in b.manifest["files"]


def _broken(bundle, tmp_path):
    out = tmp_path / "b"
    shutil.copytree(bundle, out)
    return out


def _open_error(path, **kw) -> str:
    with pytest.raises(Gemma4Error) as e:
        Bundle.open(path, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_truncated_table(tiny_bundle, tmp_path):
    b = _broken(tiny_bundle, tmp_path)
    with open(b / "embed_per_layer.i8", "r+b") as f:
        f.truncate(1000)
    assert _open_error(b) == (f"{b / 'embed_per_layer.i8'}: truncated or wrong size (1000 bytes, manifest says "
                              f"{512 * 256})")


def test_table_size_must_match_config(tiny_bundle, tmp_path):
    b = _broken(tiny_bundle, tmp_path)
    m = json.loads((b / "manifest.json").read_text())
    m["files"]["embed_per_layer.scale.f32"]["size"] = 1000
    (b / "manifest.json").write_text(json.dumps(m))
    assert _open_error(b) == (f"{b / 'manifest.json'}: files.embed_per_layer.scale.f32.size is 1000, "
                              "the config needs 2048")


def test_corrupt_manifest(tiny_bundle, tmp_path):
    b = _broken(tiny_bundle, tmp_path)
    (b / "manifest.json").write_text('{"format": "gemma4-coreai-bundle", ')
    assert _open_error(b).startswith(f"{b / 'manifest.json'}: corrupt manifest (not valid JSON: ")


def test_wrong_version_and_format(tiny_bundle, tmp_path):
    b = _broken(tiny_bundle, tmp_path)
    m = json.loads((b / "manifest.json").read_text())
    (b / "manifest.json").write_text(json.dumps(m | {"format_version": 2}))
    assert _open_error(b) == (f"{b / 'manifest.json'}: field 'format_version' is 2, this tool reads version 1")
    (b / "manifest.json").write_text(json.dumps(m | {"format": "gguf"}))
    assert _open_error(b) == (f"{b / 'manifest.json'}: field 'format' is 'gguf', expected 'gemma4-coreai-bundle'")


def test_missing_file_and_bad_hash(tiny_bundle, tmp_path):
    b = _broken(tiny_bundle, tmp_path)
    data = bytearray((b / "weights.safetensors").read_bytes())
    data[-1] ^= 1
    (b / "weights.safetensors").write_bytes(bytes(data))
    Bundle.open(b)  # sizes still fine
    assert _open_error(b, verify_hashes=True) == f"{b / 'weights.safetensors'}: sha256 does not match manifest.json"
    (b / "tokenizer" / "tokenizer.json").unlink()
    assert _open_error(b) == f"{b / 'tokenizer' / 'tokenizer.json'}: missing (listed in manifest.json)"
    assert _open_error(tmp_path / "nope") == f"{tmp_path / 'nope'}: no such bundle directory"
    (b / "manifest.json").unlink()
    assert _open_error(b) == f"{b / 'manifest.json'}: not found (not a gemma4-coreai bundle)"


def test_bad_inputs_to_convert(tiny_ckpt, tmp_path):
    with pytest.raises(Gemma4Error, match=r"max_context 0 is out of range \[1, 4096\]"):
        convert(tiny_ckpt, tmp_path / "b", progress=False, max_context=0)
    ck = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, ck)
    (ck / "tokenizer.json").unlink()
    with pytest.raises(Gemma4Error) as e:
        convert(ck, tmp_path / "b", progress=False)
    assert str(e.value) == f"{ck}: tokenizer.json not found (a bundle needs the tokenizer)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_inspect_bundle(tiny_bundle):
    info = inspect(tiny_bundle)
    assert info["kind"] == "bundle" and info["config"]["full_attention_layers"] == [2, 7]
    b = info["bytes"]
    cfg = Bundle.open(tiny_bundle).config
    lin = sum(n * k for n, k in cfg.linear_shapes().values())
    assert b["int4_linear_bytes"] == lin // 2 + lin // 32 * 2
    assert b["decode_step_bytes"] == b["int4_linear_bytes"] + b["lm_head_bytes"] + 128 * 2 + 256 + 4
    assert b["kv_bytes_per_position"] == 2 * 2 * 2 * (4 * 32 + 64)  # 4 sliding + 1 full KV layer, K and V, fp16
    assert info["fp32_scale_tensors"] == []
    assert info["total_bytes"] == sum(info["files"].values())
    assert math.isclose(info["lattice"]["summary"]["exact_fraction"], 1.0)


def test_inspect_empty_directory(tmp_path):
    with pytest.raises(Gemma4Error) as e:
        inspect(tmp_path)
    assert str(e.value) == f"{tmp_path}: neither a bundle (no manifest.json) nor a checkpoint (no config.json)"


def _mapped(path) -> bool:
    """Whether this process maps `path` (Linux /proc; False where unavailable)."""
    maps = Path("/proc/self/maps")
    return maps.is_file() and str(path.resolve()) in maps.read_text()


def test_close_drops_the_weights_mapping(tiny_bundle):
    import gc

    b = Bundle.open(tiny_bundle)
    weights = tiny_bundle / bundle_mod.WEIGHTS
    q, d = b.linear("layers.0.mlp.up_proj")  # d is a zero-copy view of the mapping
    d_copy = d.clone()
    b.close()
    b.close()  # twice is fine
    assert torch.equal(d, d_copy) and q.abs().max() <= 8  # tensors read before close stay valid
    if Path("/proc/self/maps").is_file():
        assert _mapped(weights)  # ... and keep their pages mapped until released
    del d
    gc.collect()
    assert not _mapped(weights)
    q2, d2 = b.linear("layers.0.mlp.up_proj")  # a later read reopens the file
    assert torch.equal(q, q2) and torch.equal(d_copy, d2)
    del d2
    b.close()
    gc.collect()
    assert not _mapped(weights)


def test_weight_specs_match_quantize_order(tiny_ckpt):
    c = Checkpoint.open(tiny_ckpt)
    specs = bundle_mod.weight_specs(c.config, torch.bfloat16)
    got = [(n, tuple(t.shape)) for n, t in quant.quantize_weights(c.config, c.get)]
    assert got == [(n, s) for n, _, s in specs]


def test_synth_sharded_converts(tmp_path):
    ck = synthesize("tiny", tmp_path / "ck", progress=False, shard_bytes=500_000, hub_layout=True)
    _assert_lossless(ck, convert(ck, tmp_path / "b", progress=False))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_lossless_fp16_fp32_checkpoints(tiny_ckpt, tmp_path, dtype):
    from safetensors.torch import load_file, save_file

    ck = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, ck)
    t = load_file(ck / "model.safetensors")

    def in_dtype(k, v):  # the same lattice as a `dtype` checkpoint holds it: q4_0 blocks as d * q rounded to dtype
        if v.dim() == 2 and "embed_tokens_per_layer" not in k:
            return quant.q4_0_dequantize(*quant.q4_0_quantize(v), dtype)
        return v.to(dtype)  # norms, scalars and the int8-row PLE table (power-of-two scales): exact as they are

    save_file({k: in_dtype(k, v) for k, v in t.items()}, ck / "model.safetensors")
    b = _assert_lossless(ck, convert(ck, tmp_path / "b", progress=False))
    assert b.tensor("embed_tokens.weight").dtype == dtype


def test_sigterm_cleans_up_and_stale_temp_removed(tiny_ckpt, tmp_path, monkeypatch):
    import os
    import signal

    before = signal.getsignal(signal.SIGTERM)
    stale = tmp_path / "b.tmp-999999999"  # left by a killed run: its pid is gone
    stale.mkdir()
    real = quant.ple_table_chunks

    def term(table, report=None, chunk_rows=4096):
        yield from real(table, report, chunk_rows=64)
        os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(quant, "ple_table_chunks", term)
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_ckpt, tmp_path / "b", progress=False)
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) == before
