import dataclasses
import json
import math

import jinja2
import pytest
import torch

from gemma4_coreai import quant
from gemma4_coreai.checkpoint import Checkpoint
from gemma4_coreai.config import load_config, preset
from gemma4_coreai.errors import Gemma4Error
from gemma4_coreai.synth import SPECIAL_IDS, build_tokenizer, chat_template, synthesize


def _files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_deterministic(tiny_ckpt, tmp_path):
    again = synthesize("tiny", tmp_path / "again", progress=False)
    assert _files(again) == _files(tiny_ckpt)
    other = synthesize("tiny", tmp_path / "other", seed=1, progress=False)
    assert _files(other)["model.safetensors"] != _files(tiny_ckpt)["model.safetensors"]


def test_weights_on_lattice(tiny_ckpt):
    c = Checkpoint.open(tiny_ckpt)
    cfg = c.config
    q4_names = [*cfg.linear_shapes(), *[n for n in cfg.optional_shared_kv_names() if "proj" in n],
                "embed_tokens.weight"]
    for name in q4_names:
        w = c.get(name)
        assert w.dtype == torch.bfloat16
        q, d = quant.q4_0_quantize(w)
        assert torch.equal(quant.q4_0_dequantize(q, d, w.dtype), w), name
        # every block holds its -8 (the largest magnitude), and its scale is exact in fp16
        assert (q.reshape(q.shape[0], -1, 32) == -8).any(dim=-1).all(), name
        assert torch.equal(d.to(torch.float16).float(), d), name
    t = c.get("embed_tokens_per_layer.weight")
    q, s = quant.int8_rows_quantize(t)
    assert torch.equal(quant.int8_rows_dequantize(q, s).to(t.dtype), t)
    assert q.abs().amax(dim=1).eq(127).all()
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)  # power-of-two scales


def test_norms_scalars_and_magnitudes(tiny_ckpt):
    c = Checkpoint.open(tiny_ckpt)
    scalars = torch.stack([c.get(f"layers.{i}.layer_scalar").float() for i in range(8)]).flatten()
    assert scalars.min() >= 0.5 and scalars.max() <= 1.0 and len(set(scalars.tolist())) == 8
    n = c.get("layers.0.input_layernorm.weight").float()
    assert 0.8 <= n.min() and n.max() <= 1.2 and n.std() > 0.01
    emb = c.get("embed_tokens.weight").float()
    rms = (emb * math.sqrt(128)).pow(2).mean().sqrt()
    assert 0.7 < rms < 1.5  # unit-RMS rows after the sqrt(H) embedding scale


def test_tokenizer_ids_and_roundtrip(tiny_ckpt):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_ckpt / "tokenizer.json"))
    assert tok.get_vocab_size() == 512
    for i, s in SPECIAL_IDS.items():
        assert tok.token_to_id(s) == i and tok.encode(s).ids == [i]
    assert tok.token_to_id("<eos>") == 1 and tok.token_to_id("<bos>") == 2
    assert tok.token_to_id("<|turn>") == 105 and tok.token_to_id("<turn|>") == 106
    assert tok.encode("\n").ids == [107]
    text = "Hello, world!\nThe quick brown fox — naïve café, 日本語 🙂 x²"
    ids = tok.encode(text).ids
    assert 107 in ids and max(ids) < 512
    assert tok.decode(ids, skip_special_tokens=False) == text
    # byte fallback: multi-byte characters split into byte tokens that only decode together
    emoji = tok.encode("🙂").ids
    assert len(emoji) == 4 and tok.decode(emoji[:2]) != "🙂"


def test_big_vocab_tokenizer():
    tok = build_tokenizer(262144)
    assert tok.get_vocab_size() == 262144
    assert tok.token_to_id("<turn|>") == 106 and tok.id_to_token(262143) == "<unused_262143>"
    assert tok.decode(tok.encode("Hi there\n").ids) == "Hi there\n"
    with pytest.raises(Gemma4Error, match="vocab_size 100 is too small"):
        build_tokenizer(100)


def _render(messages, **kw):
    t = jinja2.Environment().from_string(chat_template())
    return t.render(messages=messages, bos_token="<bos>", **kw)


