import json
import shutil
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gemma4_coreai.checkpoint import HUB_PATTERNS, Checkpoint, SafetensorsWriter
from gemma4_coreai.errors import Gemma4Error
from gemma4_coreai.synth import synthesize


def _copy(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def _edit(ckpt, fn):
    """Rewrite model.safetensors with fn(dict of tensors) applied."""
    f = ckpt / "model.safetensors"
    t = load_file(f)
    fn(t)
    save_file(t, f)
    return f


def _error(path) -> str:
    with pytest.raises(Gemma4Error) as e:
        Checkpoint.open(path).validate()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_open_text_layout(tiny_ckpt):
    c = Checkpoint.open(tiny_ckpt).validate()
    assert c.prefix == "model."
    assert c.has("layers.5.self_attn.k_proj.weight")  # shared layer k/v present (non-QAT style)
    assert c.dtype("embed_tokens.weight") == torch.bfloat16
    assert c.shape("embed_tokens_per_layer.weight") == (512, 8 * 32)
    assert set(c.tokenizer_files) == {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                                      "generation_config.json"}
    assert c.tokenizer_path == tiny_ckpt / "tokenizer.json"
    assert c.chat_template_path.name == "chat_template.jinja"
    assert c.generation_config_path.name == "generation_config.json"
    with safe_open(str(tiny_ckpt / "model.safetensors"), framework="pt") as f:
        ref = f.get_tensor("model.layers.3.mlp.up_proj.weight")
    assert torch.equal(c.get("layers.3.mlp.up_proj.weight"), ref)
    lazy = c.lazy("layers.3.mlp.up_proj.weight")
    assert torch.equal(lazy[5:17], ref[5:17]) and lazy.shape == ref.shape


def test_open_hub_layout_pruned(tiny_hub_pruned_ckpt):
    c = Checkpoint.open(tiny_hub_pruned_ckpt).validate()
    assert c.prefix == "model.language_model."
    assert not c.has("layers.5.self_attn.k_proj.weight")
    assert c.has("layers.4.self_attn.k_proj.weight")


def test_ignores_towers_and_other_prefixes(tiny_hub_pruned_ckpt, tmp_path):
    ck = _copy(tiny_hub_pruned_ckpt, tmp_path)

    def add(t):
        t["model.vision_tower.encoder.x.weight"] = torch.zeros(4, 4)
        t["model.audio_tower.y.weight"] = torch.zeros(2, dtype=torch.int32)
        t["model.embed_vision.embedding_projection.weight"] = torch.zeros(3)
    _edit(ck, add)
    c = Checkpoint.open(ck).validate()
    assert not any("tower" in n or "vision" in n for n in c.names())


def test_sharded(tmp_path):
    out = synthesize("tiny", tmp_path / "sharded", progress=False, shard_bytes=600_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    c = Checkpoint.open(out).validate()
    assert len(c.files) == len(shards)
    ref = Checkpoint.open(synthesize("tiny", tmp_path / "single", progress=False))
    for n in ref.names():
        assert torch.equal(c.get(n), ref.get(n)), n
    (out / shards[1]).unlink()
    assert _error(out) == f"{out / 'model.safetensors.index.json'}: shard '{shards[1]}' listed in the index is missing"


def test_missing_tensor(tiny_ckpt, tmp_path):
    ck = _copy(tiny_ckpt, tmp_path)
    _edit(ck, lambda t: t.pop("model.layers.3.mlp.up_proj.weight"))
    assert _error(ck) == f"{ck}: missing tensor 'model.layers.3.mlp.up_proj.weight' (in model.safetensors)"


def test_misshapen_tensor(tiny_ckpt, tmp_path):
    ck = _copy(tiny_ckpt, tmp_path)
    name = "model.layers.3.mlp.up_proj.weight"
    f = _edit(ck, lambda t: t.update({name: t[name][:-1]}))
    assert _error(ck) == f"{f}: tensor 'model.layers.3.mlp.up_proj.weight' has shape [255, 128], expected [256, 128]"


def test_misshapen_optional_shared_kv(tiny_ckpt, tmp_path):
    ck = _copy(tiny_ckpt, tmp_path)
    name = "model.layers.6.self_attn.k_norm.weight"
    f = _edit(ck, lambda t: t.update({name: torch.ones(7, dtype=torch.bfloat16)}))
    assert _error(ck) == f"{f}: tensor '{name}' has shape [7], expected [32]"


def test_wrong_dtype(tiny_ckpt, tmp_path):
    ck = _copy(tiny_ckpt, tmp_path)
    name = "model.layers.0.self_attn.o_proj.weight"
    f = _edit(ck, lambda t: t.update({name: t[name].to(torch.int32)}))
    assert _error(ck) == f"{f}: tensor '{name}' has dtype I32, expected BF16, F16 or F32"


def test_truncated_file(tiny_ckpt, tmp_path):
    ck = _copy(tiny_ckpt, tmp_path)
    f = ck / "model.safetensors"
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.truncate(size - 1000)
    assert _error(ck) == (f"{f}: truncated or corrupt safetensors file (header describes {size} bytes, "
                          f"file has {size - 1000})")
    with open(f, "r+b") as fh:
        fh.truncate(100)
    assert _error(ck).startswith(f"{f}: truncated or corrupt safetensors file (header of ")


def test_corrupt_header(tiny_ckpt, tmp_path):
    ck = _copy(tiny_ckpt, tmp_path)
    f = ck / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:12] = b"\xff\xfe\x00!"
    f.write_bytes(bytes(data))
    assert _error(ck) == f"{f}: truncated or corrupt safetensors file (header is not valid JSON)"


def test_no_weights_and_no_dir(tiny_ckpt, tmp_path):
    ck = _copy(tiny_ckpt, tmp_path)
    (ck / "model.safetensors").unlink()
    assert _error(ck) == f"{ck}: no model.safetensors or model.safetensors.index.json"
    assert _error(tmp_path / "nope") == f"{tmp_path / 'nope'}: no such checkpoint directory"


@pytest.mark.parametrize("patch, field", [
    ({"enable_moe_block": True}, "enable_moe_block"),
    ({"attention_k_eq_v": True}, "attention_k_eq_v"),
    ({"use_bidirectional_attention": "all"}, "use_bidirectional_attention"),
    ({"model_type": "gemma3_text"}, "model_type"),
])
def test_bad_config(tiny_ckpt, tmp_path, patch, field):
    ck = _copy(tiny_ckpt, tmp_path)
    cfg = json.loads((ck / "config.json").read_text()) | patch
    (ck / "config.json").write_text(json.dumps(cfg))
    assert _error(ck).startswith(f"{ck / 'config.json'}: field '{field}' ")


def test_hub_id_without_network(monkeypatch):
    import huggingface_hub

    seen = {}

    def fake(repo_id, allow_patterns=None, **kw):
        seen.update(repo_id=repo_id, allow_patterns=allow_patterns)
        raise ConnectionError("Name or service not known\nsecond line")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    msg = _error("google/gemma-4-E4B-it")
    assert msg == ("google/gemma-4-E4B-it: no such directory, and cannot download it from the Hugging Face hub "
                   "(ConnectionError: Name or service not known)")
    assert seen == {"repo_id": "google/gemma-4-E4B-it", "allow_patterns": HUB_PATTERNS}


@pytest.mark.parametrize("deferred", [False, True])
def test_writer_roundtrip(tmp_path, deferred):
    a = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    b = torch.arange(6, dtype=torch.uint8)
    c = torch.randn(5, 2).to(torch.bfloat16)
    specs = [("a", None if deferred else torch.float32, (3, 4)), ("b", torch.uint8, (6,)),
             ("c", None if deferred else torch.bfloat16, (5, 2))]
    w = SafetensorsWriter(tmp_path / "x.safetensors", specs, metadata={"format": "pt"})
    w.write("a", a)
    w.write("b", b)
    w.write_part("c", c[:2])
    w.write_part("c", c[2:])
    digest = w.close()
    import hashlib
    assert digest == hashlib.sha256((tmp_path / "x.safetensors").read_bytes()).hexdigest()
    assert w.size == (tmp_path / "x.safetensors").stat().st_size
    got = load_file(tmp_path / "x.safetensors")
    assert torch.equal(got["a"], a) and torch.equal(got["b"], b) and torch.equal(got["c"], c)
    (n,) = struct.unpack("<Q", (tmp_path / "x.safetensors").read_bytes()[:8])
    assert n % 8 == 0


def test_writer_rejects_out_of_order(tmp_path):
    w = SafetensorsWriter(tmp_path / "x.safetensors", [("a", torch.float32, (2,))])
    with pytest.raises(ValueError, match="got tensor 'b', expected 'a'"):
        w.write("b", torch.zeros(2))
    with pytest.raises(ValueError, match="declared torch.float32"):
        w.write("a", torch.zeros(2, dtype=torch.float16))
    w.abort()
