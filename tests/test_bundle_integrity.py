"""A damaged bundle, source or export is refused with one line naming the file and the tensor or field, before any
use: weights.safetensors' header against the config, the tokenizer and generation config (at convert and at use),
the oracle record, an output that would replace its source, and a Core AI export's metadata and graph hash."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gemma4_coreai.bundle import WEIGHTS, Bundle, convert
from gemma4_coreai.coreai_backend import check_graph, read_metadata
from gemma4_coreai.errors import Gemma4Error
from gemma4_coreai.oracle import check_oracle


def copy_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_weights(bundle: Path, edit) -> None:
    """Apply `edit` to the tensors of weights.safetensors and keep the manifest's size in step with the file."""
    path = bundle / WEIGHTS
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"][WEIGHTS]["size"] = path.stat().st_size
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def replace_file(bundle: Path, rel: str, content: str) -> None:
    """Overwrite one listed file, with the manifest's size updated (as a careless hand edit would leave it)."""
    (bundle / rel).write_text(content)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"][rel]["size"] = (bundle / rel).stat().st_size
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def test_corrupt_weights_header_same_size(tiny_bundle, tmp_path):
    b = copy_bundle(tiny_bundle, tmp_path / "b")
    raw = bytearray((b / WEIGHTS).read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    raw[8:8 + n] = b"{" * n  # same length, no longer JSON
    (b / WEIGHTS).write_bytes(raw)
    with pytest.raises(Gemma4Error, match=r"weights\.safetensors: truncated or corrupt safetensors file"):
        Bundle.open(b)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.update({"layers.1.mlp.up_proj.q4": t["layers.1.mlp.up_proj.q4"][:-1].clone()}),
     r"tensor 'layers\.1\.mlp\.up_proj\.q4' is U8 \[\d+, \d+\], the config needs uint8 \[\d+, \d+\]"),
    (lambda t: t.update({"norm.weight": t["norm.weight"].to(torch.float16)}),
     r"tensor 'norm\.weight' is F16 .*the config needs float32"),
    (lambda t: t.pop("layers.0.self_attn.o_proj.scale"), r"tensor 'layers\.0\.self_attn\.o_proj\.scale' is missing"),
    (lambda t: t.update({"stray": torch.zeros(3)}), r"unexpected tensor 'stray'"),
])
def test_weights_checked_against_config(tiny_bundle, tmp_path, edit, message):
    b = copy_bundle(tiny_bundle, tmp_path / "b")
    rewrite_weights(b, edit)
    with pytest.raises(Gemma4Error, match=r"weights\.safetensors: " + message):
        Bundle.open(b)


def test_intact_bundle_opens(tiny_bundle):
    b = Bundle.open(tiny_bundle)
    assert b.tensor("norm.weight").dtype == torch.float32


@pytest.mark.parametrize("name, content, message", [
    ("tokenizer.json", "{not json", r"tokenizer\.json: not a loadable tokenizer"),
    ("generation_config.json", '{"temperature": "hot"}', r"generation_config\.json: field 'temperature' is 'hot'"),
    ("generation_config.json", "[1, 2]", r"generation_config\.json: expected a JSON object, got list"),
    ("generation_config.json", '{"top_k": 2.5}', r"generation_config\.json: field 'top_k' is 2\.5, expected int"),
    ("generation_config.json", '{"temperature": -1}', r"field 'temperature' is -1, expected a value >= 0"),
    ("generation_config.json", '{"top_p": 0}', r"field 'top_p' is 0, expected a value in \(0, 1\]"),
])
def test_convert_refuses_bad_tokenizer_files(tiny_ckpt, tmp_path, name, content, message):
    src = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, src)
    (src / name).write_text(content)
    with pytest.raises(Gemma4Error, match=message):
        convert(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))


def test_bundle_refuses_bad_generation_config_and_tokenizer(tiny_bundle, tmp_path):
    b = copy_bundle(tiny_bundle, tmp_path / "b")
    replace_file(b, "tokenizer/generation_config.json", '{"do_sample": "yes"}')
    replace_file(b, "tokenizer/tokenizer.json", "")
    bundle = Bundle.open(b)  # opening reads neither file
    with pytest.raises(Gemma4Error, match=r"generation_config\.json: field 'do_sample' is 'yes', expected bool"):
        _ = bundle.generation_config
    with pytest.raises(Gemma4Error, match=r"tokenizer\.json: not a loadable tokenizer"):
        bundle.tokenizer()