def test_chat_template():
    user = [{"role": "user", "content": "Hi"}]
    assert _render(user, add_generation_prompt=True) == "<bos><|turn>user\nHi<turn|>\n<|turn>model\n"
    assert _render(user) == "<bos><|turn>user\nHi<turn|>\n"
    sys_ = [{"role": "system", "content": "Be brief."}, *user]
    assert _render(sys_, add_generation_prompt=True) == (
        "<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n")
    assert _render(sys_, add_generation_prompt=True, enable_thinking=True) == (
        "<bos><|turn>system\n<|think|>Be brief.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n")
    assert _render(user, add_generation_prompt=True, enable_thinking=True) == (
        "<bos><|turn>system\n<|think|><turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n")
    history = [*user, {"role": "assistant", "content": "Hello!"},
               {"role": "user", "content": [{"type": "text", "text": "More"}]}]
    assert _render(history, add_generation_prompt=True) == (
        "<bos><|turn>user\nHi<turn|>\n<|turn>model\nHello!<turn|>\n<|turn>user\nMore<turn|>\n<|turn>model\n")


def test_hf_tokenizer_and_configs(tiny_hub_pruned_ckpt):
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_hub_pruned_ckpt)
    s = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert s == "<bos><|turn>user\nHi<turn|>\n<|turn>model\n"
    assert tok(s, add_special_tokens=False).input_ids[:2] == [2, 105]
    assert tok.bos_token_id == 2 and tok.eos_token_id == 1 and tok.pad_token_id == 0
    cfg = AutoConfig.from_pretrained(tiny_hub_pruned_ckpt)
    assert cfg.model_type == "gemma4" and cfg.vision_config is None
    assert cfg.text_config.num_kv_shared_layers == 3
    raw = json.loads((tiny_hub_pruned_ckpt / "config.json").read_text())
    assert raw["architectures"] == ["Gemma4ForConditionalGeneration"]
    gen = json.loads((tiny_hub_pruned_ckpt / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0, "do_sample": True,
                   "temperature": 1.0, "top_k": 64, "top_p": 0.95}
    assert load_config(tiny_hub_pruned_ckpt) == preset("tiny")


def test_hf_reference_has_clear_gaps(tiny_ckpt):
    """The fp32 HF reference on the tiny checkpoint: greedy logits have real top-2 gaps and do not collapse."""
    from transformers import Gemma4ForCausalLM

    model, info = Gemma4ForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    ids = torch.tensor([[2, 105, 404, 402, 420, 107, 382, 388, 436, 429, 106, 107, 105, 396, 480, 395, 107]])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=24, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
    gaps = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]
    gen = out.sequences[0, ids.shape[1]:].tolist()
    assert sum(g > 0.1 for g in gaps) >= 0.75 * len(gaps)
    assert len(set(gen)) >= 12


def test_custom_config_and_errors(tmp_path):
    cfg = dataclasses.replace(preset("tiny"), double_wide_mlp=True, sliding_window=8)
    (tmp_path / "c.json").write_text(json.dumps(cfg.to_hf_text_config()))
    out = synthesize(tmp_path / "c.json", tmp_path / "ck", progress=False, prune_shared_kv=True)
    c = Checkpoint.open(out).validate()
    assert c.config == cfg and c.shape("layers.7.mlp.up_proj.weight") == (512, 128)
    with pytest.raises(Gemma4Error) as e:
        synthesize("tiny", out, progress=False)
    assert str(e.value) == f"{out}: already exists (use --force to overwrite)"
    synthesize("tiny", out, progress=False, force=True)
    assert Checkpoint.open(out).config == preset("tiny")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json", "ck"]  # no temp dirs left
    with pytest.raises(Gemma4Error, match="unknown shape 'huge'"):
        synthesize("huge", tmp_path / "x", progress=False)


def test_interrupted_synth_leaves_nothing(tmp_path, monkeypatch):
    import gemma4_coreai.synth as synth

    real, calls = synth.generate, []

    def gen(spec, cfg, seed):
        calls.append(spec.name)
        if len(calls) == 5:
            raise KeyboardInterrupt
        yield from real(spec, cfg, seed)
    monkeypatch.setattr(synth, "generate", gen)
    with pytest.raises(KeyboardInterrupt):
        synthesize("tiny", tmp_path / "ck", progress=False)
    assert list(tmp_path.iterdir()) == []
