"""The fp32 Hugging Face reference (the judge of correctness), the oracle record, and `verify`.

The oracle is greedy decoding with transformers in fp32 on the source checkpoint from a chat-formatted
prompt: prompt ids, reference ids, each step's top-2 gap, and the teacher-forced argmax at every position.
A bundle passes when every token matches; a mismatch is a tie (reported, not failed) where the token the backend
picked has a reference logit within the tie gap (0.1) of the reference's top-1. The record keeps, per position,
the reference's near candidates (every token within NEAR_GAP of the top-1, up to NEAR_MAX) to judge that.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil
import torch

from .errors import Gemma4Error
from .generate import encode_chat

TIE_GAP = 0.1
# bf16/fp16 logits of the synthetic models sit up to ~0.7 from fp32 (so do HF's own bf16 logits): on a
# half-precision backend, greedy may part from fp32 where the fp32 top-2 gap is below this.
HALF_TIE_GAP = 0.75
# The near candidates an oracle record keeps per position: enough for any tie gap up to NEAR_GAP. Under half
# precision noise (~0.2-0.9 on the tiny models, HF's own bf16 alike), greedy may pick the reference's third
# token, not only its runner-up.
NEAR_GAP = 1.0
NEAR_MAX = 8
DEFAULT_PROMPT = "Write a short poem about the sea."
PROBE_TOKENS = 24


# ---- the reference ---------------------------------------------------------------------------------------

def reference_ram_bytes(ckpt_dir: str | Path) -> int:
    """fp32 bytes the reference model needs (all text weights as fp32)."""
    from .config import load_config

    cfg = load_config(ckpt_dir)
    n = sum(cfg.param_count().values())
    return 4 * n


def load_reference(ckpt_dir: str | Path):
    """The fp32 transformers model for a checkpoint directory, with the class its layout needs.

    Trap: the hub layout loaded into the text-only class silently gets random weights, so pick the class from
    config.json and refuse any missing weight."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    ckpt_dir = Path(ckpt_dir)
    raw = json.loads((ckpt_dir / "config.json").read_text())
    cls = (transformers.Gemma4ForConditionalGeneration if raw.get("model_type") == "gemma4"
           else transformers.Gemma4ForCausalLM)
    model, info = cls.from_pretrained(ckpt_dir, dtype=torch.float32, attn_implementation="eager",
                                      output_loading_info=True)
    missing = [k for k in info.get("missing_keys", []) if "lm_head" not in k]
    if missing:
        raise Gemma4Error(f"{ckpt_dir}: the reference model is missing weights (e.g. {missing[0]}); "
                          "refusing to judge with random weights")
    return model.eval()


def _top(logits: torch.Tensor) -> tuple[tuple[int, float, int, float], list[list]]:
    """((top-1 id, logit, top-2 id, logit), near candidates) from one ordering of the logits, so that equal logits
    cannot put a token both first and among the candidates. Near candidates: [[id, gap to the top-1], ...] for the
    tokens after the top-1 within NEAR_GAP of it, closest first. Gaps in Python floats, as the record's top-2 gaps."""
    v, i = torch.topk(logits.float(), min(NEAR_MAX + 1, logits.numel()))
    vals, ids = v.tolist(), i.tolist()
    top2 = (ids[0], vals[0], ids[1], vals[1])
    return top2, [[t, vals[0] - x] for t, x in zip(ids[1:], vals[1:], strict=True) if vals[0] - x <= NEAR_GAP]


@torch.inference_mode()
def run_reference(model, prompt_ids: Sequence[int], n_tokens: int) -> dict[str, Any]:
    """Forced-greedy decoding (no sampling, no stop tokens) plus one teacher-forced pass over the result."""
    ids = torch.tensor([list(prompt_ids)])
    # transformers >= 5.2x names the KV cache argument `cache` (`past_key_values` before, now deprecated).
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=ids, use_cache=True)
    ref_ids, step_top2, step_near = [], [], []
    for step in range(n_tokens):
        top, near = _top(out.logits[0, -1])
        ref_ids.append(top[0])
        step_top2.append(top)
        step_near.append(near)
        if step + 1 < n_tokens:
            past = getattr(out, "cache", None) or out.past_key_values
            out = model(input_ids=torch.tensor([[top[0]]]), use_cache=True, **{cache_kw: past})
    full = list(prompt_ids) + ref_ids[:-1]
    logits = model(input_ids=torch.tensor([full]), use_cache=False).logits[0]
    if not (torch.isfinite(logits).all() and all(math.isfinite(t[1]) and math.isfinite(t[3]) for t in step_top2)):
        raise Gemma4Error("the fp32 reference produced non-finite logits (NaN/inf): the checkpoint's weights are "
                          "not usable")
    tf, tf_near = zip(*(_top(row) for row in logits), strict=True)
    return {
        "prompt_ids": list(prompt_ids),
        "reference_ids": ref_ids,
        "step_gaps": [t[1] - t[3] for t in step_top2],
        "step_top2": [list(t) for t in step_top2],
        "step_near": step_near,
        "tf_argmax": [t[0] for t in tf],
        "tf_gaps": [t[1] - t[3] for t in tf],
        "tf_second": [t[2] for t in tf],
        "tf_near": list(tf_near),
        "tf_top1_logit": [t[1] for t in tf],
    }


