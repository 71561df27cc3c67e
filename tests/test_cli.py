import json
import subprocess
import sys

import pytest

from gemma4_coreai import cli
from gemma4_coreai.bundle import Bundle


def test_synth_convert_inspect(tmp_path, capsys):
    ck, out = tmp_path / "ck", tmp_path / "b"
    assert cli.main(["synth", "--shape", "tiny", "-o", str(ck), "--hub-layout", "--prune-shared-kv", "-q"]) == 0
    assert cli.main(["convert", str(ck), "-o", str(out), "-q", "--max-context", "256"]) == 0
    text = capsys.readouterr().out
    assert f"wrote {out}" in text and "lattice: 100.0000% of" in text
    assert Bundle.open(out).max_context == 256
    assert cli.main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "bundle"
    tensors = info["lattice"]["tensors"]
    assert len(tensors) == len(Bundle.open(out).config.linear_shapes()) + 2  # + lm_head and the PLE table
    assert all(t["exact_fraction"] == 1.0 and t["worst_rel_err"] == 0 for t in tensors.values())
    assert info["lattice"]["summary"]["off_lattice_tensors"] == []
    assert cli.main(["inspect", str(ck), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "checkpoint" and info["prefix"] == "model.language_model."
    assert info["lattice"]["summary"]["exact_fraction"] == 1.0
    assert cli.main(["inspect", str(out)]) == 0
    assert "every quantized tensor is on its lattice" in capsys.readouterr().out


def test_errors_are_one_line_exit_2(tmp_path, tiny_ckpt, capsys):
    out = tmp_path / "b"
    out.mkdir()
    assert cli.main(["convert", str(tiny_ckpt), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {out}: already exists (use --force to overwrite)\n"
    assert cli.main(["inspect", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'missing'}: no such checkpoint directory\n"
    assert cli.main(["synth", "--shape", "e9b", "-o", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.startswith("error: unknown shape 'e9b'")


def test_keyboard_interrupt_exit_130(monkeypatch, tmp_path, capsys):
    import gemma4_coreai.synth as synth

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(synth, "synthesize", interrupted)
    assert cli.main(["synth", "--shape", "tiny", "-o", str(tmp_path / "x")]) == 130


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(c in out for c in ("synth", "convert", "inspect"))
    for sub in ("synth", "convert", "inspect"):
        with pytest.raises(SystemExit):
            cli.main([sub, "--help"])
        assert "usage: gemma4-coreai " + sub in capsys.readouterr().out


def test_python_m(tmp_path):
    r = subprocess.run([sys.executable, "-m", "gemma4_coreai", "inspect", str(tmp_path / "nope")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr == f"error: {tmp_path / 'nope'}: no such checkpoint directory\n"
