"""Bad arguments and unwritable outputs: one `error:` line naming the option or file, exit 2, before any work and
without a traceback; nothing half-written, nothing existing overwritten without --force."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
from conftest import make_bundle, make_ckpt

from gemma4_coreai import bench as B
from gemma4_coreai.bundle import Bundle
from gemma4_coreai.cli import build_parser, main


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory, tiny_ckpt):
    """max context 16, no oracle."""
    return make_bundle(tmp_path_factory, tiny_ckpt, max_context=16)


@pytest.fixture
def afile(tmp_path):
    f = tmp_path / "afile"
    f.write_text("not a directory")
    return f


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def _refused(capsys, argv: list[str], want: str) -> None:
    assert main(argv) == 2
    assert _error_line(capsys) == want


# ---- 1. output paths ------------------------------------------------------------------------------------

@pytest.mark.parametrize("cmd", [["synth", "--shape", "tiny", "-o"], ["convert", "{ckpt}", "-o"],
                                 ["export-coreai", "{bundle}", "-o"], ["demo", "--dir"]])
def test_output_under_a_file(cmd, afile, tiny_ckpt, tiny_bundle, capsys):
    argv = [a.format(ckpt=tiny_ckpt, bundle=tiny_bundle) for a in cmd] + [str(afile / "sub")]
    _refused(capsys, argv, f"error: {afile / 'sub'}: {afile} is a file, not a directory")


@pytest.mark.parametrize("filename", ["x.tmp-1/model.safetensors", "x.old-1", None])
def test_os_error_names_the_output(filename, monkeypatch, tmp_path, capsys):
    """A full disk: the error names the output the user gave, not a temporary sibling, and not nothing."""
    import gemma4_coreai.synth as synth

    def full(*a, **k):
        raise OSError(28, "No space left on device", None if filename is None else str(tmp_path / filename))
    monkeypatch.setattr(synth, "synthesize", full)
    _refused(capsys, ["synth", "--shape", "tiny", "-o", str(tmp_path / "x")],
             f"error: {tmp_path / 'x'}: No space left on device")


def test_os_error_names_its_file(monkeypatch, tmp_path, capsys):
    import gemma4_coreai.synth as synth

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied", "/etc/somewhere")
    monkeypatch.setattr(synth, "synthesize", denied)
    _refused(capsys, ["synth", "--shape", "tiny", "-o", str(tmp_path / "x")],
             "error: /etc/somewhere: Permission denied")


# ---- 2. bench -o: checked before the benchmark, written atomically ------------------------------------------

BENCH = ["--prompt-len", "4", "--gen-len", "2", "--repeats", "1", "--warmup", "0"]


@pytest.fixture
def no_bench(monkeypatch):
    monkeypatch.setattr(B, "bench", lambda *a, **k: pytest.fail("the benchmark ran before the -o check"))


def test_bench_out_refusals(tiny_bundle, tmp_path, afile, capsys, no_bench):
    old = tmp_path / "rec.json"
    old.write_text("keep me")
    _refused(capsys, ["bench", str(tiny_bundle), *BENCH, "-o", str(old)],
             f"error: {old}: already exists (use --force to overwrite)")
    assert old.read_text() == "keep me"
    _refused(capsys, ["bench", str(tiny_bundle), *BENCH, "-o", str(tmp_path)],
             f"error: {tmp_path}: is a directory (expected a file name)")
    _refused(capsys, ["bench", str(tiny_bundle), *BENCH, "-o", str(afile / "x.json")],
             f"error: {afile / 'x.json'}: {afile} is a file, not a directory")


def test_bench_out_force_replaces_atomically(tiny_bundle, tmp_path, capsys):
    out = tmp_path / "rec.json"
    out.write_text("old")
    assert B.main([str(tiny_bundle), *BENCH, "--json", "-o", str(out), "--force"]) == 0
    assert json.loads(out.read_text())["results"][0]["prompt_len"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rec.json"]  # no temp file left


# ---- 3, 4, 6, 8, 9. numbers -------------------------------------------------------------------------------

BIG = "999999999999999999999"


@pytest.mark.parametrize("argv,want", [
    (["generate", "{b}", "--prompt", "hi", "--seed", BIG], f"--seed must be in [0, 2**63) (got {BIG})"),
    (["bench", "{b}", "--seed", "-1"], "--seed must be in [0, 2**63) (got -1)"),
    (["demo", "--seed", BIG], f"--seed must be in [0, 2**63) (got {BIG})"),
    (["synth", "--shape", "tiny", "-o", "{tmp}/x", "--seed", str(2**63)],
     f"--seed must be in [0, 2**63) (got {2**63})"),
    (["generate", "{b}", "--prompt", "hi", "--temperature", "nan"],
     "--temperature must be a finite number (got nan)"),
    (["generate", "{b}", "--prompt", "hi", "--temperature", "-0.5"],
     "--temperature must be >= 0 (0 = greedy) (got -0.5)"),
    (["generate", "{b}", "--prompt", "hi", "--top-p", "inf"], "--top-p must be a finite number (got inf)"),
    (["generate", "{b}", "--prompt", "hi", "--top-p", "0"], "--top-p must be in (0, 1] (got 0.0)"),
    (["generate", "{b}", "--prompt", "hi", "--top-k", "-1"], "--top-k must be >= 0 (0 = off) (got -1)"),
    (["generate", "{b}", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1 (got 0)"),
    (["generate", "{b}", "--prompt", "hi", "--max-new-tokens", "-1"], "--max-new-tokens must be >= 1 (got -1)"),
    (["verify", "{b}", "--tokens", "0"], "--tokens must be >= 1 (got 0)"),
    (["verify", "{b}", "--tokens", "-3"], "--tokens must be >= 1 (got -3)"),
    (["verify", "{b}", "--tie-gap", "inf"], "--tie-gap must be a finite number (got inf)"),
    (["verify", "{b}", "--tie-gap", "nan"], "--tie-gap must be a finite number (got nan)"),
    (["export-coreai", "{b}", "-o", "{tmp}/e", "--max-context", "0"], "--max-context must be >= 1 (got 0)"),
    (["convert", "{ckpt}", "-o", "{tmp}/c", "--max-context", "-4"], "--max-context must be >= 1 (got -4)"),
    (["convert", "{ckpt}", "-o", "{tmp}/c", "--oracle-tokens", "0"], "--oracle-tokens must be >= 1 (got 0)"),
    (["convert", "{ckpt}", "-o", "{tmp}/c", "--oracle-tokens", "-2"], "--oracle-tokens must be >= 1 (got -2)"),
    (["bench", "{b}", "--gen-len", "0"], "--gen-len must be >= 1 (got 0)"),
    (["bench", "{b}", "--repeats", "0"], "--repeats must be >= 1 (got 0)"),
    (["bench", "{b}", "--warmup", "-1"], "--warmup must be >= 0 (got -1)"),
    (["bench", "{b}", "--prompt-len", "8", "0"], "--prompt-len must be >= 1 (got 0)"),
])
def test_numbers_out_of_range(argv, want, tiny_bundle, tiny_ckpt, tmp_path, capsys):
    argv = [a.format(b=tiny_bundle, ckpt=tiny_ckpt, tmp=tmp_path) for a in argv]
    _refused(capsys, argv, f"error: {want}")
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_temperature_zero_is_greedy(tiny_bundle, capsys):
    args = ["generate", str(tiny_bundle), "--prompt-ids", "2,105,300", "--max-new-tokens", "3", "--stop-ids", "0",
            "--json"]
    assert main(args + ["--greedy"]) == 0
    greedy = json.loads(capsys.readouterr().out)["tokens"]
    assert main(args + ["--temperature", "0", "--seed", "5"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == greedy


def test_bench_prompt_over_model_positions(small_bundle, capsys):
    """bench sizes its engine's KV cache to prompt + gen (so it may pass the bundle's max context, as the E4B runs
    at 4096 + 256 do), but not the model's positions; refused once the bundle is open, before the engine is built."""
    assert main(["bench", str(small_bundle), "--prompt-len", "4096", "--gen-len", "2", "--repeats", "1"]) == 2
    assert _error_line(capsys) == ("error: --prompt-len 4096 + --gen-len 2 = 4098 tokens exceed the model's 4096 "
                                   "positions (max_position_embeddings)")