def make_oracle(ckpt_dir: str | Path, tokenizer, chat_template: str, *, prompt: str = DEFAULT_PROMPT,
                n_tokens: int = 32, log=print) -> dict[str, Any] | None:
    """The oracle record for a checkpoint, or None (with a logged reason) when the fp32 reference can't fit."""
    import transformers

    need = reference_ram_bytes(ckpt_dir)
    have = psutil.virtual_memory().available
    if need * 1.3 > have:
        log(f"oracle skipped: the fp32 reference needs ~{need / 1e9:.1f} GB of RAM, {have / 1e9:.1f} GB available; "
            "run `gemma4-coreai verify BUNDLE --reference SRC` on a machine with more memory")
        return None
    prompt_ids = encode_chat(tokenizer, chat_template, prompt)
    record = run_reference(load_reference(ckpt_dir), prompt_ids, n_tokens)
    record.update(prompt=prompt, tokens=n_tokens, tie_gap=TIE_GAP,
                  reference={"library": "transformers", "version": transformers.__version__, "dtype": "float32",
                             "decoding": "greedy"})
    return record


# ---- verification ----------------------------------------------------------------------------------------

def check_oracle(oracle: Any, vocab_size: int | None = None) -> None:
    """The fields `verify` reads, their types and lengths, all values finite, token ids below `vocab_size`: one-line
    Gemma4Error naming the field (a hand-edited or damaged oracle must not crash `verify`, or pass it vacuously)."""
    def bad(field: str, why: str) -> Gemma4Error:
        return Gemma4Error(f"oracle record: field '{field}' {why}")

    if not isinstance(oracle, dict):
        raise Gemma4Error(f"oracle record: expected a JSON object, got {type(oracle).__name__}")

    def ints(field: str, n: int | None = None) -> list:
        v = oracle.get(field)
        if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v):
            raise bad(field, "must be a list of token ids")
        if n is not None and len(v) != n:
            raise bad(field, f"has {len(v)} entries, expected {n}")
        if vocab_size is not None and any(x >= vocab_size for x in v):
            raise bad(field, f"holds token id {max(v)}, out of range for vocab size {vocab_size}")
        return v

    def numbers(field: str, n: int) -> None:
        v = oracle.get(field)
        if not isinstance(v, list) or len(v) != n:
            raise bad(field, f"must be a list of {n} numbers")
        flat = [y for x in v for y in (x if isinstance(x, list) else [x])]
        if not all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in flat):
            raise bad(field, "holds a value that is not a finite number")

    prompt, ref = ints("prompt_ids"), ints("reference_ids")
    if not prompt:
        raise bad("prompt_ids", "is empty")
    numbers("step_gaps", len(ref))
    numbers("step_top2", len(ref))
    if not all(isinstance(x, list) and len(x) == 4 for x in oracle["step_top2"]):
        raise bad("step_top2", "must hold [top1 id, top1 logit, top2 id, top2 logit] per step")
    positions = len(prompt) + max(len(ref) - 1, 0)
    tf_argmax = ints("tf_argmax", positions)
    numbers("tf_gaps", positions)
    if "tf_second" in oracle:  # the teacher-forced runner-up ids (records written since session 13)
        ints("tf_second", positions)

    def near(field: str, top1: list, gaps: list, second: list | None) -> None:  # records since session 14
        v = oracle.get(field)
        if v is None:
            return
        if not isinstance(v, list) or len(v) != len(top1):
            raise bad(field, f"must be a list of {len(top1)} candidate lists")
        for i, (cands, t, gap) in enumerate(zip(v, top1, gaps, strict=True)):
            ok = isinstance(cands, list) and all(
                isinstance(c, list) and len(c) == 2 and isinstance(c[0], int) and not isinstance(c[0], bool)
                and 0 <= c[0] < (vocab_size or c[0] + 1) and c[0] != t and isinstance(c[1], int | float)
                and not isinstance(c[1], bool) and 0 <= c[1] <= NEAR_GAP + 1e-6 for c in cands)
            if not ok or len(cands) > NEAR_MAX or len({c[0] for c in cands}) != len(cands):
                raise bad(field, f"position {i}: expected up to {NEAR_MAX} [token id, gap] pairs of other tokens "
                                 f"with gaps in [0, {NEAR_GAP}]")
            if [c[1] for c in cands] != sorted(c[1] for c in cands):
                raise bad(field, f"position {i}: candidates are not sorted by gap")
            # the closest candidate is the runner-up: its id, and its gap is the position's top-2 gap
            if (gap <= NEAR_GAP) != bool(cands) or (cands and abs(cands[0][1] - gap) > 1e-4 * max(1.0, gap)):
                raise bad(field, f"position {i}: the closest candidate's gap is not the top-2 gap {gap}")
            if cands and second is not None and cands[0][0] != second[i]:
                raise bad(field, f"position {i}: the closest candidate {cands[0][0]} is not the runner-up {second[i]}")

    # The fields must agree with each other, as the reference wrote them: an edited or mixed-up record could
    # otherwise make every mismatch a "tie".
    for i, (t, gap) in enumerate(zip(oracle["step_top2"], oracle["step_gaps"], strict=True)):
        if not (isinstance(t[0], int) and isinstance(t[2], int)) or t[0] != ref[i]:
            raise bad("step_top2", f"step {i}: top-1 id {t[0]!r} is not reference_ids' {ref[i]}")
        if gap < 0 or abs(gap - (t[1] - t[3])) > 1e-4 * max(1.0, abs(t[1])):
            raise bad("step_gaps", f"step {i}: {gap} is not the top-2 gap of step_top2 ({t[1] - t[3]})")
    if any(g < 0 for g in oracle["tf_gaps"]):
        raise bad("tf_gaps", "holds a negative gap")
    for i, r in enumerate(ref):  # teacher forcing over the reference's own tokens picks them again
        pos = len(prompt) - 1 + i
        if pos < positions and tf_argmax[pos] != r and min(oracle["tf_gaps"][pos], oracle["step_gaps"][i]) >= 1e-3:
            raise bad("tf_argmax", f"position {pos} is {tf_argmax[pos]}, but the reference chose {r} there")
    near("step_near", ref, oracle["step_gaps"], [t[2] for t in oracle["step_top2"]])
    near("tf_near", tf_argmax, oracle["tf_gaps"], oracle.get("tf_second"))


