"""Core AI export (issue 4): layout, int4 lattice read-back, stock-op refusal, atomicity, and the exported graphs
verified on the Core AI runtime (oracle + 24-token probe against the torch backend).

Runtime checks run in a subprocess: Core AI runtime faults are Swift fatal errors that abort the process.
The Linux runtime is a slow interpreter, so the graphs are built with a 64-token context.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_bundle

from gemma4_coreai.errors import Gemma4Error
from gemma4_coreai.export_coreai import INSTALL_HINT, artifact_name, export_coreai, require_coreai

try:
    require_coreai()
    COREAI_SKIP = None
except Gemma4Error as e:
    COREAI_SKIP = str(e)

needs_coreai = pytest.mark.skipif(COREAI_SKIP is not None, reason=f"coreai extra unavailable: {COREAI_SKIP}")
pytestmark = pytest.mark.coreai

MAX_CTX = 64


def _oracle_hook(ckpt, tmp):
    from tokenizers import Tokenizer

    from gemma4_coreai.oracle import make_oracle

    tok = Tokenizer.from_file(str(ckpt.path / "tokenizer.json"))
    return make_oracle(ckpt.path, tok, (ckpt.path / "chat_template.jinja").read_text(), n_tokens=24,
                       log=lambda s: None)


@pytest.fixture(scope="module")
def oracle_bundle(tmp_path_factory, tiny_ckpt) -> Path:
    from conftest import make_bundle

    return make_bundle(tmp_path_factory, tiny_ckpt, oracle_hook=_oracle_hook, max_context=128)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, oracle_bundle) -> Path:
    """Both modes with the default fp16 KV state (the published contract)."""
    out = tmp_path_factory.mktemp("coreai") / "out"
    export_coreai(oracle_bundle, out, mode="both", max_context=MAX_CTX, log=lambda s: None)
    return out


def _run_worker(*args: str, timeout: int = 600) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    p = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=timeout, env=env)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"worker failed (rc {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULT "):])


# ---- layout and metadata ----------------------------------------------------------------------------------

@needs_coreai
def test_layout_and_metadata(exported: Path, oracle_bundle: Path):
    from gemma4_coreai.bundle import Bundle

    b = Bundle.open(oracle_bundle)
    cfg = b.config
    for mode, name in (("provider", "gemma4_custom_decode_int4lin"), ("tbl", "gemma4_custom_decode_int4lin_tbl")):
        d = exported / "gpu-pipelined" / name
        assert {p.name for p in (d / f"{name}.aimodel").iterdir()} >= {"main.mlirb", "main.hash", "metadata.json"}
        assert {p.name for p in (d / "tokenizer").iterdir()} == {
            "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"}
        m = json.loads((d / "metadata.json").read_text())
        assert (m["metadata_version"], m["kind"], m["name"]) == ("0.2", "llm", name)
        assert m["assets"]["main"] == f"{name}.aimodel"
        lang = m["language"]
        assert (lang["tokenizer"], lang["vocab_size"], lang["max_context_length"]) == ("tokenizer", 512, MAX_CTX)
        assert lang["embedded_tokenizer"] is True and lang["function_map"] == {"decode": "main"}
        assert {"source", "compression", "compilation"} <= m.keys()
        g = m["gemma4"]
        assert g["ple_mode"] == mode
        assert g["states"]["k_cache"]["shape"] == [cfg.num_kv_slots, 1, cfg.num_kv_heads, MAX_CTX, cfg.max_head_dim]
        assert g["states"]["k_cache"]["dtype"] == g["states"]["v_cache"]["dtype"] == "float16"
        assert (d / g["ple_tables"]).resolve() == (exported / "ios-frontend" / "gemma4_custom_gather_raw").resolve()
    tables = exported / "ios-frontend" / "gemma4_custom_gather_raw"
    for f in ("embed_per_layer.i8", "embed_per_layer.scale.f32"):
        assert (tables / f).read_bytes() == (oracle_bundle / f).read_bytes()
    meta = json.loads((tables / "meta.json").read_text())
    assert meta["row_width"] == cfg.ple_width and meta["table"]["shape"] == [512, cfg.ple_width]
    assert not list(exported.parent.glob("out.tmp-*"))


@needs_coreai
def test_runtime_signature(exported: Path):
    """The saved graph's inputs, output and states are the contract's names, dtypes and shapes."""
    from coreai.authoring import AIModelAsset

    d = exported / "gpu-pipelined"
    s = AIModelAsset.load(d / "gemma4_custom_decode_int4lin" / "gemma4_custom_decode_int4lin.aimodel").summary()
    ins = dict(s.function_inputs("main"))
    assert list(ins) == ["input_ids", "position", "ple_tokens"]
    assert "Int32" in ins["input_ids"] and "1 × 1" in ins["input_ids"] and "Int32" in ins["position"]
    assert "Float16" in ins["ple_tokens"] and "1 × 1 × 8 × 32" in ins["ple_tokens"]
    outs = dict(s.function_outputs("main"))
    assert list(outs) == ["logits"] and "Float16" in outs["logits"] and "1 × 1 × 512" in outs["logits"]
    states = dict(s.function_states("main"))
    assert sorted(states) == ["k_cache", "v_cache"] and all("Float16" in v for v in states.values())
    t = AIModelAsset.load(d / "gemma4_custom_decode_int4lin_tbl" / "gemma4_custom_decode_int4lin_tbl.aimodel")
    ins = dict(t.summary().function_inputs("main"))
    assert list(ins) == ["input_ids", "position", "ple_table", "ple_scale"]
    assert "Int8" in ins["ple_table"] and "512 × 256" in ins["ple_table"] and "Float32" in ins["ple_scale"]


# ---- int4 on the exact lattice ----------------------------------------------------------------------------

@needs_coreai
@pytest.mark.parametrize("name", ["gemma4_custom_decode_int4lin", "gemma4_custom_decode_int4lin_tbl"])
def test_int4_readback_is_the_bundle_lattice(exported: Path, oracle_bundle: Path, name: str):
    """Every linear and the head, read back from the saved asset's constants, equals the bundle's q and d."""
    from gemma4_coreai.bundle import Bundle
    from gemma4_coreai.export_coreai import read_int4_constants

    b = Bundle.open(oracle_bundle)
    got = read_int4_constants(exported / "gpu-pipelined" / name / f"{name}.aimodel")
    want = [*b.config.linear_shapes(), "lm_head"]
    assert len(got) == len(want)
    unmatched = list(range(len(got)))
    for lin in want:
        q, d = b.linear(lin)
        assert d.dtype == torch.float16
        q, d = q.numpy(), d.numpy().view("uint16")
        hit = next((i for i in unmatched if got[i][0].shape == q.shape and (got[i][0] == q).all()
                    and (got[i][1].view("uint16") == d).all()), None)
        assert hit is not None, f"{lin}: no int4 constant in the asset equals the bundle's q and d"
        unmatched.remove(hit)


# ---- refusals and atomicity -------------------------------------------------------------------------------

@needs_coreai
def test_custom_op_is_refused():
    from gemma4_coreai.export_coreai import trace

    @torch.library.custom_op("g4test::mystery", mutates_args=())
    def mystery(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @mystery.register_fake
    def _(x):
        return torch.empty_like(x)

    class M(torch.nn.Module):
        def forward(self, x):
            return torch.ops.g4test.mystery(x) + 1

    with pytest.raises(Gemma4Error, match=r"op g4test\.mystery\.default has no stock Core AI lowering") as e:
        trace(M(), (torch.randn(2, 4),))
    assert "\n" not in str(e.value)


@needs_coreai
def test_fp32_scales_are_refused():
    from gemma4_coreai.export_coreai import _ExportWeights

    class FakeBundle:
        def tensor(self, name):
            return torch.ones(4, 1, dtype=torch.float32)

    with pytest.raises(Gemma4Error, match="not fp16-exact"):
        _ExportWeights(FakeBundle())["layers.0.mlp.up_proj.scale"]


def test_missing_extra_says_how_to_install(tmp_path, monkeypatch, tiny_bundle, capsys):
    """Without the coreai extra: one line with the pip command, nothing written (import failure simulated)."""
    import argparse

    from gemma4_coreai.export_coreai import add_export_parser, run_export

    mods = ("coreai", "coreai.authoring", "coreai.runtime", "coreai_torch", "coreai_torch._compression.custom_layers")
    for mod in mods:
        monkeypatch.setitem(sys.modules, mod, None)  # `import` of a None entry raises ImportError
    parser = argparse.ArgumentParser()
    add_export_parser(parser.add_subparsers())
    out = tmp_path / "out"
    args = parser.parse_args(["export-coreai", str(tiny_bundle), "-o", str(out)])
    with pytest.raises(Gemma4Error) as e:
        run_export(args)
    msg = str(e.value)
    assert INSTALL_HINT in msg and "\n" not in msg
    assert list(tmp_path.iterdir()) == []


@needs_coreai
def test_existing_out_and_failure_leave_nothing_half_written(tmp_path, tiny_bundle, monkeypatch):
    import gemma4_coreai.export_coreai as ex

    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(Gemma4Error, match="already exists"):
        export_coreai(tiny_bundle, out)

    def boom(bundle, mode, root, *a, **k):
        (root / "gpu-pipelined" / "half").mkdir(parents=True)
        raise Gemma4Error("Core AI conversion failed: simulated")

    monkeypatch.setattr(ex, "export_mode", boom)
    with pytest.raises(Gemma4Error, match="simulated"):
        export_coreai(tiny_bundle, out, force=True)
    assert list(tmp_path.iterdir()) == [out] and list(out.iterdir()) == []  # the old OUT is untouched
    with pytest.raises(Gemma4Error, match="simulated"):
        export_coreai(tiny_bundle, tmp_path / "new")
    assert list(tmp_path.iterdir()) == [out]


def test_artifact_names():
    assert artifact_name("e4b", "provider", True) == "gemma4_e4b_qat_decode_int4lin"
    assert artifact_name("e2b", "tbl", False) == "gemma4_e2b_decode_int4lin_tbl"
    from gemma4_coreai.export_coreai import tables_dir_name

    assert tables_dir_name("gemma4_e4b_qat_decode_int4lin_tbl") == "gemma4_e4b_qat_gather_raw"


# ---- on the Core AI runtime -------------------------------------------------------------------------------

@needs_coreai
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["provider", "tbl"])
def test_runtime_passes_oracle_and_probe(exported: Path, oracle_bundle: Path, mode: str):
    r = _run_worker("verify", str(exported), str(oracle_bundle), mode)
    assert r["backend"].startswith(f"coreai gemma4_custom_decode_int4lin{'_tbl' if mode == 'tbl' else ''} ")
    assert r["passed"], r["report"]
    fr = r["free_running"]
    assert fr["mismatch"] is None and not fr["ties"] and fr["matched"] == fr["tokens"]
    assert not r["teacher_forced"]["mismatches"]
    probe = r["determinism"]
    assert probe["against"] == "second backend" and probe["identical_tokens"] == 24


@needs_coreai
@pytest.mark.slow
def test_fp32_kv_option_graph_matches_its_eager_module(tmp_path: Path, oracle_bundle: Path):
    """--kv-dtype fp32 (the option beside the fp16 default): an fp32 state, and the graph computes what the same
    module computes eagerly."""
    out = tmp_path / "out32"
    export_coreai(oracle_bundle, out, mode="provider", max_context=32, kv_dtype="fp32", log=lambda s: None)
    meta = json.loads((out / "gpu-pipelined" / "gemma4_custom_decode_int4lin" / "metadata.json").read_text())
    assert meta["gemma4"]["states"]["k_cache"]["dtype"] == "float32"
    r = _run_worker("eager", str(out), str(oracle_bundle), "fp32")
    assert r["state_dtype"] == "float32"
    assert r["argmax_equal"] and r["max_abs_diff"] < 0.1, r


@needs_coreai
@pytest.mark.slow
def test_runtime_prompt_checked_whole_and_usable_inside_an_event_loop(exported: Path, oracle_bundle: Path):
    """A prompt with a bad id or past the max context is refused before any of it runs (position stays 0, as with
    the torch backend), and the backend works where the calling thread already runs an event loop (Jupyter)."""
    r = _run_worker("guards", str(exported), str(oracle_bundle))
    (kind1, msg1, pos1), (kind2, msg2, pos2) = r["errors"]
    assert kind1 == kind2 == "Gemma4Error" and pos1 == pos2 == 0, r
    assert "token id 515 is out of range for vocab size 512" in msg1
    assert f"sequence of {MAX_CTX + 1} tokens exceeds the max context of {MAX_CTX} tokens" in msg2
    assert r["in_loop"] == r["direct"] and r["direct"][1] == 3, r


@needs_coreai
def test_backend_refuses_another_mode_and_damaged_metadata(exported: Path, tmp_path: Path):
    """One line, before the runtime loads anything: a model directory of the other PLE mode than the one asked for,
    state specs that are not the exporter's, and a PLE table of the wrong size."""
    import shutil

    from gemma4_coreai.coreai_backend import CoreAIBackend, resolve_model_dir

    provider = exported / "gpu-pipelined" / "gemma4_custom_decode_int4lin"
    assert resolve_model_dir(provider, "provider") == provider
    with pytest.raises(Gemma4Error, match="a provider-mode export, not tbl"):
        resolve_model_dir(provider / "gemma4_custom_decode_int4lin.aimodel", "tbl")
    copy = tmp_path / "out"
    shutil.copytree(exported, copy)
    model = copy / "gpu-pipelined" / "gemma4_custom_decode_int4lin"
    good = json.loads((model / "metadata.json").read_text())
    for edit in (lambda m: m["gemma4"]["states"]["k_cache"].update(dtype="fp16"),
                 lambda m: m["gemma4"]["states"]["v_cache"]["shape"].__setitem__(3, MAX_CTX * 2),
                 lambda m: m["gemma4"]["states"].pop("v_cache")):
        meta = json.loads(json.dumps(good))
        edit(meta)
        (model / "metadata.json").write_text(json.dumps(meta))
        with pytest.raises(Gemma4Error, match="gemma4.states"):
            CoreAIBackend(model)
    (model / "metadata.json").write_text(json.dumps(good))
    table = copy / "ios-frontend" / "gemma4_custom_gather_raw" / "embed_per_layer.i8"
    with table.open("ab") as f:
        f.write(b"\0" * 16)
    with pytest.raises(Gemma4Error, match=r"embed_per_layer.i8: \d+ bytes, expected \d+"):
        CoreAIBackend(model)
    table.unlink()
    with pytest.raises(Gemma4Error, match="embed_per_layer.i8: PLE table missing"):
        CoreAIBackend(model)