# ---- 5. the oracle must fit the max context -----------------------------------------------------------------

@pytest.mark.parametrize("extra,need", [(["--oracle-tokens", "5000", "--max-context", "64"], "the oracle's"),
                                        (["--max-context", "16"], "plus 32 greedy tokens")])
def test_convert_oracle_must_fit(extra, need, tiny_ckpt, tmp_path, capsys):
    assert main(["convert", str(tiny_ckpt), "-o", str(tmp_path / "c"), "-q", *extra]) == 2
    line = _error_line(capsys)
    assert line.startswith("error: --oracle-tokens ") and need in line and "--no-oracle" in line
    assert "max context is " + extra[-1] in line
    assert list(tmp_path.iterdir()) == []


def test_convert_small_context_without_oracle(tiny_ckpt, tmp_path, capsys):
    assert main(["convert", str(tiny_ckpt), "-o", str(tmp_path / "c"), "-q", "--max-context", "16",
                 "--no-oracle"]) == 0
    assert "max context 16" in capsys.readouterr().out


# ---- 7. a closed pipe ---------------------------------------------------------------------------------------

class _ClosedPipe:
    def write(self, s):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        raise BrokenPipeError(32, "Broken pipe")


def test_broken_pipe_is_quiet(tiny_bundle, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    assert main(["generate", str(tiny_bundle), "--prompt-ids", "2,105,300", "--max-new-tokens", "3",
                 "--stop-ids", "0", "--json"]) == 141
    assert capsys.readouterr().err == ""


# ---- 10. flags that would be ignored --------------------------------------------------------------------------

@pytest.mark.parametrize("extra,want", [
    (["--prompt-ids", "2,3", "--chat"], "--chat formats --prompt text; --prompt-ids are fed as they are (drop one)"),
    (["--prompt", "hi", "--system", "be brief"], "--system is part of the chat template: add --chat (with --prompt)"),
    (["--prompt", "hi", "--think"], "--think is part of the chat template: add --chat (with --prompt)"),
    (["--prompt", "hi", "--backend", "coreai", "--dtype", "fp16"],
     "--dtype fp16 is for the torch backends; --backend coreai runs the exported graph as it was built"),
    (["--prompt", "hi", "--backend", "coreai", "--linear", "cpu-int4"],
     "--linear cpu-int4 is for the torch backends; --backend coreai runs the exported graph as it was built"),
    (["--prompt", "hi", "--export", "somewhere"], "--export is for --backend coreai (got --backend torch)"),
])
def test_generate_ignored_flags(extra, want, tiny_bundle, capsys):
    _refused(capsys, ["generate", str(tiny_bundle), *extra], f"error: {want}")


def test_verify_export_without_coreai(tiny_bundle, capsys):
    _refused(capsys, ["verify", str(tiny_bundle), "--backend", "fast", "--export", "x"],
             "error: --export is for --backend coreai (got --backend fast)")


# ---- 11. help -----------------------------------------------------------------------------------------------

def _help(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([command, "--help"])
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_help_texts(capsys):
    bench = _help("bench", capsys)
    assert "BUNDLE bundle directory" in bench and "--force replace FILE if it exists" in bench
    assert "use --dir even if it exists: its checkpoint/ and bundle/ are replaced, other files kept" in _help(
        "demo", capsys)
    verify = _help("verify", capsys)
    assert "compare the first N >= 1 tokens (default: all the oracle holds)" in verify and "0 means" not in verify
    gen = _help("generate", capsys)
    assert "0 = greedy" in gen and "0 = off" in gen and "1 = off" in gen


# ---- 12. a local-looking checkpoint path is not a hub id -------------------------------------------------------

@pytest.mark.parametrize("src", ["./nothere", "sub/typo", "~/surely-not-here-gemma4"])
@pytest.mark.parametrize("cmd", ["convert", "inspect"])
def test_missing_local_checkpoint(src, cmd, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    argv = ["convert", src, "-o", str(tmp_path / "out")] if cmd == "convert" else ["inspect", src]
    _refused(capsys, argv, f"error: {src}: no such checkpoint directory")


# ---- second audit: outputs that would damage an input or a special file; text; ids; combinations ------------

def test_outputs_never_replace_their_input(tiny_bundle, tmp_path, capsys, no_bench):
    _refused(capsys, ["export-coreai", str(tiny_bundle), "-o", str(tiny_bundle), "--force"],
             f"error: {tiny_bundle}: the output would replace or write into the source {tiny_bundle}; choose "
             "another path")
    target = tiny_bundle / "manifest.json"
    _refused(capsys, ["bench", str(tiny_bundle), "-o", str(target), "--force"],
             f"error: {target}: the output would replace or write into the source {tiny_bundle}; choose another path")
    assert Bundle.open(tiny_bundle).config.vocab_size > 0  # still intact


@pytest.mark.parametrize("cmd", [["convert", "{ckpt}", "-o", "{ckpt}/sub"], ["export-coreai", "{b}", "-o", "{b}/x"]])
def test_outputs_never_write_into_their_input(cmd, tiny_ckpt, tiny_bundle, capsys):
    argv = [a.format(ckpt=tiny_ckpt, b=tiny_bundle) for a in cmd]
    before = sorted(p.name for p in Path(argv[1]).iterdir())
    _refused(capsys, argv + ["--force"],
             f"error: {argv[3]}: the output would replace or write into the source {argv[1]}; choose another path")
    assert sorted(p.name for p in Path(argv[1]).iterdir()) == before


def test_special_files_and_empty_paths_refused(tiny_bundle, tiny_ckpt, tmp_path, capsys, no_bench):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    want = f"error: {fifo}: not a regular file or directory (a device, FIFO or socket); choose another path"
    _refused(capsys, ["bench", str(tiny_bundle), "-o", str(fifo), "--force"], want)
    _refused(capsys, ["convert", str(tiny_ckpt), "-o", str(fifo), "--force", "--no-oracle"], want)
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    _refused(capsys, ["export-coreai", str(tiny_bundle), "-o", ""], "error: output path '.': name a new file or "
             "directory")


def test_prompt_text_must_be_utf8(tiny_bundle, capsys):
    bad = b"\xff".decode("utf-8", "surrogateescape")  # what Python makes of a non-UTF-8 argv byte
    _refused(capsys, ["generate", str(tiny_bundle), "--prompt", bad], "error: --prompt: not valid UTF-8 text")
    _refused(capsys, ["generate", str(tiny_bundle), "--prompt", "hi", "--chat", "--system", bad],
             "error: --system: not valid UTF-8 text")


def test_prompt_ids_spaces_separate(tiny_bundle, capsys):
    assert main(["generate", str(tiny_bundle), "--prompt-ids", "2 10", "--max-new-tokens", "1", "--greedy",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["prompt_ids"] == [2, 10]


@pytest.mark.parametrize("extra, want", [
    (["--stop-ids", "99999"], "error: --stop-ids: 99999 is out of range for vocab size 512"),
    (["--greedy", "--temperature", "0.7"],
     "error: --temperature is for sampling; --greedy takes the argmax (drop one)"),
    (["--greedy", "--seed", "3"], "error: --seed is for sampling; --greedy takes the argmax (drop one)"),
])
def test_generate_option_conflicts(tiny_bundle, capsys, extra, want):
    _refused(capsys, ["generate", str(tiny_bundle), "--prompt", "hi", *extra], want)


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate"])
    assert e.value.code == 2
    line = _error_line(capsys)
    assert line.startswith("error: gemma4-coreai generate: ") and line.endswith("(see gemma4-coreai generate --help)")


def test_verify_reference_of_another_model(tiny_bundle, tmp_path_factory, capsys):
    import dataclasses

    from gemma4_coreai.config import preset

    other = make_ckpt(tmp_path_factory, dataclasses.replace(preset("tiny"), sliding_window=8))
    _refused(capsys, ["verify", str(tiny_bundle), "--reference", str(other)],
             f"error: {other}: not this bundle's model (config field 'sliding_window' is 8, the bundle has 16)")


def test_ctrl_c_during_startup_is_quiet(monkeypatch, capsys):
    """The command module imports no torch (the package imports lazily), so the slow start-up imports happen in
    main(), where Ctrl-C prints `interrupted` and exits 130."""
    import subprocess

    code = "import sys, gemma4_coreai.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    import gemma4_coreai.cli as cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert main(["generate", "x"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"
