import json

import pytest

from gemma4_coreai.config import FULL, SLIDING, ModelConfig, from_hf_config, load_config, preset
from gemma4_coreai.errors import Gemma4Error


def test_e4b_layers():
    cfg = preset("e4b")
    full = [s.index for s in cfg.layers if s.kind == FULL]
    assert full == [5, 11, 17, 23, 29, 35, 41]
    assert cfg.first_shared_layer == 24 and cfg.num_kv_slots == 24
    for s in cfg.layers[24:]:
        assert not s.owns_kv
        assert s.kv_source == (22 if s.kind == SLIDING else 23)
    assert cfg.layers[5].head_dim == 512 and cfg.layers[5].rope_angles == 64
    assert cfg.layers[0].head_dim == 256 and cfg.layers[0].rope_angles == 128
    assert cfg.variant == "e4b"


def test_e2b_double_wide():
    cfg = preset("e2b")
    assert cfg.variant == "e2b"
    assert cfg.layers[0].intermediate_size == 6144
    assert cfg.layers[cfg.first_shared_layer].intermediate_size == 12288


def test_tiny_covers_every_feature():
    cfg = preset("tiny")
    kinds = {(s.kind, s.owns_kv) for s in cfg.layers}
    assert kinds == {(SLIDING, True), (FULL, True), (SLIDING, False), (FULL, False)}
    assert cfg.head_dim != cfg.global_head_dim


@pytest.mark.parametrize("shape", ["tiny", "e2b", "e4b"])
def test_hf_roundtrip(shape):
    cfg = preset(shape)
    text = cfg.to_hf_text_config()
    assert from_hf_config(text) == cfg
    hub = {"model_type": "gemma4", "text_config": text, "vision_config": None}
    assert from_hf_config(hub) == cfg
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_final_logit_softcapping_absent_or_null_means_none():
    """As in HF, where the field defaults to None and a None cap is skipped (real Gemma 4 configs say 30.0)."""
    text = preset("tiny").to_hf_text_config()
    assert from_hf_config(text).final_logit_softcap == 30.0
    assert from_hf_config(text | {"final_logit_softcapping": None}).final_logit_softcap is None
    absent = {k: v for k, v in text.items() if k != "final_logit_softcapping"}
    cfg = from_hf_config(absent)
    assert cfg.final_logit_softcap is None
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # the manifest keeps the null
    assert from_hf_config(cfg.to_hf_text_config()) == cfg
    with pytest.raises(Gemma4Error, match="field 'final_logit_softcapping' is 0, expected a positive number or null"):
        from_hf_config(text | {"final_logit_softcapping": 0}, source="x.json")


@pytest.mark.parametrize("patch, msg", [
    ({"enable_moe_block": True}, "x.json: field 'enable_moe_block' is true: MoE models are out of scope"),
    ({"num_experts": 8}, "x.json: field 'num_experts' is set: MoE models are out of scope"),
    ({"attention_k_eq_v": True},
     "x.json: field 'attention_k_eq_v' is true: K=V attention (the 26B/31B models) is out of scope"),
    ({"use_bidirectional_attention": "all"},
     "x.json: field 'use_bidirectional_attention' is 'all': only causal attention is supported"),
    ({"model_type": "llama"},
     "x.json: field 'model_type' is 'llama': not a Gemma 4 model (expected 'gemma4' or 'gemma4_text')"),
    ({"hidden_size": 100},
     "x.json: field 'hidden_size' is 100: q4_0 needs every linear input dimension to be a multiple of 32"),
    ({"hidden_size_per_layer_input": 0}, "x.json: field 'hidden_size_per_layer_input' is 0: per-layer embeddings "
                                         "are required"),
    # legacy RoPE forms HF still reads: ignoring them would change the math
    ({"rope_scaling": {"rope_type": "default"}}, "x.json: field 'rope_scaling' is set: Gemma 4 keeps RoPE settings "
                                                "per layer type in rope_parameters; this legacy form is not supported"),
    ({"partial_rotary_factor": 0.25}, "x.json: field 'partial_rotary_factor' is set: Gemma 4 keeps RoPE settings "
                                      "per layer type in rope_parameters; this legacy form is not supported"),
    ({"rope_parameters": {"full_attention": {"type": "proportional"}}},
     "x.json: field 'rope_parameters.full_attention.type' is set: use rope_type (the legacy key is not supported)"),
    ({"per_layer_config": {"2": {"head_dim": 64, "intermediate_size": 512}}},
     "x.json: field 'per_layer_config.2' overrides intermediate_size on a full layer: not supported"),
    ({"per_layer_config": {"0": {"head_dim": 64}}},
     "x.json: field 'per_layer_config.0' overrides head_dim on a sliding layer: not supported"),
    ({"per_layer_config": {"2": {"head_dim": 64}, "7": {"head_dim": 128}}},
     "x.json: field 'per_layer_config' gives full layers different head dims [64, 128]: not supported"),
])
def test_refusals(patch, msg):
    raw = preset("tiny").to_hf_text_config() | patch
    with pytest.raises(Gemma4Error) as e:
        from_hf_config(raw, source="x.json")
    assert str(e.value) == msg