@pytest.mark.parametrize("eos", ["1.5", '"106"', "true", "[]", "[1, -2]"])
def test_generation_config_eos_token_id_checked(tmp_path, eos):
    from gemma4_coreai.bundle import read_generation_config

    path = tmp_path / "generation_config.json"
    path.write_text('{"eos_token_id": ' + eos + '}')
    with pytest.raises(Gemma4Error, match=r"field 'eos_token_id' is .*, expected a token id or a non-empty list"):
        read_generation_config(path)
    path.write_text('{"eos_token_id": [1, 106]}')
    assert read_generation_config(path)["eos_token_id"] == [1, 106]


def test_convert_refuses_to_replace_its_source(tiny_ckpt, tmp_path):
    src = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, src)
    before = sorted(p.name for p in src.iterdir())
    for out in (src, tmp_path):  # the source itself, and a folder holding it
        with pytest.raises(Gemma4Error, match="the output would replace or write into the source"):
            convert(src, out, force=True, progress=False)
    assert sorted(p.name for p in src.iterdir()) == before


def good_oracle() -> dict:
    return {"prompt_ids": [2, 5, 7], "reference_ids": [9, 4], "step_gaps": [1.0, 0.5],
            "step_top2": [[9, 3.0, 1, 2.0], [4, 2.5, 3, 2.0]], "tf_argmax": [5, 7, 9, 4], "tf_gaps": [1, 1, 1, 1],
            "step_near": [[[1, 1.0]], [[3, 0.5], [8, 0.9]]],
            "tf_near": [[[1, 1.0]], [[2, 1.0]], [[1, 1.0], [3, 1.0]], [[3, 1.0]]]}


class _Scripted:
    """A backend whose argmax is scripted per position of the sequence (vocab 10)."""

    vocab_size = 10

    def __init__(self, picks: dict[int, int]):
        self.picks, self.pos = picks, 0

    def _logits(self) -> torch.Tensor:
        x = torch.zeros(10)
        x[self.picks.get(self.pos - 1, 0)] = 1.0
        return x

    def reset(self):
        self.pos = 0

    def prefill(self, ids):
        self.pos += len(ids)
        return self._logits()

    def decode(self, tok):
        self.pos += 1
        return self._logits()


def test_tie_only_where_the_backend_picked_the_reference_runner_up():
    """A record without near candidates (session 13's): under the tie gap, picking the reference's runner-up is a
    tie; picking any other token is a mismatch, in free-running and teacher-forced checks alike."""
    from gemma4_coreai.oracle import verify

    o = {"prompt_ids": [2], "reference_ids": [5, 6], "step_gaps": [0.05, 2.0],
         "step_top2": [[5, 2.0, 7, 1.95], [6, 3.0, 8, 1.0]], "tf_argmax": [5, 6], "tf_gaps": [0.05, 2.0],
         "tf_second": [7, 8]}
    runner_up = verify(_Scripted({0: 7, 1: 6}), o, tie_gap=0.1)
    assert runner_up["passed"] and runner_up["free_running"]["ties"] and runner_up["teacher_forced"]["ties"]
    other = verify(_Scripted({0: 9, 1: 6}), o, tie_gap=0.1)
    assert not other["passed"] and other["free_running"]["mismatch"]["got"] == 9
    assert [e["position"] for e in other["teacher_forced"]["mismatches"]] == [0]


def test_tie_where_the_picked_token_is_near_the_reference_top1():
    """With near candidates in the record (since session 14), a mismatch is a tie where the picked token's own
    reference gap is under the tie gap, runner-up or not (half precision may pick the reference's third token);
    a token farther away, or not listed, is a mismatch."""
    from gemma4_coreai.oracle import verify

    o = {"prompt_ids": [2], "reference_ids": [5, 6], "step_gaps": [0.05, 2.0],
         "step_top2": [[5, 2.0, 7, 1.95], [6, 3.0, 8, 1.0]], "tf_argmax": [5, 6], "tf_gaps": [0.05, 2.0],
         "tf_second": [7, 8], "step_near": [[[7, 0.05], [4, 0.08], [3, 0.3]], []],
         "tf_near": [[[7, 0.05], [4, 0.08], [3, 0.3]], []]}
    third = verify(_Scripted({0: 4, 1: 6}), o, tie_gap=0.1)
    assert third["passed"] and third["free_running"]["ties"][0]["got"] == 4
    assert [e["position"] for e in third["teacher_forced"]["ties"]] == [0]
    for far in (3, 9):  # listed but over the tie gap; not listed at all
        r = verify(_Scripted({0: far, 1: 6}), o, tie_gap=0.1)
        assert not r["passed"] and r["free_running"]["mismatch"]["got"] == far
        assert [e["position"] for e in r["teacher_forced"]["mismatches"]] == [0]
    assert verify(_Scripted({0: 3, 1: 6}), o, tie_gap=0.5)["passed"]