def teacher_forced_logits(backend, ids: Sequence[int]) -> torch.Tensor:
    """[len(ids), V] logits at every position: one batched pass where the backend has one, else S=1 steps."""
    if hasattr(backend, "forward_all"):
        return backend.forward_all(list(ids)).float().cpu()
    backend.reset()
    rows = [backend.prefill([ids[0]])]
    rows += [backend.decode(t) for t in ids[1:]]
    return torch.stack([r.float().cpu() for r in rows])


def greedy_tokens(backend, prompt_ids: Sequence[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    backend.reset()
    logits = backend.prefill(list(prompt_ids))
    toks, rows = [], []
    for i in range(n):
        rows.append(logits.float().cpu())
        toks.append(int(torch.argmax(logits)))
        if i + 1 < n:
            logits = backend.decode(toks[-1])
    return toks, rows


def default_tie_gap(backend: Any) -> float:
    """DESIGN's 0.1 margin, or HALF_TIE_GAP for a backend that computes in bf16/fp16 (torch, fast)."""
    return HALF_TIE_GAP if getattr(backend, "dtype", None) in (torch.bfloat16, torch.float16) else TIE_GAP


def _is_tie(got: int, tie_gap: float, near: list | None, runner_up: int | None, top2_gap: float) -> bool:
    """Whether picking `got` over the reference's top-1 is a tie: its reference logit lies within `tie_gap` of the
    top-1's. Records since session 14 list the near candidates (a gap over NEAR_GAP is never a tie); older ones
    only the runner-up (session 13: `got` must be it) or only the top-2 gap (before: any token under it)."""
    if near is not None:
        return any(t == got and g < tie_gap for t, g in near)
    return top2_gap < tie_gap and (runner_up is None or got == runner_up)


def verify(backend, oracle: dict[str, Any], *, tokens: int | None = None, probe_backend=None,
           tie_gap: float = TIE_GAP) -> dict[str, Any]:
    """Check a backend against an oracle record. Returns a report; report['passed'] is the verdict.

    `tie_gap`: a mismatch is a tie where the reference's logit of the token the backend picked lies within it of
    the reference's top-1 logit (DESIGN: 0.1; tokens farther than NEAR_GAP are not in the record: never ties)."""
    vocab = getattr(getattr(backend, "config", None), "vocab_size", None) or getattr(backend, "vocab_size", None)
    check_oracle(oracle, vocab)
    prompt = oracle["prompt_ids"]
    ref = oracle["reference_ids"]
    gaps = oracle["step_gaps"]
    n = min(tokens or len(ref), len(ref))
    if n <= 0:
        raise Gemma4Error("the oracle holds no reference tokens")

    # Free-running greedy: compare until the first divergence (after it the sequences differ by construction).
    got, rows = greedy_tokens(backend, prompt, n)
    free = {"tokens": n, "matched": 0, "ties": [], "mismatch": None,
            "max_top1_logit_err": 0.0}
    for i in range(n):
        free["max_top1_logit_err"] = max(free["max_top1_logit_err"],
                                         abs(float(rows[i][ref[i]]) - oracle["step_top2"][i][1]))
        if got[i] == ref[i]:
            free["matched"] += 1
            continue
        entry = {"step": i, "got": got[i], "expected": ref[i], "ref_gap": gaps[i]}
        step_near = oracle.get("step_near")
        if _is_tie(got[i], tie_gap, step_near and step_near[i], oracle["step_top2"][i][2], gaps[i]):
            free["ties"].append(entry)
        else:
            free["mismatch"] = entry
        break

    # Teacher-forced: argmax at every position of prompt + reference must match (ties excepted).
    seq = list(prompt) + list(ref[: n - 1])
    logits = teacher_forced_logits(backend, seq)
    arg = torch.argmax(logits, dim=-1).tolist()
    tf = {"positions": len(seq), "mismatches": [], "ties": []}
    second, tf_near = oracle.get("tf_second"), oracle.get("tf_near")
    for pos, (a, b) in enumerate(zip(arg, oracle["tf_argmax"][: len(seq)], strict=True)):
        if a != b:
            entry = {"position": pos, "got": a, "expected": b, "ref_gap": oracle["tf_gaps"][pos]}
            tie = _is_tie(a, tie_gap, tf_near and tf_near[pos], second and second[pos], oracle["tf_gaps"][pos])
            (tf["ties"] if tie else tf["mismatches"]).append(entry)

    probe = determinism_probe(backend, prompt, probe_backend)
    passed = free["mismatch"] is None and not tf["mismatches"] and probe["identical"]
    return {"passed": passed, "tie_gap": tie_gap, "free_running": free, "teacher_forced": tf, "determinism": probe}


def determinism_probe(backend, prompt_ids: Sequence[int], other=None, n: int = PROBE_TOKENS) -> dict[str, Any]:
    """24 greedy tokens twice (or on two backends) must be identical."""
    a, _ = greedy_tokens(backend, prompt_ids, n)
    b, _ = greedy_tokens(other or backend, prompt_ids, n)
    same = sum(x == y for x, y in zip(a, b, strict=True))
    return {"tokens": n, "identical_tokens": same, "identical": same == n,
            "against": "second backend" if other is not None else "second run"}


def format_report(report: dict[str, Any]) -> str:
    fr, tf, pr = report["free_running"], report["teacher_forced"], report["determinism"]
    lines = [
        f"free-running greedy: {fr['matched']}/{fr['tokens']} tokens match"
        + (f" (tie at step {fr['ties'][0]['step']}, reference gap {fr['ties'][0]['ref_gap']:.3f})"
           if fr["ties"] else "")
        + (f" -- MISMATCH at step {fr['mismatch']['step']}: got {fr['mismatch']['got']}, expected "
           f"{fr['mismatch']['expected']} (reference gap {fr['mismatch']['ref_gap']:.3f})" if fr["mismatch"] else ""),
        f"  max |top-1 logit - reference|: {fr['max_top1_logit_err']:.2e}",
        f"teacher-forced argmax: {tf['positions'] - len(tf['mismatches']) - len(tf['ties'])}/{tf['positions']} "
        f"positions match, {len(tf['ties'])} ties, {len(tf['mismatches'])} mismatches (tie gap "
        f"{report.get('tie_gap', TIE_GAP):g})",
        f"determinism probe ({pr['against']}): {pr['identical_tokens']}/{pr['tokens']} identical",
        "PASS" if report["passed"] else "FAIL",
    ]
    return "\n".join(lines)


def convert_hook(n_tokens: int = 32, prompt: str = DEFAULT_PROMPT, log=print):
    """`bundle.convert`'s oracle_hook: run the fp32 reference on the source checkpoint while converting."""

    def hook(ckpt, tmp_bundle: Path) -> dict[str, Any] | None:
        from tokenizers import Tokenizer

        tok_path, tpl_path = ckpt.tokenizer_path, ckpt.chat_template_path
        template = tpl_path.read_text() if tpl_path is not None else None
        if template is None and (ckpt.path / "tokenizer_config.json").is_file():
            template = json.loads((ckpt.path / "tokenizer_config.json").read_text()).get("chat_template")
        if tok_path is None or not isinstance(template, str):
            log("oracle skipped: the checkpoint has no tokenizer.json or chat template")
            return None
        log(f"oracle: fp32 reference, greedy, {n_tokens} tokens ...")
        return make_oracle(ckpt.path, Tokenizer.from_file(str(tok_path)), template, prompt=prompt,
                           n_tokens=n_tokens, log=log)

    return hook
