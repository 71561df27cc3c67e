"""Bad config.json / manifest config / checkpoint tensors and shard indexes: one clear Gemma4Error line each."""

import dataclasses
import json
import re
import shutil

import pytest
from safetensors.torch import load_file, save_file

from gemma4_coreai.bundle import Bundle, convert
from gemma4_coreai.checkpoint import Checkpoint
from gemma4_coreai.config import _FIELDS, ModelConfig, from_hf_config, load_config, preset
from gemma4_coreai.errors import Gemma4Error
from gemma4_coreai.synth import synthesize


def _raises(fn, msg: str) -> str:
    with pytest.raises(Gemma4Error, match=re.escape(msg)) as e:
        fn()
    assert "\n" not in str(e.value)
    return str(e.value)


# ---- config.json ----------------------------------------------------------------------------------------

POS_INT = "expected a positive integer"


@pytest.mark.parametrize("patch, msg", [
    ({"hidden_size": "abc"}, f"field 'hidden_size' is 'abc', {POS_INT}"),
    ({"hidden_size": 128.7}, f"field 'hidden_size' is 128.7, {POS_INT}"),
    ({"num_hidden_layers": "eight"}, f"field 'num_hidden_layers' is 'eight', {POS_INT}"),
    ({"num_hidden_layers": 0, "layer_types": None}, f"field 'num_hidden_layers' is 0, {POS_INT}"),
    ({"num_key_value_heads": 0}, f"field 'num_key_value_heads' is 0, {POS_INT}"),
    ({"sliding_window": -1}, f"field 'sliding_window' is -1, {POS_INT}"),
    ({"vocab_size": -512}, f"field 'vocab_size' is -512, {POS_INT}"),
    ({"vocab_size": 0}, f"field 'vocab_size' is 0, {POS_INT}"),
    ({"rms_norm_eps": "small"}, "field 'rms_norm_eps' is 'small', expected a positive number"),
    ({"eos_token_id": "x"}, "field 'eos_token_id' is 'x', expected a token id in [0, 512)"),
    ({"eos_token_id": []}, "field 'eos_token_id' is [], expected a token id or a non-empty list of them"),
    ({"bos_token_id": 512}, "field 'bos_token_id' is 512, expected a token id in [0, 512)"),
    ({"use_double_wide_mlp": "yes"}, "field 'use_double_wide_mlp' is 'yes', expected true or false"),
    ({"layer_types": 5}, "field 'layer_types' is 5, expected a non-empty list of"),
    ({"layer_types": ["bogus"] * 8}, "field 'layer_types' has unknown layer type 'bogus'"),
    ({"layer_types": ["full_attention"] * 3}, "field 'layer_types' has 3 entries for 8 layers"),
    ({"num_kv_shared_layers": 8}, "field 'num_kv_shared_layers' is 8, expected an integer in [0, 8)"),
    ({"rope_parameters": [1, 2]}, "field 'rope_parameters' is [1, 2], expected an object"),
    ({"rope_parameters": {"sliding_attention": "x"}}, "field 'rope_parameters.sliding_attention' is 'x', expected"),
    ({"rope_parameters": {"full_attention": {"rope_theta": "big"}}},
     "field 'rope_parameters.full_attention.rope_theta' is 'big', expected a positive number"),
])
def test_config_json_field(patch, msg):
    raw = preset("tiny").to_hf_text_config() | patch
    _raises(lambda: from_hf_config(raw), f"config.json: {msg}")


def test_config_json_hub_wrapper_names_nested_field():
    raw = {"model_type": "gemma4", "text_config": preset("tiny").to_hf_text_config() | {"num_key_value_heads": 0}}
    _raises(lambda: from_hf_config(raw), f"config.json: field 'text_config.num_key_value_heads' is 0, {POS_INT}")


def test_load_config_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(preset("tiny").to_hf_text_config() | {"head_dim": "32"}))
    _raises(lambda: load_config(tmp_path), f"{tmp_path / 'config.json'}: field 'head_dim' is '32', {POS_INT}")


# ---- the bundle manifest's config (ModelConfig.from_dict) -----------------------------------------------

def test_every_field_is_checked():
    assert set(_FIELDS) == {f.name for f in dataclasses.fields(ModelConfig)} - {"layers"}


