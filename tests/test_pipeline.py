"""End to end: synth -> convert (with the fp32 HF oracle) -> torch backend, judged by the live fp32 reference.

Three configs (a prompt longer than the sliding window; hub layout with pruned shared KV; E2B-like double-wide
MLP with one KV head), both PLE modes: CPU fp32 must be token-exact for 32 greedy tokens with max
|logit - reference| <= 1e-3. In bf16 (CPU, and CUDA) the DESIGN margin rule applies: a mismatch is a tie only
where the picked token's reference logit is within the tie gap of the reference's top-1. Measured on an H100
(2026-11-28): the tiny and hub configs pass with 0.1; the E2B-like config's bf16 logits sit up to 0.73 from
fp32 (max |logit| 18; the same 0.73 on the CPU's bf16 path, fp32 exact), so bf16 gets the 0.75 tie margin
test_model uses for half precision.
Since session 14's synthetic weights (8-bit scales) the tiny config's bf16 logits also sit up to 0.91 from fp32,
HF's own bf16 likewise (7 of 136 teacher-forced argmaxes differ for both), and at one position both pick the
reference's third token (gap 0.17): hence the near-candidate rule rather than "the runner-up only".
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import make_bundle, make_ckpt

from gemma4_coreai.backends import TorchBackend
from gemma4_coreai.bundle import Bundle
from gemma4_coreai.config import preset
from gemma4_coreai.oracle import convert_hook, load_reference, verify

LONG_PROMPT = ("The old man walked along the shore every morning, listening to the waves and the wind, and he "
               "wrote down what the sea told him in a small book. Write a short poem about the sea.")
BF16_TIE_GAP = 0.75
CONFIGS = {
    "tiny-long-prompt": (lambda: "tiny", {}),
    "hub-pruned": (lambda: "tiny", {"hub_layout": True, "prune_shared_kv": True}),
    "e2b-like": (lambda: dataclasses.replace(preset("tiny"), double_wide_mlp=True, num_kv_heads=1), {}),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def built(request, tmp_path_factory):
    """(checkpoint, bundle with a 32-token oracle on LONG_PROMPT) for one config."""
    shape, synth_kw = CONFIGS[request.param]
    ckpt = make_ckpt(tmp_path_factory, shape(), **synth_kw)
    bundle = make_bundle(tmp_path_factory, ckpt, max_context=256,
                         oracle_hook=convert_hook(n_tokens=32, prompt=LONG_PROMPT, log=lambda m: None))
    return ckpt, bundle


def test_oracle_prompt_exceeds_sliding_window(built):
    _, bundle = built
    b = Bundle.open(bundle)
    assert len(b.oracle["prompt_ids"]) > b.config.sliding_window
    assert len(b.oracle["reference_ids"]) == 32


@pytest.mark.parametrize("ple_mode", ["provider", "tbl"])
def test_cpu_fp32_token_exact_against_live_reference(built, ple_mode):
    ckpt, bundle = built
    b = Bundle.open(bundle)
    oracle = b.oracle
    be = TorchBackend.from_bundle(b, device="cpu", dtype="fp32", ple_mode=ple_mode)
    report = verify(be, oracle)
    assert report["passed"], report
    assert report["free_running"]["matched"] == 32 and not report["free_running"]["ties"]

    # Every logit of every position against the live fp32 reference (not only the stored top-1s).
    seq = oracle["prompt_ids"] + oracle["reference_ids"][:-1]
    with torch.inference_mode():
        ref = load_reference(ckpt)(input_ids=torch.tensor([seq]), use_cache=False).logits[0].float()
    ours = be.forward_all(seq).float()
    assert ours.shape == ref.shape
    assert float((ours - ref).abs().max()) <= 1e-3


def test_cpu_bf16_margin_rule(built):
    """The same judgement on the CPU's bf16 path (the CUDA test's math, which CI can run)."""
    _, bundle = built
    b = Bundle.open(bundle)
    report = verify(TorchBackend.from_bundle(b, device="cpu", dtype="bf16"), b.oracle, tie_gap=BF16_TIE_GAP)
    assert report["passed"], report


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("ple_mode", ["provider", "tbl"])
def test_cuda_bf16_margin_rule(built, ple_mode):
    _, bundle = built
    b = Bundle.open(bundle)
    be = TorchBackend.from_bundle(b, device="cuda", dtype="bf16", ple_mode=ple_mode)
    cpu = TorchBackend.from_bundle(b, device="cpu", dtype="fp32")
    report = verify(be, b.oracle, tie_gap=BF16_TIE_GAP)
    assert report["passed"], report
    # Determinism across devices: where neither side hits a tie, the greedy tokens agree.
    from gemma4_coreai.oracle import determinism_probe

    probe = determinism_probe(be, b.oracle["prompt_ids"], other=cpu)
    assert probe["identical"] or report["free_running"]["ties"], probe