def test_metadata_stop_ids_follow_the_generation_config(tiny_bundle, monkeypatch):
    """The exported eos_token_ids are what `generate` stops on: <eos>, <turn|> and generation_config's eos ids."""
    from gemma4_coreai.bundle import Bundle
    from gemma4_coreai.export_coreai import bundle_metadata

    b = Bundle.open(tiny_bundle)
    monkeypatch.setattr(Bundle, "generation_config", property(lambda self: {"eos_token_id": [106, 50]}))
    meta = bundle_metadata("m", b, "provider", 32, "tables")
    assert meta["language"]["eos_token_ids"] == [b.config.eos_token_id, 106, 50]


def test_module_entry_point_checks_like_the_cli(tiny_bundle, tmp_path):
    """`python -m gemma4_coreai.export_coreai` goes through the CLI: --max-context 0 is one line, rc 2, and
    nothing is written (it used to mean the bundle's default); the Python API refuses 0 too."""
    out = tmp_path / "e"
    p = subprocess.run([sys.executable, "-m", "gemma4_coreai.export_coreai", str(tiny_bundle), "-o", str(out),
                        "--max-context", "0"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "max-context" in p.stderr, p.stderr
    assert not out.exists()
    if COREAI_SKIP is None:
        with pytest.raises(Gemma4Error, match="max context 0 is out of range"):
            export_coreai(tiny_bundle, out, max_context=0, log=lambda s: None)
        assert not out.exists()


# ---- subprocess worker ------------------------------------------------------------------------------------

def _worker(argv: list[str]) -> dict:
    import numpy as np

    from gemma4_coreai import oracle
    from gemma4_coreai.backends import TorchBackend
    from gemma4_coreai.bundle import Bundle
    from gemma4_coreai.coreai_backend import CoreAIBackend

    cmd, export_dir, bundle_dir = argv[:3]
    b = Bundle.open(bundle_dir)
    if cmd == "guards":  # a bad prompt leaves the state alone; the backend runs inside a running event loop
        import asyncio

        be = CoreAIBackend(export_dir, mode="provider")
        errors = []
        for ids in ([5, 6, be.vocab_size + 3], [5] * (be.max_context + 1)):
            try:
                be.prefill(ids)
            except Exception as e:  # noqa: BLE001 - reported to the test
                errors.append([type(e).__name__, str(e), be.position])

        async def inside_a_loop():
            be.reset()
            return int(be.prefill(b.oracle["prompt_ids"][:3]).argmax()), be.position

        in_loop = asyncio.run(inside_a_loop())
        be.reset()
        direct = int(be.prefill(b.oracle["prompt_ids"][:3]).argmax()), be.position
        be.close()
        return {"errors": errors, "in_loop": list(in_loop), "direct": list(direct)}
    if cmd == "verify":
        be = CoreAIBackend(export_dir, mode=argv[3])
        ref = TorchBackend.from_bundle(b, max_context=be.max_context)
        rep = oracle.verify(be, b.oracle, probe_backend=ref)
        return {"backend": be.describe(), "report": oracle.format_report(rep), **rep}
    # eager: the graph against the module it was traced from, same inputs, 20 steps (past the window of 16)
    from gemma4_coreai.export_coreai import DecodeStep, build_decoder

    be = CoreAIBackend(export_dir)
    step = DecodeStep(build_decoder(b, be.max_context, argv[3]), "provider")
    diff, same = 0.0, True
    for pos, tok in enumerate(b.oracle["prompt_ids"][:20]):
        got = be.decode(tok)
        with torch.no_grad():
            want = step(torch.tensor([[tok]], dtype=torch.int32), torch.tensor([pos], dtype=torch.int32),
                        torch.from_numpy(be._ple_row(tok))).float().view(-1)
        diff = max(diff, float((got - want).abs().max()))
        same &= int(got.argmax()) == int(want.argmax())
    return {"max_abs_diff": diff, "argmax_equal": same,
            "state_dtype": str(be._state["k_cache"].numpy().dtype), "numpy": np.__version__}


if __name__ == "__main__":
    result = _worker(sys.argv[1:])
    print("RESULT " + json.dumps(result), flush=True)
    # The Swift runtime can abort during interpreter teardown; the result is out, so skip it.
    os._exit(0)


@needs_coreai
def test_export_of_another_bundle_refused(exported, tiny_ckpt, tmp_path_factory, capsys):
    """An export runs only with the bundle it was made from (the tokenizer, oracle and tables come from the bundle);
    another bundle of the same config, other weights: one line."""
    from conftest import make_ckpt

    from gemma4_coreai.cli import main

    other = make_bundle(tmp_path_factory, make_ckpt(tmp_path_factory, "tiny", seed=1), max_context=MAX_CTX)
    argv = ["generate", str(other), "--prompt-ids", "2,5", "--backend", "coreai", "--export", str(exported),
            "--max-new-tokens", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exported from another bundle than" in err[0], err


@needs_coreai
def test_cli_export_stderr_is_clean(tiny_bundle, tmp_path):
    """The command as a user runs it: exit 0, the artifact written, nothing on stderr (torch's LeafSpec
    FutureWarning from the exporter's pytree specs used to print 2 lines per export), and -q keeps stdout short."""
    out = tmp_path / "e"
    p = subprocess.run([sys.executable, "-m", "gemma4_coreai.cli", "export-coreai", str(tiny_bundle), "-o", str(out),
                        "--max-context", "32", "-q"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stderr == ""
    lines = p.stdout.splitlines()  # -q: what was written and the time only (no coreai-torch progress either)
    assert [ln.split()[0] for ln in lines] == ["wrote", "wrote", "export"], lines  # the graph, the PLE tables
    assert lines[1].split()[1] == str(next(out.glob("ios-frontend/*_gather_raw")))
    assert [len(list(out.glob(f"gpu-pipelined/*/{f}"))) for f in ("*.aimodel", "metadata.json")] == [1, 1]