def test_refusal_names_nested_field():
    raw = {"model_type": "gemma4", "text_config": preset("tiny").to_hf_text_config() | {"attention_k_eq_v": True}}
    with pytest.raises(Gemma4Error, match="field 'text_config.attention_k_eq_v' is true"):
        from_hf_config(raw)


def test_load_config_errors(tmp_path):
    with pytest.raises(Gemma4Error, match="config.json not found"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(Gemma4Error, match="not valid JSON"):
        load_config(tmp_path)


def test_unknown_shape():
    with pytest.raises(Gemma4Error, match="unknown shape 'e9b'"):
        preset("e9b")


def test_required_names():
    cfg = preset("tiny")
    lin, norms, opt = cfg.linear_shapes(), cfg.norm_shapes(), cfg.optional_shared_kv_names()
    assert "layers.5.self_attn.k_proj.weight" not in lin and "layers.5.self_attn.k_proj.weight" in opt
    assert "layers.4.self_attn.k_proj.weight" in lin
    assert lin["layers.2.self_attn.q_proj.weight"] == (4 * 64, 128)
    assert norms["layers.0.layer_scalar"] == (1,)


def test_fields_left_out_take_hfs_defaults():
    """transformers' save_pretrained leaves out values equal to Gemma4TextConfig's defaults: a left-out field means
    that default, as HF loads it (vocab 262144, head_dim 256, PLE width 256, ...)."""
    full = preset("e4b").to_hf_text_config()
    for key in ("vocab_size", "head_dim", "hidden_size_per_layer_input"):
        assert from_hf_config({k: v for k, v in full.items() if k != key}) == preset("e4b")
    bare = from_hf_config({"model_type": "gemma4_text"})
    assert (bare.hidden_size, bare.num_layers, bare.num_heads, bare.num_kv_heads, bare.intermediate_size) == \
        (2304, 30, 8, 4, 9216)


def test_global_head_dim_resolved_as_hf_does():
    text = preset("tiny").to_hf_text_config()
    base = {k: v for k, v in text.items() if k != "global_head_dim"}
    # a per_layer_config decides; a full layer without an override keeps head_dim (a config re-saved by
    # transformers where both are equal holds an empty one); zero-padded keys as transformers writes them
    assert from_hf_config(base | {"per_layer_config": {}}).global_head_dim == 32
    assert from_hf_config(base | {"per_layer_config": {"02": {"head_dim": 64}, "07": {"head_dim": 64}}}) == \
        preset("tiny")
    assert from_hf_config(text | {"per_layer_config": {}}).global_head_dim == 32  # global_head_dim then ignored
    assert from_hf_config(base).global_head_dim == 512  # neither: HF's default


def test_bidirectional_attention_for_vision_only_is_causal_text():
    text = preset("tiny").to_hf_text_config()
    assert from_hf_config(text | {"use_bidirectional_attention": "vision"}) == preset("tiny")


def test_e2b_preset_has_a_full_layer_every_fifth():
    cfg = preset("e2b")
    assert [i for i, s in enumerate(cfg.layers) if s.kind == FULL] == [4, 9, 14, 19, 24, 29, 34]