@pytest.mark.parametrize("patch, msg", [
    ({"hidden_size": "abc"}, f"field 'config.hidden_size' is 'abc', {POS_INT}"),
    ({"hidden_size": "128"}, f"field 'config.hidden_size' is '128', {POS_INT}"),
    ({"hidden_size": -128}, f"field 'config.hidden_size' is -128, {POS_INT}"),
    ({"num_kv_heads": 0}, f"field 'config.num_kv_heads' is 0, {POS_INT}"),
    ({"num_heads": 0}, f"field 'config.num_heads' is 0, {POS_INT}"),
    ({"num_layers": -1}, f"field 'config.num_layers' is -1, {POS_INT}"),
    ({"vocab_size": "512"}, f"field 'config.vocab_size' is '512', {POS_INT}"),
    ({"sliding_window": 0}, f"field 'config.sliding_window' is 0, {POS_INT}"),
    ({"sliding_window": -4}, f"field 'config.sliding_window' is -4, {POS_INT}"),
    ({"rms_norm_eps": "x"}, "field 'config.rms_norm_eps' is 'x', expected a positive number"),
    ({"layer_types": ["bogus"] * 8}, "field 'config.layer_types' has unknown layer type 'bogus'"),
    ({"layer_types": "full_attention"}, "field 'config.layer_types' is 'full_attention', expected a non-empty list"),
    ({"num_heads": 3}, "field 'config.num_kv_heads' (2) does not divide config.num_heads (3)"),
    ({"pad_token_id": -1}, "field 'config.pad_token_id' is -1, expected a token id in [0, 512)"),
    ({"bogus": 1}, "field 'config.bogus' is not a model config field"),
])
def test_manifest_config_field(patch, msg):
    d = preset("tiny").to_dict() | patch
    _raises(lambda: ModelConfig.from_dict(d), f"manifest.json: {msg}")


def test_manifest_config_missing_field_and_source():
    d = preset("tiny").to_dict()
    del d["hidden_size"]
    _raises(lambda: ModelConfig.from_dict(d, source="b/manifest.json"),
            "b/manifest.json: field 'config.hidden_size' is missing")
    _raises(lambda: ModelConfig.from_dict([1]), "manifest.json: field 'config' is [1], expected an object")


def test_bundle_open_refuses_bad_manifest_config(tiny_bundle, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    m = json.loads((b / "manifest.json").read_text())
    m["config"]["num_kv_heads"] = 0
    (b / "manifest.json").write_text(json.dumps(m))
    _raises(lambda: Bundle.open(b), f"field 'config.num_kv_heads' is 0, {POS_INT}")


# ---- checkpoint tensors and shard indexes ---------------------------------------------------------------

@pytest.mark.parametrize("name, value", [("model.embed_tokens_per_layer.weight", float("nan")),
                                         ("model.layers.1.mlp.up_proj.weight", float("inf")),
                                         ("model.layers.0.input_layernorm.weight", float("-inf"))])
def test_non_finite_weights_refused(tiny_ckpt, tmp_path, name, value):
    ck = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, ck)
    f = ck / "model.safetensors"
    t = load_file(f)
    t[name].view(-1)[7] = value
    save_file(t, f)
    _raises(lambda: convert(ck, tmp_path / "b", progress=False),
            f"{f}: tensor '{name}' has non-finite values (NaN/inf)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # nothing half-written


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return synthesize("tiny", tmp_path_factory.mktemp("sh") / "ck", progress=False, shard_bytes=600_000)


def _edit_index(sharded, tmp_path, fn):
    ck = tmp_path / "ck"
    shutil.copytree(sharded, ck)
    index = ck / "model.safetensors.index.json"
    m = json.loads(index.read_text())
    fn(m["weight_map"])
    index.write_text(json.dumps(m))
    return ck, index


@pytest.mark.parametrize("value", [5, ["a"], "../../other/model.safetensors", "/etc/model.safetensors", ".."])
def test_shard_name_must_be_a_plain_file(sharded, tmp_path, value):
    ck, index = _edit_index(sharded, tmp_path, lambda w: w.update({"model.norm.weight": value}))
    _raises(lambda: Checkpoint.open(ck), f"{index}: weight_map entry for 'model.norm.weight' is {value!r}, "
            "expected a shard file name in the checkpoint directory")


def test_tensor_in_two_shards(sharded, tmp_path):
    ck, _ = _edit_index(sharded, tmp_path, lambda w: None)
    shards = sorted(p.name for p in ck.glob("model-*.safetensors"))
    a, b = ck / shards[0], ck / shards[1]
    ta, tb = load_file(a), load_file(b)
    name = next(iter(ta))
    save_file(tb | {name: ta[name]}, b)
    _raises(lambda: Checkpoint.open(ck), f"{ck}: tensor '{name}' is in two shards ({a.name} and {b.name})")
