"""The run-side commands: demo, generate, verify; and their bad inputs (one line, non-zero exit)."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from conftest import make_bundle

from gemma4_coreai.backends import TorchBackend
from gemma4_coreai.bundle import Bundle
from gemma4_coreai.cli import main


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_demo_runs_and_passes(capsys):
    assert main(["demo", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "SYNTHETIC" in out and "oracle        PASS" in out
    assert "provider: PASS" in out and "tbl     : PASS" in out


def test_demo_refuses_existing_dir(tmp_path, capsys):
    assert main(["demo", "--dir", str(tmp_path)]) == 2
    assert _error_line(capsys) == f"error: {tmp_path} already exists; pass --force to replace it"


def test_generate_json_greedy_matches_backend(oracle_bundle, capsys):
    prompt = [2, 105, 300, 301, 302, 106, 107, 105, 200, 107]
    assert main(["generate", str(oracle_bundle), "--prompt-ids", ",".join(map(str, prompt)), "--greedy",
                 "--max-new-tokens", "12", "--stop-ids", "0", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    be = TorchBackend.from_bundle(Bundle.open(oracle_bundle))
    logits, want = be.prefill(prompt), []
    for _ in range(12):
        want.append(int(torch.argmax(logits)))
        logits = be.decode(want[-1])
    assert rec["tokens"] == want
    assert rec["finish_reason"] == "length"
    assert rec["text"] == Bundle.open(oracle_bundle).tokenizer().decode(want, skip_special_tokens=True)
    assert rec["timings"]["decode_tok_s"] > 0


def test_generate_chat_streams_the_same_text(oracle_bundle, capsys):
    args = ["generate", str(oracle_bundle), "--chat", "--prompt", "Hello there", "--max-new-tokens", "10",
            "--seed", "3"]
    assert main(args + ["--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["prompt_ids"][:2] == [2, 105] and rec["prompt_ids"][-1] == 107
    assert main(args) == 0
    streamed = capsys.readouterr().out
    assert streamed.rstrip("\n") == rec["text"].rstrip("\n")  # same seed: same sample, streamed


def test_verify_passes_with_stored_oracle(oracle_bundle, capsys):
    assert main(["verify", str(oracle_bundle), "--ple-mode", "tbl"]) == 0
    out = capsys.readouterr().out
    assert "16/16 tokens match" in out and out.strip().endswith("PASS")


def test_verify_margin_follows_precision(oracle_bundle, capsys):
    """fp32 backends get DESIGN's 0.1 margin, half-precision ones the wider 0.75 (bf16 noise on these models is
    up to ~0.7); --tie-gap overrides it, and a negative one is refused."""
    assert main(["verify", str(oracle_bundle), "--tokens", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tie_gap"] == 0.1
    main(["verify", str(oracle_bundle), "--tokens", "4", "--dtype", "bf16", "--json"])
    assert json.loads(capsys.readouterr().out)["tie_gap"] == 0.75
    main(["verify", str(oracle_bundle), "--tokens", "4", "--dtype", "bf16", "--tie-gap", "0.1", "--json"])
    assert json.loads(capsys.readouterr().out)["tie_gap"] == 0.1
    assert main(["verify", str(oracle_bundle), "--tie-gap", "-1"]) == 2
    assert _error_line(capsys) == "error: --tie-gap must be >= 0 (got -1.0)"


def test_verify_against_live_reference(oracle_bundle, tiny_ckpt, capsys):
    assert main(["verify", str(oracle_bundle), "--reference", str(tiny_ckpt), "--tokens", "8", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["passed"] and rep["free_running"]["matched"] == 8


def test_verify_fails_on_a_wrong_oracle(oracle_bundle, tmp_path, capsys):
    """A tampered reference token (kept consistent across the record's fields, size and sha256 updated, so that
    only the oracle's content is wrong) must fail verification: exit 1. Left stale, the sha256 alone is refused
    (exit 2); so is a record whose fields disagree (a gap that is not its top-2 gap, a top-1 id that is not the
    reference token), which could otherwise turn mismatches into ties."""
    bad = tmp_path / "bundle"
    shutil.copytree(oracle_bundle, bad)
    good = json.loads((bad / "manifest.json").read_text())

    def write(edit):
        m = json.loads(json.dumps(good))
        edit(m["oracle"])
        (bad / "oracle.json").write_text(json.dumps(m["oracle"]))
        m["files"]["oracle.json"]["size"] = (bad / "oracle.json").stat().st_size
        (bad / "manifest.json").write_text(json.dumps(m))
        return m

    o = good["oracle"]
    step = max(range(16), key=lambda i: o["step_gaps"][i])
    wrong = (o["reference_ids"][step] + 1) % 512

    def consistent(r):
        r["reference_ids"][step] = r["step_top2"][step][0] = wrong
        r["tf_argmax"][len(r["prompt_ids"]) - 1 + step] = wrong

    m = write(consistent)
    assert main(["verify", str(bad)]) == 2
    assert "oracle.json: sha256 does not match manifest.json" in capsys.readouterr().err
    m["files"]["oracle.json"]["sha256"] = hashlib.sha256((bad / "oracle.json").read_bytes()).hexdigest()
    (bad / "manifest.json").write_text(json.dumps(m))
    assert main(["verify", str(bad)]) == 1
    assert "FAIL" in capsys.readouterr().out
    for edit, field in ((lambda r: r["step_gaps"].__setitem__(step, 0.0), "step_gaps"),
                        (lambda r: r["reference_ids"].__setitem__(step, wrong), "step_top2")):
        m = write(edit)
        m["files"]["oracle.json"]["sha256"] = hashlib.sha256((bad / "oracle.json").read_bytes()).hexdigest()
        (bad / "manifest.json").write_text(json.dumps(m))
        assert main(["verify", str(bad)]) == 2
        assert f"oracle record: field '{field}' step {step}" in _error_line(capsys)


def test_verify_refuses_an_oracle_of_another_template_and_a_reference_without_one(oracle_bundle, tiny_ckpt,
                                                                                tmp_path, capsys):
    """The stored prompt ids must be this bundle's chat encoding of the stored prompt (a record made with another
    tokenizer or template is refused, exit 2); `--reference` on a bundle without a chat template is one line,
    not a traceback."""
    bad = tmp_path / "bundle"
    shutil.copytree(oracle_bundle, bad)
    m = json.loads((bad / "manifest.json").read_text())
    tpl = bad / "tokenizer" / "chat_template.jinja"
    tpl.write_text("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    m["files"]["tokenizer/chat_template.jinja"] = {"size": tpl.stat().st_size,
                                                   "sha256": hashlib.sha256(tpl.read_bytes()).hexdigest()}
    (bad / "manifest.json").write_text(json.dumps(m))
    assert main(["verify", str(bad)]) == 2
    assert "the oracle's prompt_ids are not this bundle's chat encoding of its prompt" in _error_line(capsys)
    tpl.unlink()
    del m["files"]["tokenizer/chat_template.jinja"]
    (bad / "manifest.json").write_text(json.dumps(m))
    assert main(["verify", str(bad), "--reference", str(tiny_ckpt)]) == 2
    assert "the bundle has no chat template, which the reference needs" in _error_line(capsys)


def test_verify_without_oracle_says_so(tiny_bundle, capsys):
    if Bundle.open(tiny_bundle).oracle:
        pytest.skip("tiny_bundle carries an oracle")
    assert main(["verify", str(tiny_bundle)]) == 2
    assert "holds no oracle" in _error_line(capsys)


def test_prompt_over_max_context(tmp_path_factory, tiny_ckpt, capsys):
    small = make_bundle(tmp_path_factory, tiny_ckpt, max_context=8)
    assert main(["generate", str(small), "--prompt-ids", ",".join(["5"] * 9)]) == 2
    assert _error_line(capsys) == ("error: the prompt is 9 tokens; the bundle's max context is 8 (shorten the "
                                   "prompt, or convert with a larger --max-context)")
    assert main(["generate", str(small), "--prompt-ids", ",".join(["5"] * 8), "--json"]) == 0  # a full context
    out = json.loads(capsys.readouterr().out)  # still yields the one token its last position predicts
    assert len(out["tokens"]) == 1 and out["finish_reason"] == "context"


def test_token_id_out_of_range(oracle_bundle, capsys):
    assert main(["generate", str(oracle_bundle), "--prompt-ids", "2,999999"]) == 2
    assert _error_line(capsys) == "error: token id 999999 is out of range for the vocabulary of 512"
    assert main(["generate", str(oracle_bundle), "--prompt-ids", "2,x"]) == 2
    assert _error_line(capsys) == "error: --prompt-ids: 'x' is not an integer token id"


@pytest.mark.parametrize("flag,value", [("--backend", "tensorrt"), ("--device", "tpu")])
def test_unknown_backend_or_device(oracle_bundle, capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        main(["generate", str(oracle_bundle), "--prompt", "hi", flag, value])
    assert e.value.code == 2
    assert f"argument {flag}: invalid choice: '{value}'" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_gpu(oracle_bundle, capsys):
    assert main(["generate", str(oracle_bundle), "--prompt", "hi", "--device", "cuda"]) == 2
    assert _error_line(capsys).startswith("error: device 'cuda' requested but no CUDA GPU is available")


@pytest.mark.parametrize("extra,message", [
    (["--device", "cpu"], "error: --backend fast runs on CUDA only (got --device cpu)"),
    (["--dtype", "fp32"], "error: --backend fast computes in bf16 (got --dtype fp32)"),
    (["--linear", "cpu-int4"], "error: --linear cpu-int4 is a CPU strategy"),
])
def test_fast_backend_bad_options(oracle_bundle, capsys, extra, message):
    assert main(["generate", str(oracle_bundle), "--prompt", "hi", "--backend", "fast", *extra]) == 2
    assert _error_line(capsys).startswith(message)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_fast_backend_without_gpu(oracle_bundle, capsys):
    assert main(["verify", str(oracle_bundle), "--backend", "fast"]) == 2
    assert _error_line(capsys).startswith("error: the fast path needs a CUDA GPU")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fast_backend_verifies_and_generates(oracle_bundle, capsys):
    """verify and generate on the CUDA fast path: the stored fp32 oracle passes (margin rule, bf16), and greedy
    generation runs to its length with the text of its tokens."""
    assert main(["verify", str(oracle_bundle), "--backend", "fast", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["passed"] and "fast cuda" in rep["backend"]
    assert main(["generate", str(oracle_bundle), "--prompt-ids", "2,105,300,301,302,106,107,105,200,107", "--greedy",
                 "--max-new-tokens", "8", "--stop-ids", "0", "--backend", "fast", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert len(rec["tokens"]) == 8 and rec["finish_reason"] == "length"
    assert rec["text"] == Bundle.open(oracle_bundle).tokenizer().decode(rec["tokens"], skip_special_tokens=True)


@pytest.mark.parametrize("extra,message", [
    ([], "error: compile needs a cpu-int4 linear strategy (--linear cpu-int4 or cpu-int4-f32"),
    (["--backend", "fast"], "error: --compile is for --backend torch"),
])
def test_compile_needs_the_cpu_int4_engine(oracle_bundle, capsys, extra, message):
    assert main(["generate", str(oracle_bundle), "--prompt", "hi", "--compile", *extra]) == 2
    assert _error_line(capsys).startswith(message)


def test_generate_with_compiled_cpu_step(oracle_bundle, capsys):
    """--compile with the native int4 kernel (fp32 activations): says it compiles, and greedy tokens equal the eager
    step's."""
    args = ["generate", str(oracle_bundle), "--prompt-ids", "2,105,300,301,302,106,107,105,200,107", "--greedy",
            "--max-new-tokens", "6", "--stop-ids", "0", "--linear", "cpu-int4-f32", "--json"]
    assert main(args) == 0
    eager = json.loads(capsys.readouterr().out)["tokens"]
    assert main(args + ["--compile"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["tokens"] == eager and len(eager) == 6
    assert "the first decode step compiles the model" in err


def test_coreai_backend_needs_export(oracle_bundle, capsys):
    assert main(["generate", str(oracle_bundle), "--prompt", "hi", "--backend", "coreai"]) == 2
    line = _error_line(capsys)
    assert "coreai" in line and ("--export OUT" in line or "pip install" in line)


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_bundle_with_bad_table(oracle_bundle, tmp_path, capsys, damage):
    bad = tmp_path / "bundle"
    shutil.copytree(oracle_bundle, bad)
    table = bad / "embed_per_layer.i8"
    if damage == "missing":
        table.unlink()
        want = f"error: {table}: missing (listed in manifest.json)"
    else:
        size = table.stat().st_size
        with open(table, "r+b") as f:
            f.truncate(size - 100)
        want = f"error: {table}: truncated or wrong size ({size - 100} bytes, manifest says {size})"
    assert main(["generate", str(bad), "--prompt", "hi"]) == 2
    assert _error_line(capsys) == want