def test_oracle_top_and_near_candidates_agree_on_equal_logits():
    """Equal top logits: one ordering gives the top-1, the runner-up and the candidates, so the record passes its
    own checks (two separate top-k calls ordered equal values differently)."""
    from gemma4_coreai.oracle import _top

    row = torch.randn(5000, generator=torch.Generator().manual_seed(0))
    row[[4321, 17, 2500]] = row.max() + 1  # three-way tie at the top
    (t1, v1, t2, v2), near = _top(row)
    assert v1 == v2 and t1 not in [c[0] for c in near] and near[0] == [t2, 0.0]
    assert {t1, t2, near[1][0]} == {4321, 17, 2500}
    rec = {"prompt_ids": [1], "reference_ids": [t1], "step_gaps": [v1 - v2], "step_top2": [[t1, v1, t2, v2]],
           "step_near": [near], "tf_argmax": [t1], "tf_gaps": [v1 - v2], "tf_second": [t2], "tf_near": [near]}
    check_oracle(rec, 5000)


def test_oracle_token_ids_within_vocab():
    with pytest.raises(Gemma4Error, match=r"oracle record: field 'reference_ids' holds token id 9, out of range "
                                          r"for vocab size 8"):
        check_oracle(good_oracle(), vocab_size=8)


@pytest.mark.parametrize("change, message", [
    (lambda o: o.pop("reference_ids"), r"field 'reference_ids' must be a list of token ids"),
    (lambda o: o.update(step_gaps=[1.0, float("nan")]), r"field 'step_gaps' holds a value that is not a finite"),
    (lambda o: o.update(tf_argmax=[5, 7, 9]), r"field 'tf_argmax' has 3 entries, expected 4"),
    (lambda o: o.update(step_top2=[[9, 3.0], [4, 2.5]]), r"field 'step_top2' must hold \[top1 id"),
    (lambda o: o.update(prompt_ids=[]), r"field 'prompt_ids' is empty"),
    # the fields must agree with each other (an edited record could otherwise turn mismatches into ties)
    (lambda o: o["step_gaps"].__setitem__(0, 0.0), r"field 'step_gaps' step 0: 0.0 is not the top-2 gap"),
    (lambda o: o["step_top2"][1].__setitem__(0, 3), r"field 'step_top2' step 1: top-1 id 3 is not reference_ids' 4"),
    (lambda o: o.update(tf_gaps=[1, 1, -1, 1]), r"field 'tf_gaps' holds a negative gap"),
    (lambda o: o["tf_argmax"].__setitem__(3, 6), r"field 'tf_argmax' position 3 is 6, but the reference chose 4"),
    (lambda o: o.update(tf_second=[1, 2]), r"field 'tf_second' has 2 entries, expected 4"),
    (lambda o: o.update(tf_near=[[], [], []]), r"field 'tf_near' must be a list of 4 candidate lists"),
    (lambda o: o["step_near"][1].reverse(), r"field 'step_near' position 1: candidates are not sorted by gap"),
    (lambda o: o["step_near"][1].__setitem__(1, [8, 1.5]), r"field 'step_near' position 1: expected up to 8"),
    (lambda o: o["step_near"][1].__setitem__(1, [4, 0.9]), r"field 'step_near' position 1: expected up to 8"),
    (lambda o: o["tf_near"][2].__setitem__(1, [1, 1.0]), r"field 'tf_near' position 2: expected up to 8"),
    (lambda o: o["step_near"].__setitem__(1, [[8, 0.9]]), r"field 'step_near' position 1: the closest candidate's"),
    (lambda o: o["tf_near"].__setitem__(0, []), r"field 'tf_near' position 0: the closest candidate's gap"),
    (lambda o: o["step_near"][1].__setitem__(0, [6, 0.5]), r"field 'step_near' position 1: the closest candidate 6"),
    (lambda o: o.update(tf_second=[1, 2, 3, 3]), r"field 'tf_near' position 2: the closest candidate 1 is not the "
                                                 r"runner-up 3"),
])
def test_oracle_record_checked(change, message):
    check_oracle(good_oracle())
    o = good_oracle()
    change(o)
    with pytest.raises(Gemma4Error, match="oracle record: " + message):
        check_oracle(o)


def test_bundle_oracle_json_not_json(tiny_bundle, oracle_bundle, tmp_path):
    """A listed oracle.json that is not JSON: one line. One the manifest does not list (copied in from another
    bundle) is not read at all."""
    b = copy_bundle(oracle_bundle, tmp_path / "b")
    assert "oracle.json" in json.loads((b / "manifest.json").read_text())["files"]
    replace_file(b, "oracle.json", "{oops")
    with pytest.raises(Gemma4Error, match=r"oracle\.json: not valid JSON"):
        _ = Bundle.open(b).oracle
    plain = copy_bundle(tiny_bundle, tmp_path / "plain")
    assert "oracle.json" not in json.loads((plain / "manifest.json").read_text())["files"]
    shutil.copyfile(oracle_bundle / "oracle.json", plain / "oracle.json")
    assert Bundle.open(plain).oracle is None


def test_export_metadata_and_graph_checked(tmp_path):
    state = {"shape": [2, 1, 1, 16, 8], "dtype": "float16"}
    meta = {"gemma4": {"ple_mode": "tbl", "num_layers": 2, "ple_dim": 8, "ple_tables": "t",
                       "states": {"k_cache": state, "v_cache": state}},
            "language": {"max_context_length": 16, "vocab_size": 32}, "assets": {"main": "m.aimodel"}}
    path = tmp_path / "metadata.json"
    path.write_text(json.dumps(meta))
    assert read_metadata(path)["gemma4"]["ple_mode"] == "tbl"
    path.write_text("{")
    with pytest.raises(Gemma4Error, match=r"metadata\.json: not valid JSON"):
        read_metadata(path)
    meta["language"]["vocab_size"] = "32"
    path.write_text(json.dumps(meta))
    with pytest.raises(Gemma4Error, match=r"metadata\.json: field 'language\.vocab_size' is '32'"):
        read_metadata(path)
    aimodel = tmp_path / "m.aimodel"
    aimodel.mkdir()
    (aimodel / "main.mlirb").write_bytes(b"graph bytes")
    (aimodel / "main.hash").write_bytes(hashlib.sha256(b"graph bytes").digest())
    check_graph(aimodel)
    (aimodel / "main.mlirb").write_bytes(b"graph by")  # truncated
    with pytest.raises(Gemma4Error, match=r"main\.mlirb: does not match main\.hash"):
        check_graph(aimodel)


def test_reference_with_non_finite_logits_is_refused():
    """A reference whose logits hold NaN (a damaged checkpoint) must not become an oracle that anything passes."""
    from types import SimpleNamespace

    from gemma4_coreai.oracle import run_reference

    class NanModel:
        def forward(self, input_ids, use_cache, past_key_values=None):
            logits = torch.zeros(1, input_ids.shape[1], 16)
            logits[..., 3] = float("nan")
            return SimpleNamespace(logits=logits, past_key_values=None)

        __call__ = forward

    with pytest.raises(Gemma4Error, match="the fp32 reference produced non-finite logits"):
        run_reference(NanModel(), [1, 2], 3)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(max_context="abc"), r"field 'max_context' is 'abc', expected an integer in \[1, 4096\]"),
    (lambda m: m.update(max_context=0), r"field 'max_context' is 0, expected an integer in \[1, 4096\]"),
    (lambda m: m["files"].update({WEIGHTS: 5}), r"field 'files' must map file names to \{size, sha256\} objects"),
    (lambda m: m["files"][WEIGHTS].update(size=str(m["files"][WEIGHTS]["size"])),
     r"files\.weights\.safetensors\.size is '\d+', expected an integer"),
    (lambda m: m.update(lattice=5), r"field 'lattice' is 5, expected an object"),
    (lambda m: m.update(lattice={"summary": {"blocks": 5}}), r"field 'lattice.summary' is \{'blocks': 5\}, not what "
     "convert writes"),  # inspect used to fail on it with a KeyError traceback
])
def test_manifest_fields_checked(tiny_bundle, tmp_path, edit, message):
    b = copy_bundle(tiny_bundle, tmp_path / "b")
    manifest = json.loads((b / "manifest.json").read_text())
    edit(manifest)
    (b / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(Gemma4Error, match=r"manifest\.json: " + message):
        Bundle.open(b)
